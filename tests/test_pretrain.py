import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from surgvqa import get_config, phantom
from surgvqa.backbones import IM_END, VIDEO_TOKEN, frames_to_patches
from surgvqa.collate import IGNORE_INDEX
from surgvqa.tts import VoiceSpec, render, voice_pools
from surgvqa.data import question_wordings, training_wordings, wording_variants, wordings_of
from surgvqa.model import build_model, collator, load_checkpoint, load_pretrained_projector
from surgvqa.model import PACKED_ATTENTION, register_packed_attention
from surgvqa.config import PretrainSettings
from surgvqa.pretrain import main, pretrain
from surgvqa.pretrain_data import (HeardBank, PhantomRows, build_heard_bank, row_builder, shared_vision_token_losses,
                                   video_patches)
from surgvqa.pretrain_report import MOTION_TYPES, clip_frames, phantom_accuracy, row_candidate_accuracy

SIZE = 56  # 2 x 2 merged vision tokens per temporal slice: fast, and still a real video grid
# heldout seed 3: its first clips carry both motion questions, so the single-frame control has rows
TOY = PretrainSettings(heldout_seed=3, heldout_clips=2, eval_rows=6, log_every=1, eval_batch_size=32)
TOY_CONFIG = dict(frame_size=SIZE, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, num_workers=0, eval_every=100)


def toy_config(**overrides):
    return get_config("phantom-pretrain", **{**TOY_CONFIG, **overrides})


@pytest.fixture(scope="module")
def model():
    return build_model(get_config(question_mode="text", frame_size=SIZE, vlm_from_scratch=True))


@pytest.fixture(scope="module")
def builder(model):
    return row_builder(model, SIZE)


@pytest.fixture(scope="module")
def clips():
    return phantom.random_clip_samples(3, seed=5)


def _text_collator(model):
    return dataclasses.replace(collator(model), question_mode="text", frame_size=SIZE)


def test_a_row_is_the_collators_text_mode_training_row(model, builder, clips):
    text_collator = _text_collator(model)
    tok = builder.tokenizer
    for state, samples in clips:
        clip = clip_frames(state, SIZE, 0, single_frame=False)
        rows = builder.rows(samples, np.random.default_rng(0))
        assert len(rows) == len(samples)
        for s, row in zip(samples, rows):
            reworded = dataclasses.replace(s, question=row.question)
            single = text_collator([(reworded, clip, None)])
            assert row.ids == single["input_ids"][0].tolist()
            labels = [IGNORE_INDEX] * row.answer_start + row.ids[row.answer_start:]
            assert labels == single["labels"][0].tolist()
            assert tok.decode(row.ids[row.answer_start:]) == s.answer + IM_END
            # the prompt holds this question only, and no answer
            prompt = tok.decode(row.ids[: row.answer_start])
            assert prompt.count("Question: ") == 1 and row.question in prompt and s.answer not in prompt
            assert prompt.count(VIDEO_TOKEN) == builder.vision_tokens
    # rows ask in the training wordings (the paraphrase bank's train wordings and both templates'), several a type
    asked: dict[str, set[str]] = {}
    for seed in range(8):
        for _, samples in clips:
            for s, r in zip(samples, builder.rows(samples, np.random.default_rng(seed))):
                asked.setdefault(s.question_type, set()).add(r.question)
    allowed = training_wordings(get_config())
    assert all(questions <= set(allowed[t]) for t, questions in asked.items())
    assert min(map(len, asked.values())) >= 3
    templates = {w for t in ("in", "out") for w in question_wordings(t).values()}
    assert any(q in templates for qs in asked.values() for q in qs)
    assert any(q not in templates for qs in asked.values() for q in qs)


def test_batch_positions_patches_and_label_index_match_the_stock_model(model, builder):
    settings = dataclasses.replace(TOY, lesion_share=0.0)
    batch = PhantomRows(builder, settings, model.cfg.replace(batch_size=3)).batch(0)
    base = model.base_vlm
    n_rows = batch["input_ids"].shape[0]
    assert n_rows > 3 and batch["row_clip"].tolist() == sorted(batch["row_clip"].tolist())
    assert set(batch["row_clip"].tolist()) == {0, 1, 2}
    mask = (batch["input_ids"] != builder.pad_id).long()  # the pad token never occurs inside a row
    grid = batch["video_grid_thw"].index_select(0, batch["row_clip"])
    stock, _ = base.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], video_grid_thw=grid,
                                         attention_mask=mask)
    real = mask.bool().unsqueeze(0).expand(3, -1, -1)
    assert torch.equal(batch["position_ids"][real], stock[real])
    patches = torch.cat([frames_to_patches(c.numpy(), "video", SIZE)[0] for c in batch["frames"]])
    assert torch.allclose(video_patches(batch["frames"]), patches, atol=1e-6)
    # the flat label index picks the positions whose next token is a label: answers + end-of-turn only
    flat_next = batch["input_ids"][:, 1:].reshape(-1)
    assert torch.equal(flat_next[batch["label_positions"]], batch["label_targets"])
    im_end = builder.tokenizer.convert_tokens_to_ids(IM_END)
    assert int((batch["label_targets"] == im_end).sum()) == n_rows
    assert torch.equal(torch.unique(batch["label_answer"]), torch.arange(n_rows))


def test_shared_vision_loss_equals_each_row_through_the_model_forward(model, builder):
    """fp32, CPU: the shared-vision batch gives, row by row, the loss of AudioGraftedVLM.forward on the
    Collator's single-row batch (own vision pass, stock positions, attention mask)."""
    settings = dataclasses.replace(TOY, lesion_share=1.0)
    dataset = PhantomRows(builder, settings, model.cfg.replace(batch_size=2))
    clips = dataset.clips(1)
    rng = np.random.default_rng([settings.data_seed, 1])
    rows_per_clip = [builder.rows(samples, rng) for _, samples in clips]
    rendered = np.stack([phantom.render_phantom_clip(state, SIZE, model.cfg.phantom_seed) for state, _ in clips])
    batch = builder.collate(rows_per_clip, rendered)
    text_collator = _text_collator(model)
    model.eval()
    with torch.no_grad():
        token_loss, _ = shared_vision_token_losses(model, batch)
        n_rows = batch["input_ids"].shape[0]
        shared = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, batch["label_answer"], token_loss.double())
        shared /= torch.bincount(batch["label_answer"], minlength=n_rows)
        separate = []
        for (state, samples), rows, clip in zip(clips, rows_per_clip, rendered):
            for s, row in zip(samples, rows):
                single = text_collator([(dataclasses.replace(s, question=row.question), clip, None)])
                separate.append(float(model(**single).loss))
    assert len(separate) == n_rows > 10
    assert torch.allclose(shared, torch.tensor(separate, dtype=torch.float64), atol=1e-5, rtol=0)

    # gradients reach the vision tower through the shared embeddings
    model.train()
    model.vlm.zero_grad()
    token_loss, _ = shared_vision_token_losses(model, batch)
    token_loss.mean().backward()
    grads = [p.grad for p in model.base_vlm.model.visual.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    model.vlm.zero_grad()


def test_question_types_setting_keeps_only_those_rows(model):
    settings = dataclasses.replace(TOY, question_types="nbi_status, scope_motion_type")
    builder = row_builder(model, SIZE, settings.question_type_list)
    batch = PhantomRows(builder, settings, model.cfg.replace(batch_size=3)).batch(0)
    from surgvqa.data import QUESTION_TYPES
    assert {QUESTION_TYPES[i] for i in batch["answer_type"].tolist()} <= {"nbi_status", "scope_motion_type"}
    with pytest.raises(ValueError, match="unknown question types"):
        dataclasses.replace(TOY, question_types="colour").question_type_list


def test_the_packed_attention_pretraining_uses_matches_stock_sdpa(model):
    packed_attention = register_packed_attention()
    visual = model.base_vlm.model.visual
    assert visual.config._attn_implementation == PACKED_ATTENTION  # every model the project builds
    grid = torch.tensor([[4, 4, 4]] * 3)
    patches = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14)
    unequal = torch.tensor([[2, 4, 4], [2, 4, 8]])
    with torch.no_grad():
        visual.config._attn_implementation = "sdpa"
        try:
            stock = visual(patches, grid_thw=grid).pooler_output
            stock_unequal = visual(patches[:32 + 64], grid_thw=unequal).pooler_output
        finally:
            visual.config._attn_implementation = PACKED_ATTENTION
        calls = packed_attention.packed_calls
        batched = visual(patches, grid_thw=grid).pooler_output
        assert packed_attention.packed_calls - calls == len(visual.blocks)  # one call a vision layer
        # clips of different sizes: one padded call a layer, with the same result
        batched_unequal = visual(patches[:32 + 64], grid_thw=unequal).pooler_output
        assert packed_attention.packed_calls - calls == 2 * len(visual.blocks)
    assert torch.allclose(stock, batched, atol=1e-5)
    assert torch.allclose(stock_unequal, batched_unequal, atol=1e-5)


def test_single_frame_control_repeats_frame_zero(clips):
    state = clips[0][0]
    clip = clip_frames(state, SIZE, 0, single_frame=False)
    still = clip_frames(state, SIZE, 0, single_frame=True)
    assert still.shape == clip.shape and not np.array_equal(clip[0], clip[-1])
    assert all(np.array_equal(frame, clip[0]) for frame in still)


def test_toy_pretraining_lowers_the_loss_and_saves_a_reloadable_checkpoint(tmp_path, builder):
    out = tmp_path / "pretrained"
    trained, metrics = pretrain(toy_config(), TOY, out, command="toy", log=lambda *_: None)
    log = pd.read_csv(out / "train_log.csv")
    assert len(log) == TOY_CONFIG["max_steps"] and log["train_loss"].iloc[-2:].mean() < log["train_loss"].iloc[:2].mean() - 0.5
    assert {"data_wait_ms", "forward_ms", "backward_ms", "optimizer_ms", "answer_exact/nbi_status", "rows"} <= set(log.columns)
    evals = pd.read_csv(out / "eval_log.csv")
    assert set(evals["set"]) == {"heldout", "eval_split", "heldout_single_frame", "heldout_still_answer"}
    single = set(evals[evals["set"] == "heldout_single_frame"]["question_type"])
    assert single and single <= set(MOTION_TYPES)  # the motion questions the 2 held-out clips carry
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == TOY_CONFIG["max_steps"] == metrics["steps"] and saved["config"]["frame_size"] == SIZE
    card = (out / "MODEL_CARD.md").read_text()
    assert "toy" in card and "| nbi_status |" in card and "curves.png" in card and (out / "curves.png").is_file()
    assert (out / "vlm" / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 25 * 2 ** 20

    reloaded = load_checkpoint(out)
    assert reloaded.cfg.frame_size == SIZE and reloaded.cfg.question_mode == "text"
    batch = PhantomRows(builder, TOY, reloaded.cfg.replace(batch_size=2)).batch(7)
    trained.eval()
    with torch.no_grad():
        _, before = shared_vision_token_losses(trained, batch)
        _, after = shared_vision_token_losses(reloaded.eval(), batch)
    assert torch.equal(before, after)


def test_a_pixel_only_cue_is_learned_from_single_turn_rows(tmp_path):
    """nbi_status rows only (the palette is the only cue; both answers follow the same prompts): after a
    short toy run (40 steps x 16 clips at 56 px) held-out candidate-scoring accuracy is far above chance (1/2)."""
    settings = dataclasses.replace(TOY, log_every=10, question_types="nbi_status", heldout_seed=4, heldout_clips=60,
                                   eval_rows=1)
    _, metrics = pretrain(toy_config(batch_size=16, max_steps=40, lr=3e-3, warmup_steps=5, eval_every=1000), settings,
                          tmp_path / "nbi", command="toy nbi", log=lambda *_: None)
    row = metrics["per_type"]["nbi_status"]
    assert row["heldout_n"] == 60 and row["heldout_accuracy"] >= 0.85, row  # measured 0.98
    assert set(metrics["per_type"]) == {"nbi_status"}  # only the trained type is evaluated


def test_command_line_rejects_a_frame_size_that_would_be_resized(tmp_path):
    with pytest.raises(ValueError, match="multiple of 28"):
        main(["--out", str(tmp_path), "--device", "cpu", "--frame-size", "100", "--steps", "1"])


def test_still_answers_are_what_a_clip_without_motion_would_answer():
    from surgvqa.phantom import random_clip_samples
    from surgvqa.pretrain_report import still_answer_accuracy

    clips = random_clip_samples(60, seed=5)
    table = still_answer_accuracy(clips, MOTION_TYPES)
    # asked only of moving clips: no still answer
    assert "scope_motion_type" not in table.index and "scope_forward_motion" not in table.index
    moving = [s.short_answer == "no" for state, samples in clips for s in samples if s.question_type == "scope_motion"]
    assert table.loc["scope_motion", "accuracy"] == pytest.approx(sum(moving) / len(moving))
    stable = [s.short_answer == "stable" for _, samples in clips for s in samples
              if s.question_type == "lesion_motion_direction"]
    assert table.loc["lesion_motion_direction", "accuracy"] == pytest.approx(sum(stable) / len(stable))


# --- heard questions ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heard_model():
    """The tiny preset's audio path (pool 16, vocabulary projector) on a random-init VLM; its train voices without
    room noise, so that a test can say a bank's utterance again."""
    return build_model(get_config(question_mode="text", frame_size=SIZE, vlm_from_scratch=True, train_noise=0.0))


@pytest.fixture(scope="module")
def heard_bank(tmp_path_factory, heard_model):
    path = tmp_path_factory.mktemp("bank") / "bank.npz"
    # with one generated variant of each type, said once: the bank holds more wordings than heard_model reads
    return path, build_heard_bank(heard_model.cfg.replace(wording_variants=1), path, train_voices=2, eval_voices=1,
                                  variant_voices=1, log=lambda *_: None)


def test_heard_bank_holds_the_training_wordings_by_train_voices_and_the_templates_by_eval_voices(heard_bank):
    path, bank = heard_bank
    loaded = HeardBank.load(path)
    assert np.array_equal(loaded.features, bank.features) and loaded.fingerprint == bank.fingerprint
    templates = {w for t in ("in", "out") for w in question_wordings(t).values()}
    training = {w for ws in training_wordings(get_config()).values() for w in ws}
    assert templates < training and len(training) > 3 * len(templates)
    variants = {w for ws in wording_variants(get_config(wording_variants=1)).values() for w in ws}
    assert len(variants) == 20 and not variants & training
    assert set(bank.index("train")) == training | variants
    assert all(len(v) == (1 if w in variants else 2) for w, v in bank.index("train").items())
    assert set(bank.index("eval")) == templates and all(len(v) == 1 for v in bank.index("eval").values())
    assert not set(bank.index("train")) & set(wordings_of("test"))  # held-out wordings are never heard
    pools = voice_pools()
    speaker = {v.key: (v.engine, v.voice) for v in pools["train"] + pools["eval"] + pools["test"]}
    train_specs = [VoiceSpec.from_key(k) for k in bank.voices[bank.splits == "train"]]
    train_speakers = {(v.engine, v.voice) for v in train_specs}
    assert train_speakers <= {(v.engine, v.voice) for v in pools["train"]} | {("piper", "joe-us")}
    assert ("piper", "joe-us") in train_speakers  # a second engine ...
    assert len({(v.rate, v.pitch) for v in train_specs}) > len(train_speakers)  # ... and perturbed prosody
    assert {speaker[k] for k in bank.voices[bank.splits == "eval"]} <= {(v.engine, v.voice) for v in pools["eval"]}
    assert not {(v.engine, v.voice) for v in pools["test"]} & train_speakers
    assert bank.features.dtype == np.float16 and bank.features.shape[1] == 384 and bank.audio_pool == 16


def test_pretraining_refuses_a_bank_that_lacks_a_training_wording_before_any_step(heard_bank):
    _, bank = heard_bank  # made without wording variants
    with_variants = build_model(get_config(question_mode="text", frame_size=SIZE, vlm_from_scratch=True,
                                           train_noise=0.0, wording_variants=2))
    with pytest.raises(ValueError, match="no train-voice utterance of [0-9]+ training wording"):
        row_builder(with_variants, SIZE, bank=bank, heard_share=1.0)
    row_builder(with_variants, SIZE, bank=bank)  # rows only read: no bank utterance needed


def test_heard_bank_rejects_a_missing_or_inconsistent_file(tmp_path, heard_bank):
    with pytest.raises(FileNotFoundError, match="heard-bank"):
        HeardBank.load(tmp_path / "none.npz")
    _, bank = heard_bank
    broken = dataclasses.replace(bank, offsets=bank.offsets[:-1])
    broken.save(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="do not describe"):
        HeardBank.load(tmp_path / "broken.npz")


def test_heard_rows_are_the_collators_audio_and_both_rows_with_the_same_loss(heard_model, heard_bank):
    """A heard pretraining row (and a heard-and-written one) holds what the fine-tuning collator makes in the
    audio (both) mode for the same utterance (tokens, placeholder count), and its loss equals the graft's
    forward on that batch (the bank's float16 rounding aside)."""
    _, bank = heard_bank
    builder = row_builder(heard_model, SIZE, bank=bank, heard_share=1.0, both_share=1.0)
    state, samples = phantom.random_clip_samples(1, seed=5, template="out")[0]
    rows = builder.rows(samples, np.random.default_rng(0))
    assert [r.mode for r in rows] == ["text", "audio", "both"] * len(samples)
    assert all((r.audio is None) == (r.mode == "text") for r in rows)
    assert all(len({r.question for r in rows[3 * i: 3 * i + 3]}) == 1 for i in range(len(samples)))
    clip = clip_frames(state, SIZE, 0, single_frame=False)
    by_key = {(w, v): i for i, (w, v) in enumerate(zip(bank.wordings, bank.voices))}
    batch = builder.collate([rows], clip[None])
    assert batch["row_mode"].tolist() == [0, 1, 2] * len(samples)
    heard_model.eval()
    checked = 0
    with torch.no_grad():
        token_loss, _ = shared_vision_token_losses(heard_model, batch)
        per_row = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, batch["label_answer"], token_loss.double())
        per_row /= torch.bincount(batch["label_answer"], minlength=len(rows))
        for i, row in enumerate(rows):
            if row.mode == "text":
                continue
            s = samples[i // 3]
            index = next(j for (w, v), j in by_key.items() if w == row.question
                         and np.array_equal(bank.utterance(j), row.audio))
            wave = render(row.question, VoiceSpec.from_key(bank.voices[index]), 16000)
            mode_collator = dataclasses.replace(collator(heard_model), question_mode=row.mode, frame_size=SIZE)
            single = mode_collator([(dataclasses.replace(s, question=row.question), clip, wave)])
            assert row.ids == single["input_ids"][0].tolist()
            prompt = builder.tokenizer.decode(row.ids[: row.answer_start])
            assert (row.question in prompt) == (row.mode == "both")
            assert abs(float(heard_model(**single).loss) - float(per_row[i])) < 2e-3
            checked += 1
    assert checked == 2 * len(samples)


def test_written_row_scoring_ranks_as_score_candidates(heard_model, heard_bank):
    builder = row_builder(heard_model, SIZE, bank=heard_bank[1], heard_share=1.0)
    clips = phantom.random_clip_samples(3, seed=5, template="out")
    heard_model.eval()
    rows_table = row_candidate_accuracy(heard_model, builder, clips, SIZE, clips_per_batch=2)
    stock = phantom_accuracy(heard_model, clips, SIZE)
    assert rows_table["n"].sum() == sum(len(s) for _, s in clips) > 20
    pd.testing.assert_frame_equal(rows_table, stock)
    heard = row_candidate_accuracy(heard_model, builder, clips, SIZE, heard_split="eval")
    assert heard["n"].tolist() == rows_table["n"].tolist()
    both = row_candidate_accuracy(heard_model, builder, clips, SIZE, heard_split="eval", mode="both")
    assert both["n"].tolist() == rows_table["n"].tolist()
    with pytest.raises(ValueError, match="heard bank"):
        row_candidate_accuracy(heard_model, row_builder(heard_model, SIZE), clips, SIZE, heard_split="eval")


def test_heard_pretraining_trains_the_projector_and_ships_it_for_fine_tuning(tmp_path, heard_bank):
    path, bank = heard_bank
    settings = dataclasses.replace(TOY, heard_bank=str(path), heard_share=1.0, both_share=0.5)
    out = tmp_path / "heard"
    trained, metrics = pretrain(toy_config(max_steps=3), settings, out, command="toy heard", log=lambda *_: None)
    log = pd.read_csv(out / "train_log.csv")
    for prefix in ("heard_", "both_"):
        assert f"{prefix}loss/nbi_status" in log.columns and f"{prefix}answer_exact/nbi_status" in log.columns
    evals = pd.read_csv(out / "eval_log.csv")
    assert {"heldout_heard", "eval_split_heard", "heldout_both", "eval_split_both"} <= set(evals["set"])
    assert set(metrics["min_accuracy"]) == {"heldout", "eval_split", "heldout_heard", "eval_split_heard",
                                            "heldout_both", "eval_split_both"}
    assert metrics["heard_bank"]["fingerprint"] == bank.fingerprint
    assert "heard rows" in (out / "MODEL_CARD.md").read_text()
    source = json.loads((out / "projector_source.json").read_text())
    assert source == {"whisper": "tiny.en", "whisper_fingerprint": bank.fingerprint, "audio_pool": 16,
                      "audio_projector": "vocab"}

    fresh = build_model(get_config())
    assert not torch.equal(fresh.projector.linear.weight, trained.projector.linear.weight.cpu())
    load_pretrained_projector(fresh, out)
    assert torch.equal(fresh.projector.linear.weight, trained.projector.linear.weight.cpu())
    with pytest.raises(ValueError, match="audio_pool"):
        load_pretrained_projector(build_model(get_config(audio_pool=8, pretrained_projector=False)), out)
    with pytest.raises(ValueError, match="audio_pool"):  # the preset checks the shipped projector the same way
        build_model(get_config(audio_pool=8))
    with pytest.raises(FileNotFoundError, match="projector_source.json"):
        load_pretrained_projector(fresh, tmp_path)
    with pytest.raises(ValueError, match="only the shipped tiny VLM"):
        load_pretrained_projector(build_model(get_config(vlm_from_scratch=True)), out)

    # pretraining continues that projector on the bank's audio (the encoder there need not be tiny.en); one
    # step at learning rate 0 keeps it as loaded
    again = dataclasses.replace(settings, both_share=0.0, projector_from=str(out))
    continued, _ = pretrain(toy_config(vlm_from_scratch=False, max_steps=1, lr=0.0, projector_lr=0.0), again,
                            tmp_path / "again", command="toy again", log=lambda *_: None)
    assert torch.equal(continued.projector.linear.weight.cpu(), trained.projector.linear.weight.cpu())
    assert "projector continued" in (tmp_path / "again" / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="whisper_fingerprint"):
        load_pretrained_projector(build_model(get_config(pretrained_projector=False)), out, "0" * 16)


def test_heard_share_needs_a_bank(heard_model):
    with pytest.raises(ValueError, match="heard bank"):
        row_builder(heard_model, SIZE, heard_share=0.5)


def test_command_line_takes_config_keys_and_settings_through_p_and_the_card_quotes_that_form(tmp_path):
    import shlex

    from surgvqa.pretrain import parse_args
    from surgvqa.pretrain_report import pretrain_command

    argv = ["--out", "o", "--device", "cpu", "--steps", "7", "--heard-share", "0", "--no-bf16",
            "-p", "max_steps=9", "-p", "lesion_share=0.6", "-p", "vlm_from_scratch=false"]
    args, cfg, settings, given = parse_args(argv)
    assert cfg.max_steps == 9 and settings.lesion_share == 0.6 and not cfg.vlm_from_scratch  # -p wins
    command = pretrain_command(args.out, args.device, given)
    assert command == ("python -m surgvqa pretrain --device cpu --out o -p max_steps=9 -p heard_share=0.0 "
                       "-p bf16=false -p lesion_share=0.6 -p vlm_from_scratch=false")
    assert parse_args(shlex.split(command)[4:])[1:3] == (cfg, settings)
    with pytest.raises(KeyError, match="bogus"):
        parse_args(["--out", "o", "-p", "bogus=1"])
    with pytest.raises(ValueError, match="multiple of 28"):
        main(["--out", str(tmp_path), "--device", "cpu", "-p", "frame_size=100", "-p", "max_steps=1"])


def test_the_model_cards_commands_still_parse():
    import re
    import shlex

    from surgvqa.config import REPO_ROOT
    from surgvqa.pretrain import parse_args

    card = (REPO_ROOT / "checkpoints" / "tiny-phantom" / "MODEL_CARD.md").read_text()
    commands = [" ".join(c.split()) for c in re.findall(r"`(python -m surgvqa pretrain [^`]*)`", card)]
    assert len(commands) == 6
    for command in commands:
        _, cfg, settings, _ = parse_args(shlex.split(command)[4:])
        assert cfg.frame_size == 112 and cfg.batch_size == 64 and settings.lesion_share >= 0.5
