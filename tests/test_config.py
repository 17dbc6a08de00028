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


@pytest.mark.parametrize("pair, message", [
    ("lr=-1", r"lr=-1: must be in \[0.0, 1.0\]"), ("lr=abc", "lr='abc': must be a finite number"),
    ("lr=NaN", "lr=nan: must be a finite number"), ("max_steps=0", "max_steps=0: must be >= 1"),
    ("max_steps=2.5", "max_steps=2.5: must be an integer"), ("max_steps=abc", "max_steps='abc': must be an integer"),
    ("eval_every=0", "eval_every=0: must be >= 1"), ("batch_size=true", "batch_size=True: must be an integer"),
    ("lora=1", "lora=1: must be true or false"), ("frame_size=[1]", r"frame_size=\[1\]: must be an integer"),
])
def test_values_are_typed_and_range_checked_naming_the_key(pair, message):
    with pytest.raises(ValueError, match=message):
        get_config("smoke", **parse_overrides([pair]))


def test_vlm_from_scratch_needs_the_tiny_vlm():
    with pytest.raises(ValueError, match="vlm_from_scratch=True builds the tiny VLM"):
        get_config("qwen2vl-2b", vlm_from_scratch=True)


def test_real_presets_launch_with_their_accelerate_config_and_the_cpu_ones_without():
    import sys

    from surgvqa.train import launch_command

    for preset, expected in [("qwen2vl-2b", "1gpu-bf16.yaml"), ("qwen2vl-7b", "1gpu-bf16.yaml"),
                             ("bf16-lora-1gpu", "1gpu-bf16.yaml"), ("qlora-2x24gb", "2gpu-ddp.yaml")]:
        command = launch_command(preset, {"max_steps": 5})
        assert command[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        assert command[4] == str(get_config().path(f"configs/accelerate/{expected}"))  # from the repository root
        assert command[5:] == ["-m", "surgvqa.train", "--preset", preset, "-p", "max_steps=5"]
        assert get_config(preset).device == "auto"
    # checkpointing is off only where the memory benchmark measured the preset inside its card without it
    measured_off = {"qlora-2x24gb", "bf16-lora-1gpu"}
    for preset in ("qwen2vl-2b", "qwen2vl-7b", "qwen25vl-7b", "qwen3vl-2b", "qwen3vl-8b", "omni-7b", *measured_off):
        assert get_config(preset).gradient_checkpointing == (preset not in measured_off), preset
    assert launch_command("tiny", {}) == [sys.executable, "-m", "surgvqa.train", "--preset", "tiny"]
    with pytest.raises(FileNotFoundError, match="accelerate config 'configs/nowhere.yaml' not found"):
        launch_command("tiny", {}, accelerate_config="configs/nowhere.yaml")


def test_device_auto_is_the_cpu_without_a_gpu_and_cuda_without_one_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert get_config().torch_device().type == "cpu" and get_config(device="cpu").torch_device().type == "cpu"
    with pytest.raises(RuntimeError, match="device='cuda' but no CUDA GPU"):
        get_config(device="cuda").torch_device()
    with pytest.raises(ValueError, match="device='tpu'"):
        get_config(device="tpu")


def test_pretraining_settings_are_checked_as_the_config_is_and_share_its_command_line():
    from surgvqa.config import PretrainSettings, pretrain_config

    cfg, settings = pretrain_config(parse_overrides(["max_steps=5", "lesion_share=0.6"], pretraining=True))
    assert cfg.preset == "phantom-pretrain" and cfg.max_steps == 5 and settings.lesion_share == 0.6
    with pytest.raises(KeyError, match="neither a config key nor a pretraining setting.*bogus"):
        pretrain_config({"bogus": 1})
    with pytest.raises(KeyError, match="heard_share"):  # not a Config key where only Config keys are read
        parse_overrides(["heard_share=1"])
    with pytest.raises(KeyError, match="bogus"):
        PretrainSettings().replace(bogus=1)
    with pytest.raises(ValueError, match=r"lesion_share=2: must be in \[0.0, 1.0\]"):
        PretrainSettings(lesion_share=2)
    with pytest.raises(ValueError, match="vision_depth='x': must be an integer"):
        pretrain_config({"vision_depth": "x"})
    with pytest.raises(ValueError, match="heard_share=0.5: needs a heard bank"):
        PretrainSettings(heard_share=0.5)
    with pytest.raises(ValueError, match="unknown question types"):
        PretrainSettings(question_types="colour")
    assert PretrainSettings(vision_depth=None, text_layers=2).text_layers == 2


def test_an_override_is_written_as_parse_overrides_reads_it_back():
    from surgvqa.config import format_override

    values = {"heard_bank": "data/x.npz", "lr": 3e-4, "vlm_from_scratch": False, "question_types": "1",
              "trainval_videos": ["002-001"]}
    assert parse_overrides([format_override(k, v) for k, v in values.items()], pretraining=True) == values
