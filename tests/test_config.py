import json

import pytest

from surgvqa.config import DEFAULT_PRESET, PRESETS, Config, get_config, parse_overrides


def test_default_preset_is_the_offline_tiny_one():
    cfg = get_config()
    assert cfg.preset == DEFAULT_PRESET == "tiny"
    assert cfg.frames_source == "phantom" and cfg.vlm == "tiny" and cfg.tts_engine == "espeak-ng"


def test_every_preset_builds_and_real_presets_use_real_frames():
    for name in PRESETS:
        assert get_config(name).preset == name
    for name in ("qwen2vl-2b", "qwen2vl-7b", "qlora-2x24gb", "bf16-lora-1gpu"):
        assert get_config(name).frames_source == "real"
    q = get_config("qlora-2x24gb")
    assert q.load_in_4bit and q.lora and (q.lora_r, q.lora_alpha, q.lora_dropout) == (64, 16, 0.05)


def test_unknown_keys_raise_everywhere(tmp_path):
    with pytest.raises(KeyError, match="lerning_rate"):
        get_config(lerning_rate=1)
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(KeyError):
        get_config().replace(bogus=1)
    with pytest.raises(KeyError):
        parse_overrides(["nope=3"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**get_config().to_dict(), "extra": 1}))
    with pytest.raises(KeyError, match="extra"):
        Config.load(path)


@pytest.mark.parametrize("key, value", [("question_mode", "telepathy"), ("audio_pool", 3), ("audio_projector", "mlp")])
def test_bad_choice_raises(key, value):
    with pytest.raises(ValueError, match=key):
        get_config(**{key: value})


def test_save_load_round_trip_and_overrides(tmp_path):
    cfg = get_config("smoke", lr=3e-4, trainval_videos=["002-001"])
    cfg.save(tmp_path)
    again = Config.load(tmp_path)
    assert again == cfg and again.trainval_videos == ("002-001",)
    assert parse_overrides(["lr=0.01", "template=in", "lora=true"]) == {"lr": 0.01, "template": "in", "lora": True}
