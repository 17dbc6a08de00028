"""Collation: chat prompt with placeholders, placeholder expansion, answer-only loss, batching.

One item is ``(Sample, frames, waveform)``: frames are uint8 ``(8, H, W, 3)``, the waveform is float32 mono
at 16 kHz (``None`` allowed in the ``text`` question mode only). The prompt is built with the tokenizer's
chat template (the backbone's), then every placeholder is expanded to the number of rows that will replace it
(as the checkpoint's own processor does): ``<|video_pad|>`` / ``<|image_pad|>`` to the vision tokens of the clip and
``<|audio_pad|>`` to the projected Whisper frames of the question. The model checks those counts again.

Question modes: ``audio`` (the question is heard only; its text appears nowhere in the prompt),
``text`` (written question, no audio), ``both``, and ``mixed`` for training: each item draws one of the
three (seeded), so one set of weights can be evaluated under every mode. In a batch only the items that
hear their question carry audio rows; ``audio_rows`` lists them.

Training batches are right-padded and carry ``labels`` (-100 everywhere except the answer tokens and the
end-of-turn token); generation batches are left-padded, end with the assistant header and carry no labels.

The items come from ``surgvqa.features.QADataset``, with an ``EncodedQuestion`` in place of the waveform where
the question's audio is read from the cache of encoder outputs.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import backbones
from .backbones import AUDIO_TOKEN, IM_END, IMAGE_TOKEN, VIDEO_TOKEN, Backbone
from .config import Config
from .data import FRAMES_PER_CLIP, Sample, video_frame_rates

IGNORE_INDEX = -100  # label value that carries no loss (torch cross_entropy's default ignore_index)

# Whisper: 160 waveform samples per mel frame (10 ms at 16 kHz), two mel frames per encoder frame (conv2
# stride 2), and a 30 s window (3000 mel frames) that positions cannot exceed.
SAMPLE_RATE = 16000
HOP_LENGTH = 160
MEL_FRAMES_PER_ENCODER_FRAME = 2
WHISPER_WINDOW_S = 30.0

# Prompt wording. In the audio mode nothing of the question is written: only where the audio goes.
SPOKEN_QUESTION = "Spoken question: " + AUDIO_TOKEN
WRITTEN_QUESTION = "Question: {question}"
INSTRUCTION = "Answer the question about this colonoscopy clip in one sentence."
ITEM_MODES = ("audio", "text", "both")
TRAIN_DRAWS, EVAL_DRAWS = 0, 1  # keys of the mixed mode's draws: a training epoch's, every evaluation's


@dataclass(frozen=True)
class EncodedQuestion:
    """A question's audio already through the frozen Whisper encoder, ``(encoder frames, d_model)`` float32
    (``features.cache_encoded_audio``); it stands in an item where the waveform would."""

    frames: np.ndarray


class CollateError(ValueError):
    """An item cannot be collated; the message names the sample (uid and annotation source)."""


@dataclass
class Collator:
    """Turns ``(Sample, frames, waveform)`` items into model batches; see the module docstring."""

    tokenizer: Any  # a tokenizer with the backbone's special tokens, AUDIO_TOKEN and chat template
    feature_extractor: Any  # a WhisperFeatureExtractor (log-mel features)
    backbone: Backbone = backbones.TINY  # how a clip becomes vision inputs
    question_mode: str = "audio"
    mode_seed: int = 0  # seeds the per-item draw of the mixed mode
    frames_as: str = "video"
    clip_frames: int = FRAMES_PER_CLIP
    frame_size: int = 224
    audio_pool: int = 2
    min_audio_s: float = 0.3
    max_audio_s: float = 15.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    # each recording's frame rate, for the backbones that need a clip's frame times (data.video_frame_rates)
    video_fps: dict[str, float] | None = None

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: Any, feature_extractor: Any, **vision: int) -> "Collator":
        return cls(tokenizer, feature_extractor, question_mode=cfg.question_mode, mode_seed=cfg.seed,
                   frames_as=cfg.frames_as, clip_frames=cfg.clip_frames,
                   frame_size=cfg.frame_size, audio_pool=cfg.audio_pool, min_audio_s=cfg.min_audio_s,
                   max_audio_s=min(cfg.max_audio_s, WHISPER_WINDOW_S), video_fps=video_frame_rates(cfg), **vision)

    def __post_init__(self) -> None:
        if self.question_mode not in (*ITEM_MODES, "mixed"):
            raise ValueError(f"question_mode {self.question_mode!r}: must be audio, text, both or mixed")
        self.draw_key: tuple[int, ...] = ()
        if self.frames_as not in ("video", "images"):
            raise ValueError(f"frames_as {self.frames_as!r}: must be video or images")
        vocab = self.tokenizer.get_vocab()
        # the roles of the prompt's special tokens, and the backbone's own token for each
        roles = {IM_END: IM_END, IMAGE_TOKEN: self.backbone.vision_placeholder("images"),
                 VIDEO_TOKEN: self.backbone.vision_placeholder("video"), AUDIO_TOKEN: self.backbone.audio_placeholder}
        missing = [t for t in (*roles.values(), *self.backbone.audio_bounds) if t and t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the special token(s) {missing}")
        self.token_ids = {role: vocab[token] for role, token in roles.items()}
        before, after = self.backbone.audio_bounds
        self.spoken_question = SPOKEN_QUESTION.replace(AUDIO_TOKEN, before + self.backbone.audio_placeholder + after)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")

    def reseed(self, *key: int) -> None:
        """Key the mixed mode's draws by ``key`` (training: the epoch; evaluation: one key for every pass)."""
        self.draw_key = tuple(key)

    def item_mode(self, sample: Sample) -> str:
        """The question mode of an item: the collator's own, or, when ``mixed``, a draw that depends on
        (mode_seed, draw_key, the sample's uid) alone, so it is the same whatever the batch, the order, the
        worker process that collates it, or the batches a resumed run skips without collating."""
        if self.question_mode != "mixed":
            return self.question_mode
        digest = int.from_bytes(hashlib.sha256(sample.uid.encode()).digest()[:8], "little")
        rng = np.random.default_rng([self.mode_seed, *self.draw_key, digest])
        # the three modes equally likely, drawn through the same probabilities as every earlier run
        return ITEM_MODES[int(rng.choice(len(ITEM_MODES), p=np.full(len(ITEM_MODES), 1 / len(ITEM_MODES))))]

    # --- pieces of one item ---------------------------------------------------------------------------

    def messages(self, sample: Sample, mode: str | None = None, with_frames: bool = True) -> list[dict]:
        """The user turn: the clip first, then the question (heard, written or both), then the instruction;
        without frames (projector alignment), the question and the instruction alone."""
        visual = [{"type": "video"}] if self.frames_as == "video" else [{"type": "image"}] * self.clip_frames
        visual = visual if with_frames else []
        question = {
            "audio": self.spoken_question,
            "text": WRITTEN_QUESTION.format(question=sample.question),
            "both": self.spoken_question + "\n" + WRITTEN_QUESTION.format(question=sample.question),
        }[mode or self.question_mode]
        return [{"role": "user", "content": visual + [{"type": "text", "text": question + "\n" + INSTRUCTION}]}]

    def frame_seconds(self, sample: Sample) -> list[float] | None:
        """When each frame of the sample's clip was taken, in seconds into its recording (None where the backbone
        does not use it)."""
        if not self.backbone.needs_frame_times:
            return None
        if self.video_fps is None:
            raise CollateError(f"sample {sample.uid}: {self.backbone.name} needs the clip's frame times: give the "
                               f"collator the recordings' frame rates (video_fps)")
        if sample.video_id not in self.video_fps:
            raise CollateError(f"sample {sample.uid} ({sample.source}): no frame rate for video {sample.video_id} "
                               f"in the data's video_info.csv")
        return [n / self.video_fps[sample.video_id] for n in sample.clip_frames(self.clip_frames)[1]]

    def prompt(self, sample: Sample, vision_tokens_each: int, audio_tokens: int, mode: str | None = None,
               with_frames: bool = True) -> str:
        """The chat prompt up to the assistant header, with every placeholder expanded to its row count."""
        mode = mode or self.question_mode
        text = self.tokenizer.apply_chat_template(self.messages(sample, mode, with_frames), tokenize=False,
                                                  add_generation_prompt=True)
        if with_frames:
            text = self.backbone.expand_vision(text, self.frames_as, vision_tokens_each, self.frame_seconds(sample),
                                               self.temporal_patch_size)
        placeholder = self.backbone.audio_placeholder
        n_audio = text.count(placeholder)
        if n_audio != (1 if mode in ("audio", "both") else 0):
            raise CollateError(f"sample {sample.uid}: the prompt holds {n_audio} audio placeholders")
        return text.replace(placeholder, placeholder * audio_tokens)

    def check_frames(self, sample: Sample, frames: Any) -> np.ndarray:
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[0] != self.clip_frames or frames.shape[-1] != 3:
            got = f"{type(frames).__name__} {getattr(frames, 'dtype', '')} {getattr(frames, 'shape', '')}"
            raise CollateError(f"sample {sample.uid} ({sample.source}): frames must be uint8 "
                               f"({self.clip_frames}, H, W, 3), got {got}")
        return frames

    def log_mel(self, sample: Sample, waveform: Any) -> torch.Tensor:
        """Log-mel features of the real length of the question, (n_mels, T) with T a multiple of 2 * pool.

        The waveform is zero-padded to a whole number of projected audio tokens, never to Whisper's 30 s.
        """
        if waveform is None:
            raise CollateError(f"sample {sample.uid} ({sample.source}): no question audio, and the "
                               f"{self.question_mode!r} question mode needs it")
        wave = np.asarray(waveform)
        if wave.ndim != 1 or wave.dtype != np.float32 or not np.isfinite(wave).all():
            raise CollateError(f"sample {sample.uid}: the waveform must be finite mono float32, got "
                               f"{wave.dtype} {wave.shape}")
        seconds = len(wave) / SAMPLE_RATE
        if not self.min_audio_s <= seconds <= self.max_audio_s:
            raise CollateError(f"sample {sample.uid}: question audio of {seconds:.2f} s is outside "
                               f"[{self.min_audio_s}, {self.max_audio_s}] s (is it 16 kHz?)")
        per_token = HOP_LENGTH * MEL_FRAMES_PER_ENCODER_FRAME * self.audio_pool
        wave = np.pad(wave, (0, -len(wave) % per_token))
        features = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, padding="do_not_pad",
                                          return_tensors="pt")["input_features"][0]
        return features

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's ``mm_token_type_ids``: 0 text, 1 image placeholder, 2 video placeholder."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.token_ids[IMAGE_TOKEN]] = 1
        types[input_ids == self.token_ids[VIDEO_TOKEN]] = 2
        return types

    def check_encoded(self, sample: Sample, frames: Any) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 2 or frames.dtype != np.float32 or len(frames) % self.audio_pool or not len(frames):
            raise CollateError(f"sample {sample.uid}: cached encoder output must be float32 (frames, d_model) "
                               f"with frames a multiple of audio_pool {self.audio_pool}, got "
                               f"{frames.dtype} {frames.shape}")
        return frames

    # --- the batch ------------------------------------------------------------------------------------

    def __call__(self, items: Sequence[tuple[Sample, np.ndarray, np.ndarray | None]],
                 for_generation: bool = False) -> dict[str, Any]:
        """Collate items into a batch: right-padded with labels, or left-padded prompts for generation."""
        if not items:
            raise CollateError("cannot collate an empty list of items")
        rows, label_rows, pixel_list, grid_list, mels, encoded, audio_rows = [], [], [], [], [], [], []
        clip_inputs: dict[str, list] = {}
        im_end = self.token_ids[IM_END]
        for index, item in enumerate(items):
            if len(item) != 3:
                raise CollateError(f"an item must be (Sample, frames, waveform), got {len(item)} fields")
            sample, frames, waveform = item
            patches, grid = self.backbone.clip_inputs(self.check_frames(sample, frames), self.frames_as,
                                                      self.frame_size, self.patch_size, self.temporal_patch_size,
                                                      self.merge_size)
            pixel_list.append(patches)
            grid_list.append(grid)
            for key, value in self.backbone.clip_batch_inputs(self.frames_as, self.frame_seconds(sample),
                                                              self.temporal_patch_size).items():
                clip_inputs.setdefault(key, []).append(value)
            vision_tokens_each = int(grid[0].prod()) // self.merge_size ** 2
            audio_tokens, mode = 0, self.item_mode(sample)
            if mode in ("audio", "both"):
                if isinstance(waveform, EncodedQuestion):
                    encoded.append(self.check_encoded(sample, waveform.frames))
                    mel_frames = MEL_FRAMES_PER_ENCODER_FRAME * encoded[-1].shape[0]
                else:
                    mels.append(self.log_mel(sample, waveform))
                    mel_frames = mels[-1].shape[-1]
                audio_rows.append(index)
                audio_tokens = self.backbone.audio_tokens(mel_frames, self.audio_pool)
            prompt_ids = self.tokenizer(self.prompt(sample, vision_tokens_each, audio_tokens, mode),
                                        add_special_tokens=False)["input_ids"]
            if for_generation:
                rows.append(prompt_ids)
                continue
            # The answer is tokenised on its own so that its tokens are the same ones generation and
            # candidate scoring see after the assistant header.
            answer_ids = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [im_end]
            rows.append(prompt_ids + answer_ids)
            label_rows.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)

        batch: dict[str, Any] = {}
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_token_id, left=for_generation)
        batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
        if not for_generation:
            batch["labels"] = pad_rows(label_rows, IGNORE_INDEX, left=False)[0]
        batch["mm_token_type_ids"] = self.token_types(input_ids)
        prefix = "pixel_values_videos" if self.frames_as == "video" else "pixel_values"
        grid_key = "video_grid_thw" if self.frames_as == "video" else "image_grid_thw"
        batch[prefix], batch[grid_key] = torch.cat(pixel_list), torch.cat(grid_list)
        batch.update({key: torch.tensor(values) for key, values in clip_inputs.items()})
        if mels and encoded:
            raise CollateError("a batch mixes waveforms and cached encoder outputs; give it one kind")
        if mels:
            lengths = torch.tensor([m.shape[-1] for m in mels], dtype=torch.long)
            features = torch.zeros(len(mels), mels[0].shape[0], int(lengths.max()))
            for i, mel in enumerate(mels):
                features[i, :, : mel.shape[-1]] = mel
            batch["audio_features"], batch["audio_lengths"] = features, lengths
        if encoded:
            frames = torch.tensor([len(e) for e in encoded], dtype=torch.long)
            features = torch.zeros(len(encoded), int(frames.max()), encoded[0].shape[1])
            for i, e in enumerate(encoded):
                features[i, : len(e)] = torch.from_numpy(e)
            batch["audio_encoded"] = features
            batch["audio_lengths"] = MEL_FRAMES_PER_ENCODER_FRAME * frames  # in mel frames either way
        if audio_rows:
            batch["audio_rows"] = torch.tensor(audio_rows, dtype=torch.long)
        batch["samples"] = [item[0] for item in items]
        return batch


def prefetched_batches(dataset: Sequence, batch_size: int, collate: Callable[[list], dict[str, Any]],
                       threads: int = 0) -> Iterator[dict[str, Any]]:
    """Collated batches of ``dataset`` in order; with ``threads``, the next batch's items are loaded (frames
    decoded, audio read) by a thread pool while the caller runs this one. Threads, not worker processes: a
    notebook kernel's sockets do not survive a fork, and spawned workers re-import torch for every call
    (measured: 40 s for 16 rows with 2 spawned workers, 3 s with none); JPEG decoding and resizing release
    the GIL."""
    starts = list(range(0, len(dataset), batch_size))
    if not threads:
        for start in starts:
            yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        return
    with ThreadPoolExecutor(threads) as pool:
        def submit(start: int) -> list:
            return [pool.submit(dataset.__getitem__, i) for i in range(start, min(start + batch_size, len(dataset)))]

        pending = submit(starts[0]) if starts else []
        for k in range(len(starts)):
            items = [f.result() for f in pending]
            pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
            yield collate(items)


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows to one length on the left or the right; returns (ids, attention mask)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
