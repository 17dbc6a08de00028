"""The phantom-pretrained tiny VLM that ships in checkpoints/tiny-phantom: it loads, it is small, and it
answers the phantom renderings of the eval split as its model card says."""
import json

import pytest

from surgvqa import pretrain
from surgvqa.config import REPO_ROOT
from surgvqa.model import TINY_PRETRAINED_DIR, load_checkpoint

SHIPPED = REPO_ROOT / "checkpoints" / "tiny-phantom"


def test_the_checkpoint_is_small_safetensors_with_config_and_tokenizer():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2 ** 20
    assert (TINY_PRETRAINED_DIR / "model.safetensors").is_file() and not list(SHIPPED.rglob("*.bin"))
    for name in ("config.json", "tokenizer.json", "MODEL_CARD.md", "metrics.json"):
        assert (SHIPPED / name).is_file()


def test_eval_split_accuracy_matches_the_model_card():
    model = load_checkpoint(SHIPPED)
    card = json.loads((SHIPPED / "metrics.json").read_text())["per_type"]
    settings = pretrain.PretrainSettings(frame_size=112)
    table = pretrain.phantom_accuracy(model, pretrain.eval_split_clips(settings, model.cfg), 112, batch_size=32)
    assert len(table) == 20
    for qtype, row in table.iterrows():
        assert row["accuracy"] == pytest.approx(card[qtype]["eval_split_accuracy"], abs=0.07), qtype
    # what the card claims, in plain numbers: every type, the lesion and motion ones included, far above chance
    assert table["accuracy"].min() >= 0.9, table["accuracy"].idxmin()
