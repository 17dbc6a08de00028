import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from surgvqa import frames, get_config
from surgvqa.collate import IGNORE_INDEX, IM_END, VIDEO_TOKEN, frames_to_patches
from surgvqa.data import FRAMES_PER_CLIP
from surgvqa.model import build_model, collator, load_checkpoint
from surgvqa.pretrain import (EQUAL_SEGMENT_ATTENTION, PhantomConversations, PretrainSettings, clip_frames,
                              conversation_builder, conversation_token_losses, main, pretrain,
                              register_equal_segment_attention, video_patches)

SIZE = 56  # 2 x 2 merged vision tokens per temporal slice: fast, and still a real video grid
# heldout seed 3: its first clips carry both motion questions, so the single-frame control has rows
TOY = PretrainSettings(frame_size=SIZE, batch_size=4, steps=6, lr=3e-3, warmup_steps=2, num_workers=0,
                       heldout_seed=3, heldout_clips=2, eval_rows=6, eval_every=100, log_every=1,
                       eval_batch_size=32)


@pytest.fixture(scope="module")
def model():
    return build_model(get_config(question_mode="text", frame_size=SIZE))


@pytest.fixture(scope="module")
def builder(model):
    return conversation_builder(model, SIZE)


@pytest.fixture(scope="module")
def clips():
    return frames.random_clip_samples(3, seed=5)


def test_first_turn_is_the_collators_single_turn_prompt(model, builder, clips):
    text_collator = dataclasses.replace(collator(model), question_mode="text", frame_size=SIZE)
    state, samples = clips[0]
    clip = clip_frames(state, SIZE, 0, single_frame=False)
    firsts = []
    for s in samples:
        for wordings in builder.wordings.values():
            reworded = dataclasses.replace(s, question=wordings[s.question_type])
            single = text_collator([(reworded, clip, None)], for_generation=True)["input_ids"][0].tolist()
            assert builder.first_turn(reworded.question) == single
            firsts.append(single)
    conversation = builder.conversation(samples, np.random.default_rng(0))
    first = next(f for f in firsts if conversation.ids[: len(f)] == f)
    assert conversation.labels[: len(first)] == [IGNORE_INDEX] * len(first)
    assert conversation.answers[0][1] == len(first)


def test_labels_decode_to_exactly_the_answers_and_end_of_turn_tokens(builder, clips):
    tok = builder.tokenizer
    for _, samples in clips:
        conversation = builder.conversation(samples, np.random.default_rng(1))
        labelled = [t for t in conversation.labels if t != IGNORE_INDEX]
        decoded = tok.decode(labelled).split(IM_END)[:-1]
        assert sorted(decoded) == sorted(s.answer for s in samples)
        assert labelled.count(tok.convert_tokens_to_ids(IM_END)) == len(samples)
        assert tok.convert_tokens_to_ids(VIDEO_TOKEN) not in labelled
        # every question appears in the unlabelled part, in one of the two wordings, exactly once per turn
        prompt_text = tok.decode([t for t, l in zip(conversation.ids, conversation.labels) if l == IGNORE_INDEX])
        assert prompt_text.count("Question: ") == len(samples)
        for s in samples:
            assert any(w[s.question_type] in prompt_text for w in builder.wordings.values())
            assert s.answer not in prompt_text


def test_conversation_is_the_chat_template_rendering_of_all_turns(builder, clips):
    _, samples = clips[0]
    rng = np.random.default_rng(2)
    conversation = builder.conversation(samples, rng)
    text = builder.tokenizer.decode(conversation.ids)
    questions = [q.split("\n")[0] for q in text.split("Question: ")[1:]]
    answers = builder.tokenizer.decode([t for t in conversation.labels if t != IGNORE_INDEX]).split(IM_END)[:-1]
    messages = []
    for turn, (q, a) in enumerate(zip(questions, answers)):
        messages += [builder.user_message(q, with_video=turn == 0), {"role": "assistant", "content": a}]
    expected = builder.tokenizer.apply_chat_template(messages, tokenize=False)
    expected = expected.replace(VIDEO_TOKEN, VIDEO_TOKEN * builder.vision_tokens)
    assert text == expected.rstrip("\n")


def test_batch_positions_patches_and_label_index_match_the_stock_model(model, builder, clips):
    settings = dataclasses.replace(TOY, batch_size=3, lesion_share=0.0)
    batch = PhantomConversations(builder, settings, model.cfg).batch(0)
    base = model.base_vlm
    mask = (batch["input_ids"] != builder.pad_id).long()  # the pad token never occurs inside a conversation
    grid = torch.tensor([[FRAMES_PER_CLIP // 2, SIZE // 14, SIZE // 14]] * 3)
    stock, _ = base.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], video_grid_thw=grid,
                                         attention_mask=mask)
    real = mask.bool().unsqueeze(0).expand(3, -1, -1)
    assert torch.equal(batch["position_ids"][real], stock[real])
    patches = torch.cat([frames_to_patches(c.numpy(), "video", SIZE)[0] for c in batch["frames"]])
    assert torch.allclose(video_patches(batch["frames"]), patches, atol=1e-6)
    # the flat label index picks the positions whose next token is a label
    flat_next = batch["input_ids"][:, 1:].reshape(-1)
    assert torch.equal(flat_next[batch["label_positions"]], batch["label_targets"])


def test_equal_segment_vision_attention_matches_stock_sdpa(model):
    register_equal_segment_attention()
    visual = model.base_vlm.model.visual
    grid = torch.tensor([[4, 4, 4]] * 3)
    patches = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        stock = visual(patches, grid_thw=grid).pooler_output
        visual.config._attn_implementation = EQUAL_SEGMENT_ATTENTION
        try:
            batched = visual(patches, grid_thw=grid).pooler_output
            with pytest.raises(ValueError, match="do not tile"):
                visual(patches[:32 + 64], grid_thw=torch.tensor([[2, 4, 4], [2, 4, 8]]))
        finally:
            visual.config._attn_implementation = "sdpa"
    assert torch.allclose(stock, batched, atol=1e-5)


def test_single_frame_control_repeats_frame_zero(clips):
    state = clips[0][0]
    clip = clip_frames(state, SIZE, 0, single_frame=False)
    still = clip_frames(state, SIZE, 0, single_frame=True)
    assert still.shape == clip.shape and not np.array_equal(clip[0], clip[-1])
    assert all(np.array_equal(frame, clip[0]) for frame in still)


def test_toy_pretraining_lowers_the_loss_and_saves_a_reloadable_checkpoint(tmp_path, builder):
    out = tmp_path / "pretrained"
    trained, metrics = pretrain(get_config(), TOY, out, command="toy", log=lambda *_: None)
    log = pd.read_csv(out / "train_log.csv")
    assert len(log) == TOY.steps and log["train_loss"].iloc[-2:].mean() < log["train_loss"].iloc[:2].mean() - 0.5
    assert {"data_wait_ms", "forward_ms", "backward_ms", "optimizer_ms", "answer_exact/nbi_status"} <= set(log.columns)
    evals = pd.read_csv(out / "eval_log.csv")
    assert set(evals["set"]) == {"heldout", "eval_split", "heldout_single_frame"}
    assert set(evals[evals["set"] == "heldout_single_frame"]["question_type"]) == {"lesion_motion_direction",
                                                                                   "scope_motion_type"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == TOY.steps == metrics["steps"] and saved["settings"]["frame_size"] == SIZE
    card = (out / "MODEL_CARD.md").read_text()
    assert "toy" in card and "| nbi_status |" in card and "curves.png" in card and (out / "curves.png").is_file()
    assert (out / "vlm" / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 25 * 2 ** 20

    reloaded = load_checkpoint(out)
    assert reloaded.cfg.frame_size == SIZE and reloaded.cfg.question_mode == "text"
    batch = PhantomConversations(builder, dataclasses.replace(TOY, batch_size=2), reloaded.cfg).batch(7)
    reloaded.base_vlm.model.visual.config._attn_implementation = EQUAL_SEGMENT_ATTENTION
    trained.eval()
    with torch.no_grad():
        _, before = conversation_token_losses(trained, batch)
        _, after = conversation_token_losses(reloaded.eval(), batch)
    assert torch.equal(before, after)


def test_command_line_rejects_a_frame_size_that_would_be_resized(tmp_path):
    with pytest.raises(ValueError, match="multiple of 28"):
        main(["--out", str(tmp_path), "--device", "cpu", "--frame-size", "100", "--steps", "1"])
