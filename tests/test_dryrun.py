"""Dry-run checkpoints: the real Qwen2 tokenizer built offline, the real prompt with it, and few-layer folders of
the real widths that load and run through the same code as the real checkpoints (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from surgvqa import dryrun
from surgvqa.backbones import QWEN2_5_VL, QWEN3_VL, backbone_of_like
from surgvqa import inference as I
from surgvqa import model as M
from surgvqa.collate import AUDIO_TOKEN, IGNORE_INDEX, Collator
from surgvqa.config import get_config

from test_collate import first_of_types, make_items


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-tokenizer")
    dryrun.qwen_tokenizer(backbone_of_like("qwen2vl-2b")).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def samples():
    return first_of_types("tool_identification", "lesion_motion_direction", "nbi_status")


def test_the_offline_qwen2_tokenizer_gives_the_published_ids(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151657
    ids = tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]) == [151652, 151655, 151656]
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    text = "Is the lesion in the sigmoid — über 5 mm?\n\n  (NBI)"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_rank_file_with_a_gap_is_refused(tmp_path):
    path = tmp_path / "ranks.tiktoken"
    path.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        dryrun.read_ranks(path)


def test_the_real_prompt_expands_placeholders_and_labels_decode_to_the_answer(tokenizer_dir, samples):
    tokenizer = M._load_tokenizer(tokenizer_dir, get_config("qwen2vl-2b"))
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == 151657  # added after Qwen2-VL's own tokens
    collate = Collator(tokenizer, WhisperFeatureExtractor(feature_size=128), question_mode="audio", frame_size=56,
                       audio_pool=4)
    items = make_items(samples, size=56, seconds=(1.0, 1.7, 2.3))
    batch = collate(items)
    audio = (batch["input_ids"] == 151657).sum(dim=1).tolist()
    # 1.0 s -> 100 mel frames padded to 104 (a multiple of 2 x pool 4) -> 13 rows; 1.7 s -> 22; 2.3 s -> 29
    assert audio == [13, 22, 29]
    assert (batch["input_ids"] == 151656).sum(dim=1).tolist() == [16] * 3  # a (4, 4, 4) grid, merged 2 x 2
    for row, labels, sample in zip(batch["input_ids"], batch["labels"], samples):
        answer = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(answer) == sample.answer + "<|im_end|>"
        assert sample.question not in tokenizer.decode(row)  # heard only
    generation = collate(items, for_generation=True)
    prompt = tokenizer.decode(generation["input_ids"][0][generation["attention_mask"][0].bool()])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|video_pad|>")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_few_layer_checkpoints_of_the_real_widths_load_and_run_like_real_ones(tmp_path, samples):
    vlm = dryrun.make_checkpoint("qwen2vl-2b", tmp_path / "vlm", layers=1, vision_layers=1)
    whisper = dryrun.make_checkpoint("whisper-large-v3-turbo", tmp_path / "whisper", layers=1)
    assert dryrun.is_dry_run(vlm) and dryrun.is_dry_run(whisper)
    config = json.loads((vlm / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 1536 and config["vision_config"]["embed_dim"] == 1280
    assert config["text_config"]["vocab_size"] == 151936 and config["text_config"]["num_hidden_layers"] == 1
    cfg = get_config("qwen2vl-2b", vlm=str(vlm), whisper=str(whisper), frames_source="phantom", frame_size=56,
                     lora_r=4, device="cpu")
    model = M.build_model(cfg)
    assert model.whisper.config.num_mel_bins == 128 and model.whisper.config.d_model == 1280
    assert model.feature_extractor.feature_size == 128
    assert next(model.parameters()).device.type == "cpu" and model.base_vlm.dtype == torch.bfloat16
    batch = M.collator(model)(make_items(samples, size=56))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 5  # random weights over a 152k vocabulary
    scored = I.score_candidates(model, M.collator(model)(make_items(samples, size=56), for_generation=True))
    assert [sorted(s.probabilities) for s in scored] == [["catheter", "forceps", "snare"],
                                                          ["down", "left", "right", "stable", "up"], ["no", "yes"]]
    assert all(np.isclose(sum(s.probabilities.values()), 1.0) for s in scored)


@pytest.mark.parametrize("backbone, length", [(QWEN2_5_VL, 151665), (QWEN3_VL, 151669)], ids=["qwen2.5-vl", "qwen3-vl"])
def test_each_generations_tokenizer_has_its_published_ids_and_the_audio_token_after_them(backbone, length, tmp_path):
    backbone_dir = tmp_path / backbone.name
    dryrun.qwen_tokenizer(backbone).save_pretrained(str(backbone_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
    assert len(tokenizer) == length
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|vision_start|>", "<|video_pad|>", "<tool_call>"]) == [
        151644, 151652, 151656, 151657]
    if backbone is QWEN3_VL:
        assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    tokenizer = M._load_tokenizer(backbone_dir, get_config("qwen3vl-2b"))
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == length  # a new id after the generation's own
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user_turn = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2.5-VL's template writes a default system turn first; Qwen3-VL's none
    assert prompt == (user_turn if backbone is QWEN3_VL else
                      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + user_turn)


@pytest.mark.slow
def test_a_few_layer_qwen3_vl_checkpoint_of_the_real_widths_trains_and_scores(tmp_path, samples):
    vlm = dryrun.make_checkpoint("qwen3vl-2b", tmp_path / "vlm", layers=1, vision_layers=1)
    config = json.loads((vlm / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["hidden_size"] == 2048
    assert config["vision_config"]["patch_size"] == 16 and config["vision_config"]["deepstack_visual_indexes"] == [0]
    whisper = dryrun.make_checkpoint("whisper-large-v3-turbo", tmp_path / "whisper", layers=1)
    cfg = get_config("qwen3vl-2b", vlm=str(vlm), whisper=str(whisper), frames_source="phantom", frame_size=64,
                     lora_r=4, device="cpu")
    model = M.build_model(cfg)
    assert model.backbone is QWEN3_VL and type(model.base_vlm).__name__ == "Qwen3VLForConditionalGeneration"
    batch = M.collator(model)(make_items(samples, size=64))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 5  # random weights over a 152k vocabulary
    loss.backward()
    assert model.projector.linear.weight.grad is not None
    scored = I.score_candidates(model, M.collator(model)(make_items(samples, size=64), for_generation=True))
    assert [sorted(s.probabilities) for s in scored] == [["catheter", "forceps", "snare"],
                                                          ["down", "left", "right", "stable", "up"], ["no", "yes"]]


def test_the_one_command_dry_run_refuses_before_anything_heavy(capsys):
    assert dryrun.dry_run_main(["--preset", "qwen3vl-2b"]) == 2  # this machine has no GPU
    assert "no GPU here" in capsys.readouterr().err
    assert dryrun.dry_run_main(["--preset", "tiny"]) == 2
    assert "no published checkpoint" in capsys.readouterr().err
    assert dryrun.check_machine("qwen3vl-2b", get_config("qwen3vl-2b"), 80.0) == "qwen3vl-2b"
    with pytest.raises(dryrun.DryRunRefused, match=r"29.3 GiB .* presets measured to fit: qwen2vl-2b, qwen3vl-2b"):
        dryrun.check_machine("qwen25vl-7b", get_config("qwen25vl-7b"), 23.6)


def test_each_notebook_of_the_dry_run_gets_only_what_it_declares():
    given = dryrun.params_per_notebook({"unseen_engine": False, "max_steps": 16}, ["01", "04", "08"], full=False)
    assert given["08"] == {"unseen_engine": False, "max_steps": 16, "robustness_rows": 32}
    assert given["04"] == {"max_steps": 16}
    assert given["01"] == {"max_steps": 16, "probe_rows": 200, "probe_clips": 200}
    assert dryrun.params_per_notebook({"unseen_engine": False}, ["08"], full=True) == {"08": {"unseen_engine": False}}
    with pytest.raises(KeyError, match=r"\['robustness_rowz'\]: neither a parameter of notebooks 04, 08"):
        dryrun.params_per_notebook({"robustness_rowz": 3}, ["04", "08"], full=False)


def test_the_dry_run_reads_steady_rates_and_projects_the_full_study(tmp_path):
    (tmp_path / "log.csv").write_text("step,samples_per_s\n8,2.0\n16,4.0\n24,4.0\n")
    (tmp_path / "summary.json").write_text(json.dumps({"alignment": {"steps": 50, "wall_s": 20.0,
                                                                     "s_per_1000_utterances": 50.0}}))
    baselines = {"blind prior": {"ms_per_query": 0.0}, "audio-only (headline)": {"ms_per_query": 100.0},
                 "text-only": {"ms_per_query": 50.0}}
    rates = dryrun.steady_rates(tmp_path, {}, {"baselines": baselines})
    assert rates == {"train_ms_per_sample": 250.0, "train_ms_per_sample_warmup": 500.0, "align_s_per_step": 0.4,
                     "align_s_per_1000_utterances": 50.0, "eval_ms_per_row": 100.0, "baselines_ms_per_row": 150.0}
    assert dryrun.baseline_rates({"baselines": baselines}) == {"audio-only (headline)": 10.0, "text-only": 20.0}
    cfg = get_config("qwen3vl-2b")  # batch 4 x 4, evaluation every 200 steps, 500 alignment steps
    projection = dryrun.project_full_study(rates, cfg)
    terms = {k: v["seconds"] for k, v in projection["terms"].items()}
    # 3 x 2,302 samples x 0.25 s; 500 x 0.4 s; ceil(6,906 / 16) = 432 steps -> 2 evaluations x 398 rows x 0.1 s;
    # 1,000 rows x 0.15 s
    assert terms == {"training": 1726.5, "alignment": 200.0, "in-training evaluations": 79.6, "05 baselines": 150.0}
    assert projection["total_s"] == pytest.approx(sum(terms.values()))
    assert "speech synthesis (02), 08, model loading" in projection["not_projected"]
    # with 02 and 08 run: 02 scaled by questions (3,700 of 192), 08 by rows a condition (100 of 32)
    walled = dryrun.project_full_study(rates, cfg, {"02": 19.2, "04": 100.0, "08": 32.0})
    assert walled["terms"]["02 speech synthesis"]["seconds"] == 370.0
    assert walled["terms"]["08 robustness"]["seconds"] == 100.0
    assert walled["not_projected"].startswith("model loading")
    report = {"preset": "qwen3vl-2b", "like": "qwen3vl-2b", "gpu": "GPU", "gpu_gib": 80.0, "torch": "2",
              "sizes": dryrun.REDUCED, "notebooks": [{"notebook": "04", "wall_s": 10.0, "peak_gib": 9.96}],
              "rates": rates, "projection": projection, "baseline_rows_per_s": {"text-only": 20.0}}
    markdown = dryrun.write_report(report, tmp_path / "out").read_text()
    assert "| 04 | 10.0 | 10.0 |" in markdown and "| text-only | 20.0 |" in markdown and "| training | 1726.5 | 3 x 2302 rows x 250 ms |" in markdown
    assert json.loads((tmp_path / "out" / "dry-run.json").read_text())["projection"]["total_s"] == 2156.1
    # a run's overrides of the reduced sizes are stated beside them
    report["overrides"] = {"max_steps": 200, "limit_test": 1000}
    markdown = dryrun.write_report(report, tmp_path / "out").read_text()
    assert 'Overrides (these win over the sizes): {"max_steps": 200, "limit_test": 1000}.' in markdown


def test_the_omni_thinkers_published_config_tokens_and_template(tmp_path):
    from surgvqa.backbones import QWEN2_5_OMNI

    three = QWEN2_5_OMNI.published_config("qwen2.5-omni-3b")
    assert type(three).__name__ == "Qwen2_5OmniThinkerConfig"
    assert (three.text_config.hidden_size, three.text_config.num_hidden_layers, three.text_config.vocab_size) == (
        2048, 36, 151936)
    assert (three.audio_config.d_model, three.audio_config.encoder_layers, three.audio_config.num_mel_bins,
            three.audio_config.output_dim) == (1280, 32, 128, 2048)
    assert (three.audio_token_index, three.audio_start_token_id, three.audio_end_token_id, three.video_token_index) == (
        151646, 151647, 151648, 151656)
    assert QWEN2_5_OMNI.published_config("qwen2.5-omni-7b").vision_config.out_hidden_size == 3584
    QWEN2_5_OMNI.published_config("qwen2.5-omni-7b").save_pretrained(str(tmp_path / "omni"))
    tokenizer_dir = tmp_path / "omni-tokenizer"
    dryrun.qwen_tokenizer(QWEN2_5_OMNI).save_pretrained(str(tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tokenizer) == 151665
    assert tokenizer.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>"]) == [
        151646, 151647, 151648, 151655, 151656]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "audio"}, {"type": "text", "text": "Q"}]}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>Q<|im_end|>\n<|im_start|>assistant\n")
    assert (three.vision_start_token_id, three.vision_end_token_id) == (151652, 151653)  # read by its rope index
    # the graft does not apply to a model that hears natively: refused from the config, before any weight loads;
    # the native model refuses what it has no use for (Whisper outputs, a projector) before loading too
    with pytest.raises(ValueError, match="hears the question through its own audio encoder"):
        M._checkpoint_backbone(str(tmp_path / "omni"), get_config("qwen2vl-2b"))
    assert M._checkpoint_backbone(str(tmp_path / "omni"), get_config("qwen2vl-2b"), native=True) is QWEN2_5_OMNI
    with pytest.raises(ValueError, match="no Whisper outputs to cache"):
        M.build_model(get_config("omni-3b", vlm=str(tmp_path / "omni"), cache_audio_features=True))
    with pytest.raises(ValueError, match="no projector to align"):
        M.build_model(get_config("omni-3b", vlm=str(tmp_path / "omni"), align_steps=50))


def test_a_runs_tokenizer_loads_beside_its_config_without_a_warning(tmp_path):
    """A checkpoint folder holds surgvqa's config.json next to the tokenizer; loading it must not make transformers
    warn that the tokenizer has Mistral's broken regex (it reads any config.json of no known type as Mistral's)."""
    import logging

    import transformers

    built = dryrun.qwen_tokenizer(QWEN3_VL)
    built.save_pretrained(str(tmp_path))
    get_config("smoke").save(tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    root = transformers.utils.logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        tokenizer = M._load_tokenizer(tmp_path, get_config("smoke"))
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records if "regex" in r.getMessage()] == []
    text = "Is the lesion visible? 12 o'clock,\n  NBI's   ON"
    assert tokenizer(text)["input_ids"] == built(text)["input_ids"]  # loaded as built: no pre-tokenizer swapped


def test_the_datas_longest_answer_is_twelve_qwen_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    from surgvqa.data import longest_answer_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for template in ("in", "out"):
        assert longest_answer_tokens(get_config("qwen2vl-2b", template=template), tokenizer) == 12


def test_the_dry_run_completes_a_frames_folder_made_for_a_smaller_run(tmp_path):
    """A folder of phantom frames drawn for 2 rows a split is not enough for a run of 3: the missing clips are drawn,
    the present ones are not drawn again."""
    from surgvqa.dryrun import complete_frames

    frames = tmp_path / "frames"
    small = get_config("qwen2vl-2b", frames_source="real", limit_train=2, eval_limit=2, limit_test=2)
    assert complete_frames(frames, small, full=False, log=lambda m: None) == 6
    assert complete_frames(frames, small, full=False, log=lambda m: None) == 0
    larger = small.replace(limit_train=3, eval_limit=3, limit_test=3)
    assert complete_frames(frames, larger, full=False, log=lambda m: None) == 3
    assert complete_frames(frames, larger, full=False, log=lambda m: None) == 0
