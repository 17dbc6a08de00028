"""Collation: vision patches, placeholder counts, answer-only labels, padding sides, question modes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor

from surgvqa.backbones import AUDIO_TOKEN, IM_END, frames_to_patches
from surgvqa.collate import IGNORE_INDEX, CollateError, Collator
from surgvqa.data import load_template
from surgvqa.model import build_tiny_tokenizer

FRAME_SIZE = 56  # a 4x4 patch grid: 4 vision tokens per image, 16 per 8-frame video


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def feature_extractor():
    return WhisperFeatureExtractor(feature_size=80)


def first_of_types(*types):
    """The first out-template row of each question type, in the order given."""
    by_type = {}
    for s in load_template("out"):
        by_type.setdefault(s.question_type, s)
    return [by_type[t] for t in types]


@pytest.fixture(scope="module")
def samples():
    # different question types, so prompts and answers differ in length
    return first_of_types("mucosa_visibility", "lesion_motion_direction", "tool_identification")


def speech_like(seconds=1.5, rate=16000, base_pitch=120.0):
    """A speech-like signal at a conversational level, as the audio checks accept it: four syllables a
    second with pauses between them, a voice with harmonics whose pitch glides."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = base_pitch + 40 * np.sin(2 * np.pi * 0.7 * t) + 30 * (t % 0.25) / 0.25
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.1 * voice * syllables).astype(np.float32)


def make_items(samples, size=FRAME_SIZE, seconds=(1.0, 1.7, 2.3), seed=0, frames=8):
    rng = np.random.default_rng(seed)
    return [(s, rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
             speech_like(sec, base_pitch=float(rng.uniform(90, 200))))
            for s, sec in zip(samples, seconds)]


def make_collator(tokenizer, feature_extractor, **kw):
    return Collator(tokenizer, feature_extractor, **{"frame_size": FRAME_SIZE, **kw})


def test_image_patches_match_the_stock_qwen2vl_image_processor():
    frames = np.random.default_rng(1).integers(0, 256, (8, 56, 84, 3), dtype=np.uint8)
    patches, grid = frames_to_patches(frames, "images", frame_size=84)
    stock = Qwen2VLImageProcessorPil()(images=list(frames), do_resize=False, return_tensors="pt")
    assert torch.equal(grid, stock["image_grid_thw"])
    torch.testing.assert_close(patches, stock["pixel_values"], atol=1e-5, rtol=1e-5)


def test_video_patches_pair_frames_over_the_temporal_patch():
    # A video whose frames come in equal pairs is, patch for patch, the images of one frame per pair.
    single = np.random.default_rng(2).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    video, video_grid = frames_to_patches(np.repeat(single, 2, axis=0), "video", frame_size=56)
    images, _ = frames_to_patches(np.concatenate([single, single]), "images", frame_size=56)
    assert video_grid.tolist() == [[4, 4, 4]]
    torch.testing.assert_close(video, images[: len(video)])


def test_frames_are_resized_to_the_patch_grid():
    frames = np.zeros((8, 100, 100, 3), dtype=np.uint8)
    _, grid = frames_to_patches(frames, "video", frame_size=64)  # 64 px rounds to 56: 4x4 patches
    assert grid.tolist() == [[4, 4, 4]]


def test_eight_images_have_twice_the_vision_tokens_of_one_video(tokenizer, feature_extractor, samples):
    items = make_items(samples)
    as_video = make_collator(tokenizer, feature_extractor, frames_as="video")(items)
    as_images = make_collator(tokenizer, feature_extractor, frames_as="images")(items)
    video_id, image_id = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    n_video = (as_video["input_ids"] == video_id).sum(dim=1)
    n_image = (as_images["input_ids"] == image_id).sum(dim=1)
    assert n_video.tolist() == [16] * 3 and n_image.tolist() == [32] * 3
    assert (as_video["mm_token_type_ids"] == 2).sum(dim=1).tolist() == n_video.tolist()
    assert (as_images["mm_token_type_ids"] == 1).sum(dim=1).tolist() == n_image.tolist()
    assert as_video["video_grid_thw"].tolist() == [[4, 4, 4]] * 3 and "pixel_values" not in as_video
    assert as_images["image_grid_thw"].tolist() == [[1, 4, 4]] * 24 and "pixel_values_videos" not in as_images
    assert as_video["pixel_values_videos"].shape == (3 * 64, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_audio_placeholders_match_the_real_length_of_the_question(tokenizer, feature_extractor, samples, pool):
    batch = make_collator(tokenizer, feature_extractor, audio_pool=pool)(make_items(samples))
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    lengths = batch["audio_lengths"].tolist()
    # 1.0 s is 100 mel frames, padded up to a whole number of projected tokens; never 3000 (30 s)
    assert lengths[0] == -(-100 // (2 * pool)) * 2 * pool and max(lengths) < 300
    expected = [n // (2 * pool) for n in lengths]  # two mel frames a Whisper frame, pooled by pool
    assert (batch["input_ids"] == audio_id).sum(dim=1).tolist() == expected
    assert batch["audio_features"].shape == (3, 80, max(lengths))


def test_only_the_answer_and_end_of_turn_carry_loss(tokenizer, feature_extractor, samples):
    batch = make_collator(tokenizer, feature_extractor)(make_items(samples))
    for i, s in enumerate(samples):
        kept = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert tokenizer.decode(kept) == s.answer + IM_END
        # the supervised tokens are the last real tokens of the row (right padding after them)
        n_real = int(batch["attention_mask"][i].sum())
        assert torch.equal(batch["input_ids"][i, n_real - len(kept): n_real], kept)
        assert (batch["labels"][i, n_real:] == IGNORE_INDEX).all()
    assert bool(batch["attention_mask"][:, 0].all()), "training batches are right-padded"
    assert not bool(batch["attention_mask"][:, -1].all())


def test_generation_batch_is_left_padded_and_ends_with_the_assistant_header(tokenizer, feature_extractor,
                                                                            samples):
    batch = make_collator(tokenizer, feature_extractor)(make_items(samples), for_generation=True)
    assert "labels" not in batch
    assert bool(batch["attention_mask"][:, -1].all()) and not bool(batch["attention_mask"][:, 0].all())
    for i, s in enumerate(samples):
        text = tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
        assert text.endswith("<|im_start|>assistant\n") and s.answer not in text


def _contains(row: list[int], part: list[int]) -> bool:
    return any(row[i:i + len(part)] == part for i in range(len(row) - len(part) + 1))


@pytest.mark.parametrize("mode", ["audio", "text", "both"])
def test_question_modes(tokenizer, feature_extractor, samples, mode):
    items = make_items(samples)
    if mode == "text":
        items = [(s, f, None) for s, f, _ in items]  # the text mode needs no audio
    batch = make_collator(tokenizer, feature_extractor, question_mode=mode)(items)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    for i, s in enumerate(samples):
        row = batch["input_ids"][i].tolist()
        question_ids = tokenizer(s.question, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(row)
        written = s.question in text and _contains(row, question_ids)
        assert written == (mode != "audio")
        assert (audio_id in row) == (mode != "text")
    if mode == "audio":
        # Beyond the question's own tokens: with the audio placeholders collapsed, every sample's prompt is
        # the same text, so nothing in it can tell the questions apart.
        prompts = set()
        for i in range(len(samples)):
            prompt = batch["input_ids"][i][(batch["labels"][i] == IGNORE_INDEX) & batch["attention_mask"][i].bool()]
            text = tokenizer.decode(prompt)
            prompts.add(text.replace(AUDIO_TOKEN * text.count(AUDIO_TOKEN), AUDIO_TOKEN))
        assert len(prompts) == 1
    assert ("audio_features" in batch) == (mode != "text")


def test_missing_audio_names_the_sample(tokenizer, feature_extractor, samples):
    items = make_items(samples)
    items[1] = (items[1][0], items[1][1], None)
    with pytest.raises(CollateError, match=samples[1].uid):
        make_collator(tokenizer, feature_extractor)(items)


@pytest.mark.parametrize("bad", ["float_frames", "seven_frames", "stereo", "too_long", "float64"])
def test_bad_input_names_the_sample(tokenizer, feature_extractor, samples, bad):
    s, frames, wave = make_items(samples[:1])[0]
    if bad == "float_frames":
        frames = frames.astype(np.float32)
    elif bad == "seven_frames":
        frames = frames[:7]
    elif bad == "stereo":
        wave = np.stack([wave, wave])
    elif bad == "too_long":
        wave = np.zeros(16000 * 16, dtype=np.float32)
    else:
        wave = wave.astype(np.float64)
    with pytest.raises(CollateError, match=s.uid):
        make_collator(tokenizer, feature_extractor)([(s, frames, wave)])


def test_collator_rejects_a_tokenizer_without_the_audio_token(feature_extractor):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")),
                                    pad_token="a")
    with pytest.raises(ValueError, match="special token"):
        Collator(plain, feature_extractor)


def test_answer_text_is_taken_from_the_sample(tokenizer, feature_extractor, samples):
    s = dataclasses.replace(samples[0], answer="Yes, the snare is visible.")
    batch = make_collator(tokenizer, feature_extractor)(make_items([s]))
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "Yes, the snare is visible." + IM_END


def distinct(samples, copies):
    """``copies`` of each sample under new ids (uids differ, so mixed-mode draws do)."""
    import dataclasses

    return [dataclasses.replace(s, id=f"{s.id}-{k}") for k in range(copies) for s in samples]


def test_mixed_mode_draws_a_mode_per_item_and_lists_the_rows_that_hear(tokenizer, feature_extractor, samples):
    samples = distinct(samples, 4)
    items = make_items(samples, seconds=(1.0, 1.7, 2.3) * 4)
    collate = make_collator(tokenizer, feature_extractor, question_mode="mixed", mode_seed=3)
    batch = collate(items)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    hears = [bool((row == audio_id).any()) for row in batch["input_ids"]]
    assert batch["audio_rows"].tolist() == [i for i, h in enumerate(hears) if h]
    assert 0 < sum(hears) < len(items)  # both kinds of item in one batch of 12
    assert len(batch["audio_features"]) == sum(hears)
    again = make_collator(tokenizer, feature_extractor, question_mode="mixed", mode_seed=3)(items)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # the draw is seeded
    reordered = collate(items[::-1])  # an item's mode does not depend on its batch or position
    assert [bool((row == audio_id).any()) for row in reordered["input_ids"]] == hears[::-1]
    collate.reseed(1)
    other = [bool((row == audio_id).any()) for row in collate(items)["input_ids"]]
    assert other != hears  # another key (another epoch) draws again
    for row, s, h in zip(batch["input_ids"], samples, hears):
        text = tokenizer.decode(row)
        # an item that hears its question may also read it ("both"); one that does not must read it
        assert h or s.question in text


def test_the_mixed_mode_draws_each_mode_a_third_of_the_time(tokenizer, feature_extractor):
    collate = make_collator(tokenizer, feature_extractor, question_mode="mixed")
    draws = [collate.item_mode(s) for s in distinct(load_template("out")[:1], 3000)]
    for mode in ("audio", "text", "both"):
        assert draws.count(mode) / len(draws) == pytest.approx(1 / 3, abs=0.03), mode


def test_a_config_saved_with_a_removed_option_loads_only_where_it_behaved_as_today(tmp_path):
    import json

    from surgvqa.config import Config, get_config

    saved = get_config("tiny").save(tmp_path)
    values = json.loads(saved.read_text())
    saved.write_text(json.dumps({**values, "distill_weight": 0.0, "mixed_weights": [1, 1, 1],
                                 "phantom_extra_per_epoch": 0}))
    assert Config.load(tmp_path) == get_config("tiny")
    saved.write_text(json.dumps({**values, "distill_weight": 1.0}))
    with pytest.raises(ValueError, match=r"saved with \{'distill_weight': 1.0\}: options removed after commit"):
        Config.load(tmp_path)


def test_prefetched_batches_are_the_same_batches_in_order_with_threads(tokenizer, feature_extractor, samples):
    from surgvqa.collate import prefetched_batches

    items = make_items(samples * 3, seconds=(1.0, 1.7, 2.3) * 3)
    collate = make_collator(tokenizer, feature_extractor)
    plain = list(prefetched_batches(items, 4, collate))
    threaded = list(prefetched_batches(items, 4, collate, threads=3))
    assert [len(b["samples"]) for b in plain] == [4, 4, 1]
    for a, b in zip(plain, threaded, strict=True):
        assert [s.uid for s in a["samples"]] == [s.uid for s in b["samples"]]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["audio_features"], b["audio_features"])
    assert list(prefetched_batches([], 4, collate, threads=2)) == []
