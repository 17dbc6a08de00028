"""The workbook's training, evaluation and robustness notebooks on a model that hears natively (a tiny
Qwen2.5-Omni thinker, random weights): the same notebooks and rows as the graft, with no projector and no Whisper of
its own (05's ASR pipeline row keeps its separate Whisper)."""
import json

import pytest
import torch
from transformers import WhisperFeatureExtractor

from surgvqa import backbones as B
from surgvqa import workbook
from surgvqa.dryrun import qwen_tokenizer

from test_workbook_smoke import SMOKE_PARAMS


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    tokenizer = qwen_tokenizer(B.QWEN2_5_OMNI)
    torch.manual_seed(0)
    B.QWEN2_5_OMNI.model_class(B.QWEN2_5_OMNI.tiny_config(tokenizer)).save_pretrained(str(root / "omni"))
    tokenizer.save_pretrained(str(root / "omni"))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(root / "omni"))  # its tiny encoder's 80 mel bins
    own = {k: SMOKE_PARAMS[k] for k in ("batch_size", "robustness_rows", "snr_db", "speaking_rates")}
    params = {**own, "vlm": str(root / "omni"), "lora": True, "lora_r": 8, "cache_audio_features": False,
              "audio_dir": str(root / "audio"), "output_dir": str(root / "run")}
    lines = []
    workbook.run_workbook(["04", "05", "08"], preset="smoke", params=params, reports_dir=root / "reports", html=False,
                          cell_timeout=600, log=lines.append)
    return root / "reports"


def test_the_natively_hearing_model_trains_and_gets_every_row(reports):
    trained = workbook.read_metrics("04-train", reports)
    evaluated = workbook.read_metrics("05-evaluate", reports)
    assert trained["steps"] == 4 and "alignment" not in {k for k, v in trained.items() if v}
    config = json.loads(open(f"{trained['best_checkpoint']}/config.json").read())
    assert config["cache_audio_features"] is False and config["lora"] is True
    assert set(evaluated["baselines"]) == {"blind prior", "audio-only (headline)", "text-only", "audio + text",
                                           "Whisper ASR -> text", "Whisper ASR -> closest question -> text",
                                           "text-only, zero-shot base model"}
    for row in evaluated["baselines"].values():
        assert row["n"] == 16 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    parity = evaluated["training_eval_parity"]  # training's logged eval accuracy, re-predicted by 05
    assert parity["equal"] and parity["predicted_accuracy"] == parity["logged_accuracy"]
    robust = workbook.read_metrics("08-robustness", reports)
    noisy = [c for c in robust["conditions"] if c["group"] in ("babble", "broadband")]
    # every noisy file met the speech rule (templates' questions at 0 dB hold well over its 0.1 s of speech)
    assert noisy and all(c["refused"] == 0 and c["n"] == 8 for c in noisy)
    # 04 says how the model hears, so a reader does not look for an alignment that cannot exist
    executed = (reports / "04-train.ipynb").read_text()
    assert "hears the question through its own audio encoder (frozen): no projector to train or align" in executed
