"""Every backbone generation at tiny shapes (the real architectures, random weights) through the same graft:
prompts with the right placeholders, labels that decode to the answer, the model's own positions, a training
step, both inference paths, and a checkpoint that reloads to the same scores."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from surgvqa import backbones as B
from surgvqa import fastpath, scoring
from surgvqa import inference as I
from surgvqa import model as M
from surgvqa.collate import IGNORE_INDEX

from test_collate import first_of_types, make_items
from test_model import one_torch_thread, tiny_config, whisper  # noqa: F401 (fixtures)

GENERATIONS = [B.QWEN2_VL, B.QWEN2_5_VL, B.QWEN3_VL, B.QWEN2_5_OMNI]
SIZE = 64  # Qwen2-VL / Qwen2.5-VL: 56 px, a 4x4 patch grid; Qwen3-VL: 64 px, 4x4 patches of 16 px


@functools.lru_cache(maxsize=1)
def omni_tokenizer():
    """Qwen2.5-Omni's real tokenizer (rebuilt offline): the tiny tokenizer lacks its own placeholder names."""
    from surgvqa.dryrun import qwen_tokenizer

    return qwen_tokenizer(B.QWEN2_5_OMNI)


@pytest.fixture(scope="module")
def samples():
    return first_of_types("mucosa_visibility", "lesion_motion_direction", "tool_identification")


def graft(backbone: B.Backbone, whisper, **overrides) -> M.AudioGraftedVLM:
    """A tiny model of the backbone: the graft, or, for a model that hears natively, the model itself (with tiny
    Whisper's feature extractor: its tiny audio encoder takes 80 mel bins)."""
    cfg = tiny_config(frame_size=SIZE, **overrides)
    tokenizer = omni_tokenizer() if backbone.hears_natively else M.build_tiny_tokenizer(cfg)
    torch.manual_seed(0)
    vlm = M._apply_training_setup(backbone.model_class(backbone.tiny_config(tokenizer)), cfg)
    if backbone.hears_natively:
        return M.NativeHearingVLM(vlm, tokenizer, whisper[1], cfg)
    return M.AudioGraftedVLM(vlm, whisper[0], tokenizer, whisper[1], cfg, whisper_from_cfg=False)


def train_steps(model: M.AudioGraftedVLM, batch: dict, steps: int) -> list[float]:
    """The losses of ``steps`` AdamW steps on one batch (the adapter, projector and trained output layer)."""
    optimizer = torch.optim.AdamW([g for group in M.parameter_groups(model) for g in group["params"]], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", params=GENERATIONS, ids=lambda b: b.name)
def model(request, whisper):
    return graft(request.param, whisper)


def test_the_graft_asks_its_own_backbone(model):
    assert model.backbone is B.backbone_of(model.base_vlm)
    assert type(model.base_vlm).__name__ == model.backbone.model_class_name


def test_placeholders_labels_and_frame_times(model, samples):
    collate = M.collator(model)
    batch = collate(make_items(samples, size=SIZE))
    vision = model.backbone.vision_placeholder("video")
    vision_id = model.tokenizer.convert_tokens_to_ids(vision)
    grid = batch["video_grid_thw"][0].tolist()
    merge = model.base_vlm.config.vision_config.spatial_merge_size
    assert grid[0] == 4  # 8 frames, 2 a temporal patch
    assert (batch["input_ids"] == vision_id).sum(dim=1).tolist() == [grid[0] * grid[1] * grid[2] // merge ** 2] * 3
    # 1.0, 1.7 and 2.3 s of audio at pool 2: 25, 43 and 58 rows (100, 172, 232 mel frames, padded to a multiple of
    # 4); Omni's encoder halves twice on its own: ((n - 1) // 2 + 1 - 2) // 2 + 1 rows, the same counts here
    assert (batch["input_ids"] == model.audio_token_id).sum(dim=1).tolist() == [25, 43, 58]
    for labels, sample in zip(batch["labels"], samples):
        assert model.tokenizer.decode(labels[labels != IGNORE_INDEX]) == sample.answer + "<|im_end|>"
    prompt = model.tokenizer.decode(batch["input_ids"][0])
    if model.backbone is B.QWEN3_VL:
        # each temporal patch after its time from the clip's start: frames 4 apart in a 25 fps recording
        assert prompt.count("<|vision_start|>") == 1 + grid[0]
        # (0 + 0.16) / 2 s, then 0.4, 0.72 and 1.04 s
        stamps = [f"<{t} seconds><|vision_start|>" for t in ("0.1", "0.4", "0.7", "1.0")]
        assert all(stamp in prompt for stamp in stamps), prompt[:400]
    else:
        assert "seconds>" not in prompt
    if model.backbone in (B.QWEN2_5_VL, B.QWEN2_5_OMNI):
        torch.testing.assert_close(batch["second_per_grid_ts"], torch.full((3,), 2 * 4 / 25, dtype=torch.float32))
    else:
        assert "second_per_grid_ts" not in batch
    if model.backbone.hears_natively:  # the question is the thinker's own audio item, between its audio bounds
        assert prompt.count("<|audio_bos|><|AUDIO|>") == 1 and prompt.count("<|AUDIO|><|audio_eos|>") == 1


def test_packed_attention_gives_what_the_stock_towers_compute(model):
    """Every tower that attends within slices of a packed sequence gives the stock (one call a slice) output on
    packed attention, one call a layer, for slices of one length and of several (Qwen2.5-VL's edge windows, clips
    of two sizes, questions of two lengths)."""
    base, counters = model.base_vlm, M.register_packed_attention()
    visual = base.model.visual
    side = visual.config.patch_size
    runs = {"equal clips": torch.tensor([[2, 4, 4], [2, 4, 4]]), "unequal clips": torch.tensor([[2, 6, 4], [2, 4, 4]])}
    runs = {name: functools.partial(lambda g: visual(torch.randn(int(g.prod(1).sum()), 3 * 2 * side * side,
                                                                 generator=torch.Generator().manual_seed(0)),
                                                     grid_thw=g).pooler_output, grid)
            for name, grid in runs.items()}
    if model.backbone.hears_natively:
        mel = torch.randn(2, 80, 300, generator=torch.Generator().manual_seed(1))
        mask = (torch.arange(300)[None] < torch.tensor([[300], [180]])).long()
        runs["questions of two lengths"] = lambda: base.model.get_audio_features(
            mel, feature_attention_mask=mask).last_hidden_state
    assert model.backbone.packed_towers(base)[0].config._attn_implementation == M.PACKED_ATTENTION  # by default
    try:
        for name, run in runs.items():
            with torch.no_grad():
                M.set_packed_attention(base, "sdpa")
                stock = run()
                M.set_packed_attention(base, M.PACKED_ATTENTION)
                calls, padded = counters.packed_calls, counters.padded_calls
                packed = run()
            torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-5, msg=name)
            assert counters.packed_calls > calls, name
            if name != "equal clips":
                assert counters.padded_calls > padded, name  # slices of several lengths went through the padding
    finally:
        M.set_packed_attention(base, M.PACKED_ATTENTION)


def test_a_saved_model_never_names_the_packed_attention(model, tmp_path):
    """It is the project's own registered function: a folder another loader reads must not ask for it."""
    model.base_vlm.save_pretrained(tmp_path)
    assert M.PACKED_ATTENTION not in (tmp_path / "config.json").read_text()


def test_the_native_model_hears_as_the_stock_thinker_does(samples):
    """The natively hearing model's prompt (its own audio encoder's rows in the embeddings, the seam's positions)
    gives what the stock thinker computes by itself from the log-mels and their mask."""
    model = graft(B.QWEN2_5_OMNI, (None, M.WhisperFeatureExtractor(feature_size=80)))
    batch = M.collator(model)(make_items(samples, size=SIZE), for_generation=True)
    base = model.base_vlm
    mask = (torch.arange(batch["audio_features"].shape[-1])[None] < batch["audio_lengths"][:, None]).long()
    with torch.no_grad():
        pre = scoring.prefill(model, batch)
        own = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         input_features=batch["audio_features"], feature_attention_mask=mask,
                         pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                         video_second_per_grid=batch["second_per_grid_ts"], use_cache=False)
        first = torch.log_softmax(base.lm_head(own.last_hidden_state[:, -1]).float(), dim=-1)
    torch.testing.assert_close(pre.first, first, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="give it log-mels, not cached Whisper outputs"):
        model.audio_rows(torch.zeros(1, 10, 64), torch.tensor([20]), encoded=True)
    short = dict(batch, audio_lengths=batch["audio_lengths"] - 8)  # rows that no longer match the placeholders
    with pytest.raises(M.AudioTokenMismatch, match="sample 002-003/qa_000001: 25 audio placeholder tokens"):
        scoring.prefill(model, short)


def test_a_full_omni_checkpoint_loads_its_thinker_alone(tmp_path, caplog):
    """A Qwen2.5-Omni folder as published (one config with the thinker's inside, weights under ``thinker.`` beside
    the talker's and token2wav's) loads as its thinker: the thinker's weights, nothing else read, no warning."""
    import json
    import logging

    from safetensors.torch import save_file

    tokenizer = omni_tokenizer()
    torch.manual_seed(0)
    thinker = B.QWEN2_5_OMNI.model_class(B.QWEN2_5_OMNI.tiny_config(tokenizer))
    state = {f"thinker.{k}": v.contiguous() for k, v in thinker.state_dict().items()}
    state.update({"talker.model.embed_tokens.weight": torch.zeros(8, 4), "token2wav.proj.weight": torch.zeros(4, 4)})
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    # the published layout: the thinker's config inside the whole model's, beside the talker's (here cut short)
    full = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"],
            "enable_audio_output": True, "thinker_config": thinker.config.to_dict(),
            "talker_config": {"model_type": "qwen2_5_omni_talker", "vocab_size": 8448}}
    (tmp_path / "config.json").write_text(json.dumps(full))
    tokenizer.save_pretrained(str(tmp_path))
    cfg = tiny_config(frame_size=SIZE, vlm=str(tmp_path), vlm_from_scratch=False)
    assert M._checkpoint_backbone(str(tmp_path), cfg, native=True) is B.QWEN2_5_OMNI
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = M._load_vlm(str(tmp_path), cfg)
    assert type(loaded) is B.QWEN2_5_OMNI.model_class and not hasattr(loaded, "talker")
    assert [r.getMessage() for r in caplog.records] == []
    for name, value in thinker.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_sixteen_frames_double_the_temporal_patches_and_their_times(model, samples):
    collate = dataclasses.replace(M.collator(model), clip_frames=16)
    batch = collate(make_items(samples, size=SIZE, frames=16))
    grid = batch["video_grid_thw"][0].tolist()
    assert grid[0] == 8  # 16 frames, 2 a temporal patch
    merge = model.base_vlm.config.vision_config.spatial_merge_size
    vision_id = model.tokenizer.convert_tokens_to_ids(model.backbone.vision_placeholder("video"))
    assert (batch["input_ids"] == vision_id).sum(dim=1).tolist() == [grid[0] * grid[1] * grid[2] // merge ** 2] * 3
    if model.backbone is B.QWEN2_5_VL:  # a temporal patch now spans 2 frames 2 apart in a 25 fps recording
        torch.testing.assert_close(batch["second_per_grid_ts"], torch.full((3,), 2 * 2 / 25, dtype=torch.float32))
    if model.backbone is B.QWEN3_VL:
        assert model.tokenizer.decode(batch["input_ids"][0]).count("<|vision_start|>") == 1 + grid[0]
    with pytest.raises(Exception, match="frames must be uint8 \\(16, H, W, 3\\)"):
        collate(make_items(samples, size=SIZE))
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_positions_are_the_models_own(model, samples):
    """The plain path's prompt (the seam's positions, the audio-ready embeddings) is what the stock model computes
    by itself from the ids of a written question."""
    collate = dataclasses.replace(M.collator(model), question_mode="text")
    batch = collate(make_items(samples, size=SIZE), for_generation=True)
    base = model.base_vlm
    with torch.no_grad():
        pre = scoring.prefill(model, batch)
        own = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False, **model.backbone.vision_inputs(batch))
        first = torch.log_softmax(base.lm_head(own.last_hidden_state[:, -1]).float(), dim=-1)
    torch.testing.assert_close(pre.first, first, atol=1e-5, rtol=1e-5)


def test_a_training_step_moves_the_adapter_and_the_projector(whisper, samples):
    for backbone in GENERATIONS:
        model = graft(backbone, whisper)
        losses = train_steps(model, M.collator(model)(make_items(samples, size=SIZE)), 4)
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (backbone.name, losses)
        if backbone.hears_natively:  # its own audio encoder stays frozen, as the graft's Whisper does
            audio = [p for n, p in model.base_vlm.named_parameters() if "audio_tower" in n]
            assert audio and not any(p.requires_grad or p.grad is not None for p in audio)
            assert any(p.grad is not None for n, p in model.vlm.named_parameters() if "lora_" in n)
            continue
        assert model.projector.linear.weight.grad is not None and not any(
            p.grad is not None for p in model.whisper.parameters())


def test_both_paths_and_a_reloaded_checkpoint_score_alike(model, samples, tmp_path):
    batch = M.collator(model)(make_items(samples, size=SIZE), for_generation=True)
    answers, scored = I.answer_and_score(model, batch, max_new_tokens=6)
    alone = I.score_candidates(model, batch)
    assert [s.label for s in scored] == [s.label for s in alone]
    assert all(abs(sum(s.probabilities.values()) - 1) < 1e-9 for s in scored)
    with torch.no_grad():  # the CUDA fast path's computation, graphs off
        fast_answers, fast_scores = fastpath.answer_and_score(model, batch, 6, use_graph=False)
    assert fast_answers == answers
    for a, b in zip(scored, fast_scores):
        for label in a.log_likelihoods:
            assert abs(a.log_likelihoods[label] - b.log_likelihoods[label]) < 1e-3
    M.save_checkpoint(model, tmp_path / "run")
    reloaded = M.load_checkpoint(tmp_path / "run")
    assert reloaded.backbone is model.backbone
    again = I.score_candidates(reloaded, batch)
    for a, b in zip(alone, again):
        for label in a.log_likelihoods:
            assert abs(a.log_likelihoods[label] - b.log_likelihoods[label]) < 1e-4


def test_the_demo_answers_a_heard_question_of_any_type(model, samples):
    """Notebook 07's demo path: the question heard about the clip, its type unknown to the prompt; the model's
    answer names a question type, a label of that type and how sure it is of each."""
    from surgvqa.data import label_sets
    from surgvqa.widgets import model_answerer

    items = make_items(samples[:1], size=SIZE)
    answer = model_answerer(model, model.cfg, lambda sample: items[0][1])(samples[0], items[0][2])
    assert answer.label in label_sets(model.cfg)[answer.question_type]
    assert 0 < answer.confidence <= 1 and 0 < answer.type_confidence <= 1


def test_the_demos_every_type_scoring_in_groups_answers_as_all_at_once(model, samples, monkeypatch):
    """A heard question of unknown type scores every answer sentence of every type; in groups of a few rows (each
    on its own copy of the prompt's cache) the answers and their confidences are those of scoring all at once."""
    batch = M.collator(model)(make_items(samples, size=SIZE), for_generation=True)
    monkeypatch.setattr(I, "ALL_TYPES_GROUP", 10 ** 6)
    at_once = I.answer_any_question(model, batch, max_new_tokens=4)
    monkeypatch.setattr(I, "ALL_TYPES_GROUP", 7)
    grouped = I.answer_any_question(model, batch, max_new_tokens=4)
    for a, b in zip(at_once, grouped):
        assert (a.question_type, a.label, a.text) == (b.question_type, b.label, b.text)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
        assert a.type_confidence == pytest.approx(b.type_confidence, abs=1e-4)


def test_the_demos_question_floor_is_measured_on_heard_questions(samples, whisper, tmp_path):
    """The floor the demo answers above: the type confidence that 95 % of the correctly understood heard questions
    reach, with how many were understood and how many the floor would leave unanswered."""
    import pandas as pd

    from surgvqa.files import write_wav_atomic
    from test_collate import speech_like

    model = graft(B.QWEN2_VL, whisper)
    paths = {}
    for i, s in enumerate(samples):
        paths[s.uid] = f"q{i}.wav"
        write_wav_atomic(tmp_path / paths[s.uid], speech_like(1.0 + 0.5 * i), 16000)
    cfg = model.cfg.replace(audio_dir=str(tmp_path))
    manifest = pd.DataFrame({"uid": list(paths), "path": list(paths.values())})
    floor = I.question_confidence_floor(model, samples, manifest, cfg, batch_size=2)
    assert floor.n == 3 and floor.share == 0.95 and 0 <= floor.understood <= 1 and 0 <= floor.refused_below <= 1
    assert 0 < floor.floor <= 1
    with pytest.raises(ValueError, match="no heard questions"):
        I.question_confidence_floor(model, samples, manifest.iloc[:0], cfg)


def test_kept_clip_vision_answers_as_the_tower_does_and_runs_it_once_a_clip(model, samples):
    """05 and 08 ask about the same clips in several passes: with the clips' vision outputs kept, a second pass (in
    another order, another question mode) runs the vision tower for no clip it has seen, and every pass answers and
    scores as the stock path that runs the tower each time."""
    import copy

    items = make_items(samples, size=SIZE)
    first = M.collator(model)(items, for_generation=True)
    again = M.collator(model)(list(reversed(items)) + items[:1], for_generation=True)  # a clip twice in a batch
    stock = [I.answer_and_score(model, b, max_new_tokens=6) for b in (first, again)]
    keeping = copy.copy(model)  # the same modules, its own kept outputs
    kept = scoring.keep_clip_vision(keeping)
    calls = []
    hook = model.backbone.packed_towers(model.base_vlm)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        reused = [I.answer_and_score(keeping, b, max_new_tokens=6) for b in (first, again)]
    finally:
        hook.remove()
    assert kept.computed == len({s.clip_key for s in samples}) and len(calls) == 1
    for (answers, scores), (answers_kept, scores_kept) in zip(stock, reused):
        assert answers_kept == answers
        for a, b in zip(scores, scores_kept):
            assert a.label == b.label
            for label in a.log_likelihoods:
                assert abs(a.log_likelihoods[label] - b.log_likelihoods[label]) < 1e-4
    assert model.clip_vision is None


def test_kept_clip_vision_is_refused_where_an_adapter_reaches_the_vision_tower(whisper):
    adapted = graft(B.QWEN2_VL, whisper)
    tower = adapted.backbone.packed_towers(adapted.base_vlm)[0]
    tower.add_module("lora_A", torch.nn.Identity())
    with pytest.raises(ValueError, match="adapter layers"):
        scoring.keep_clip_vision(adapted)
