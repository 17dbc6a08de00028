"""The phantom-pretrained tiny VLM that ships in checkpoints/tiny-phantom: it loads, it is small, and it
answers the phantom renderings of the eval split as its model card says."""
import json

import pytest
import torch

from surgvqa import pretrain_data, pretrain_report
from surgvqa.config import REPO_ROOT, PretrainSettings
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
    settings = PretrainSettings()
    table = pretrain_report.phantom_accuracy(model, pretrain_report.eval_split_clips(settings, model.cfg), 112, batch_size=32)
    assert len(table) == 20
    for qtype, row in table.iterrows():
        assert row["accuracy"] == pytest.approx(card[qtype]["eval_split_accuracy"], abs=0.07), qtype
    # what the card claims, in plain numbers: every type, the lesion and motion ones included, far above chance
    assert table["accuracy"].min() >= 0.9, table["accuracy"].idxmin()


def test_heard_eval_split_accuracy_matches_the_model_card(tmp_path):
    """Stages 3 and 4 taught the checkpoint to hear: questions of the eval split heard (audio-only, and heard
    and written), said by eval-pool voices (two drawn here; the card's columns drew from twelve), score as its
    card says."""
    model = load_checkpoint(SHIPPED)
    card = json.loads((SHIPPED / "metrics.json").read_text())
    bank = pretrain_data.build_heard_bank(model.cfg, tmp_path / "bank.npz", train_voices=1, eval_voices=2,
                                          log=lambda *_: None)
    assert bank.fingerprint == json.loads((SHIPPED / "projector_source.json").read_text())["whisper_fingerprint"]
    builder = pretrain_data.row_builder(model, 112, bank=bank, heard_share=1.0, both_share=1.0)
    clips = pretrain_report.eval_split_clips(PretrainSettings(), model.cfg)
    for mode, column in (("audio", "eval_split_heard_accuracy"), ("both", "eval_split_both_accuracy")):
        table = pretrain_report.row_candidate_accuracy(model, builder, clips, 112, heard_split="eval", mode=mode)
        assert len(table) == 20
        for qtype, row in table.iterrows():
            assert row["accuracy"] == pytest.approx(card["per_type"][qtype][column], abs=0.1), (mode, qtype)
        assert table["accuracy"].min() >= 0.9, (mode, table["accuracy"].idxmin())


def test_the_preset_starts_from_the_pretrained_projector():
    from safetensors.torch import load_file

    from surgvqa import get_config
    from surgvqa.model import build_model

    assert get_config().pretrained_projector
    model = build_model(get_config())
    shipped = load_file(str(SHIPPED / "projector.safetensors"))
    assert all(torch.equal(model.projector.state_dict()[k], v) for k, v in shipped.items())


def test_the_tiny_architecture_is_defined_once_and_is_the_shipped_one():
    """``vlm_from_scratch`` builds the architecture that ships, with random weights."""
    from surgvqa.backbones import TINY
    from surgvqa.model import build_tiny_tokenizer

    built = TINY.tiny_config(build_tiny_tokenizer()).to_dict()
    shipped = json.loads((TINY_PRETRAINED_DIR / "config.json").read_text())
    for part, keys in (("text_config", ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "rope_parameters")),
                       ("vision_config", ("depth", "embed_dim", "hidden_size", "num_heads", "mlp_ratio", "patch_size",
                                          "spatial_merge_size", "temporal_patch_size"))):
        for key in keys:
            assert built[part][key] == shipped[part][key], (part, key)
