"""Stage 0: phantom pretraining of the tiny preset's Qwen2-VL, so that the offline study starts from a model
that can see. ``python -m surgvqa pretrain --out DIR [--device cuda] [-p key=value ...] [options]``.

A tiny random-init VLM trained on one question per clip stays at the answer prior (docs/design.md, Training):
one vision pass buys one answer, and a thin tool line or a lesion drift gives too little gradient. Here
the vision tower encodes each clip ONCE and its video embeddings are shared by one SINGLE-TURN row per
question of the clip (~14 rows): each row is exactly what ``collate.Collator`` makes in the ``text``
question mode (the video placeholders, the question in a wording drawn at random from the two templates,
the answer and its end-of-turn token; the loss on the answer tokens only). Gradients of all rows sum into
the shared vision embeddings, so one vision pass still trains every answer of the clip.

Why not one multi-turn conversation per clip (the first version): which questions are asked depends on the
clip (lighting_mode only under NBI, tool questions only with a tool, lesion questions only on lesion
clips) and earlier answers imply later ones (scope motion), so the model learned to answer from the
conversation (training loss 0.015) and stayed at chance on single-turn questions. No row here sees any
other question or answer, so the pixels are the only source of the answer beyond the type's prior.

Heard questions (``heard_share`` > 0, with a ``HeardBank`` from ``python -m surgvqa heard-bank``): beside its
written row, a question also gets a row where it is only heard (the audio-only prompt fine-tuning uses), its
wording said by a random train-pool voice. The bank holds the frozen Whisper's output already pooled as the
projector pools it, so a GPU box needs neither a TTS engine nor Whisper; the projector trains on these rows.
A tiny decoder fine-tuned on a few thousand heard rows kept reading some questions only through their written
words (the scope directions stayed at chance heard); pretraining on millions of heard rows removes that gap.
With ``both_share`` a question also gets a row where it is heard and written (the prompt of the "both"
question mode), which the model otherwise never meets before fine-tuning. ``projector_from`` continues a
pretrained projector. Held-out heard accuracy is measured with the bank's eval-pool voices, which no
training row uses.

Data: phantom clips of RANDOM clip states only (``phantom.random_clip_samples``, seed ``data_seed``), never
an annotation row. Curriculum: lesion clips are over-represented (``lesion_share`` of each batch instead
of the prior's ~30 %) because the five lesion questions, lesion motion in particular, only exist on them
and are the hardest to learn; every other label keeps its prior mix.

Speed (the tiny model is launch-bound on a GPU, not compute-bound):
- DataLoader workers render, tokenise and lay out whole batches, including the M-RoPE positions (every
  clip has the same vision layout, so positions are a fixed prefix plus a text ramp: no per-sample
  ``get_rope_index`` with its host syncs on the device); frames travel as uint8 and are patched and
  normalised on the device (4x less to move than float patches).
- The vision tower attends every temporal slice of every clip in ONE batched SDPA call (all slices have
  the same size) instead of one call per slice after a ``lengths.tolist()`` host sync in every layer.
- The clips' video embeddings are gathered per row (``row_clip``) and written into the placeholder positions
  with one ``masked_scatter``; the worker checks that every row holds exactly one clip's placeholders.
- Rows are right-padded and run without an attention mask: causal attention never lets a real token see
  the padding after it, and padding carries no label. Logits are computed at label positions only, by an
  index computed in the worker (no boolean-mask host sync).
- Metrics accumulate on the device; they are read (one sync) every ``log_every`` steps.

Evaluation (``phantom_accuracy``): per-type accuracy by candidate scoring in the text mode on held-out
random clips (another seed), on the phantom renderings of the published eval split, and the single
repeated frame control (frame 0 eight times) that must stay near chance on the motion questions.

The output folder is a ``model.save_checkpoint`` folder (``load_checkpoint(DIR)``; ``DIR/vlm`` is a
standalone Qwen2-VL folder for ``vlm=DIR/vlm``), rewritten at every evaluation with ``metrics.json``,
``MODEL_CARD.md``, ``curves.png``, ``train_log.csv`` and ``eval_log.csv``, so a run cut short still leaves a
usable result.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import data, phantom
from .collate import AUDIO_TOKEN, CLIP_MEAN, CLIP_STD, IM_END, VIDEO_TOKEN, Collator, patch_rows
from .config import Config, get_config, parse_overrides
from .data import FRAMES_PER_CLIP, QUESTION_TYPES, Sample
from .phantom import ClipState
from .model import (AudioGraftedQwen2VL, build_model, candidate_token_rows, collator, count_parameters,
                    load_pretrained_projector, save_checkpoint, save_projector_source, score_candidates)

# Motion questions: one frame cannot answer them, so on a repeated frame a model that reads motion from time
# answers as for a still clip (still_answer_accuracy), or at chance where only moving clips are asked.
MOTION_TYPES = ("lesion_motion_direction", "scope_motion", "scope_motion_type", "scope_forward_motion",
                "scope_backward_motion")
TEMPLATES = ("in", "out")
# The name must contain "flash": only then does Qwen2-VL's vision attention hand the whole packed sequence
# with its cu_seqlens to the attention function instead of splitting it per slice.
EQUAL_SEGMENT_ATTENTION = "flash_equal_segments_sdpa"
CHECKPOINT_LIMIT_MB = 25
# The question modes of pretraining rows, and the prefix of their per-type training metrics.
ROW_MODES = ("text", "audio", "both")
MODE_PREFIX = {"text": "", "audio": "heard_", "both": "both_"}
# The evaluation sets whose minimum accuracy is reported: written, then heard (audio), then heard and written.
SET_SUFFIX = {"text": "", "audio": "_heard", "both": "_both"}
SCORED_SETS = tuple(base + suffix for suffix in SET_SUFFIX.values() for base in ("heldout", "eval_split"))


@dataclass
class PretrainSettings:
    frame_size: int = 112  # px; a multiple of 28 (patch 14 x merge 2): rendered at the size patched
    batch_size: int = 64  # clips per step; each clip gives ~14 single-turn rows (~900 rows per step)
    steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    num_workers: int = 4
    data_seed: int = 1  # training clips: random_clip_samples(seed=data_seed)
    heldout_seed: int = 2  # held-out clips: another seed, so other states and other renderings
    heldout_clips: int = 200
    eval_rows: int = 0  # rows of the published eval split to score (0: all)
    eval_every: int = 500
    eval_batch_size: int = 64
    log_every: int = 25
    lesion_share: float = 0.5  # share of lesion clips per batch (curriculum; 0: the prior's mix)
    max_minutes: float = 0.0  # 0: no limit; else training stops in time for the final evaluation
    question_types: str = ""  # comma-separated question types to train on (empty: all)
    # Heard questions: a HeardBank file (``python -m surgvqa heard-bank``) and the probability that a question
    # of a clip gets, beside its written row, a row where it is heard (audio-only prompt, a train voice).
    heard_bank: str = ""
    heard_share: float = 0.0
    # the probability that a question also gets a row where it is heard AND written (the "both" prompt)
    both_share: float = 0.0
    # a checkpoint folder whose projector starts training (its projector_source.json must name the bank's
    # encoder fingerprint and pooling); empty: a random projector
    projector_from: str = ""
    projector_lr: float = 1e-3  # the audio projector's learning rate (it trains only on heard rows)
    # bf16 autocast on CUDA. Off by default: the tiny model is launch-bound, so fp32 (TF32 matmuls) costs
    # little, and in bf16 some batches gave non-finite gradients (435 of 3,678 steps were skipped once).
    bf16: bool = False
    compile: bool = False  # torch.compile the language model (static shapes: rows padded to 64 multiples)
    # Model dimensions over model.tiny_vlm_config (None: keep its value).
    vision_depth: int | None = None
    vision_embed: int | None = None
    text_layers: int | None = None
    text_ffn: int | None = None

    @property
    def question_type_list(self) -> tuple[str, ...] | None:
        names = tuple(t.strip() for t in self.question_types.split(",") if t.strip())
        unknown = [t for t in names if t not in QUESTION_TYPES]
        if unknown:
            raise ValueError(f"unknown question types {unknown}; known: {QUESTION_TYPES}")
        return names or None


# --- the rows ------------------------------------------------------------------------------------

@dataclass
class Row:
    ids: list[int]  # the single-turn prompt (video placeholders expanded), answer, <|im_end|>
    answer_start: int  # first label token; labels are ids[answer_start:]
    question_type: int  # index in QUESTION_TYPES
    question: str  # the wording used
    audio: np.ndarray | None = None  # heard rows: the pooled Whisper frames of the question, one per placeholder
    mode: str = "text"  # the question mode of the prompt: text, audio or both


@dataclass
class HeardBank:
    """Spoken questions for pretraining, already through the frozen Whisper encoder and the projector's time
    pooling: one utterance per (wording, voice), float16 ``(rows, d_model)`` each (the projector's input).

    Pretraining on a GPU box then needs neither a TTS engine nor the Whisper weights. Train voices come from
    the fine-tuning's train pool and held-out voices from its eval pool; no test voice is ever in a bank.
    """

    features: np.ndarray  # (all rows, d_model) float16, utterance after utterance
    offsets: np.ndarray  # (utterances + 1,): utterance i is features[offsets[i]:offsets[i + 1]]
    wordings: np.ndarray  # (utterances,) the question said
    voices: np.ndarray  # (utterances,) the VoiceSpec key
    splits: np.ndarray  # (utterances,) the voice pool: "train" or "eval"
    audio_pool: int
    whisper: str  # the encoder's name in the config
    fingerprint: str  # audio.encoder_fingerprint of its weights

    FIELDS = ("features", "offsets", "wordings", "voices", "splits", "audio_pool", "whisper", "fingerprint")

    def utterance(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i]: self.offsets[i + 1]]

    def draw(self, utterances: dict[str, np.ndarray], wording: str, rng: np.random.Generator, who: str
             ) -> np.ndarray:
        """A random utterance of ``wording`` among ``utterances`` (one split's ``index``); ``who`` names the
        row or sample in the error when the bank has none."""
        said = utterances.get(wording)
        if said is None:
            raise ValueError(f"{who}: the heard bank has no utterance of {wording!r} by these voices")
        return self.utterance(int(said[rng.integers(len(said))]))

    def index(self, split: str) -> dict[str, np.ndarray]:
        """wording -> the indices of its utterances by voices of ``split``."""
        mine = np.flatnonzero(self.splits == split)
        if not len(mine):
            raise ValueError(f"the heard bank has no utterance by a {split} voice")
        return {w: mine[self.wordings[mine] == w] for w in np.unique(self.wordings[mine])}

    def describe(self) -> dict[str, Any]:
        return {"whisper": self.whisper, "fingerprint": self.fingerprint, "audio_pool": self.audio_pool,
                "utterances": len(self.wordings), "wordings": len(np.unique(self.wordings)),
                **{f"{split}_voices": len(np.unique(self.voices[self.splits == split])) for split in ("train", "eval")},
                "rows_per_utterance": float(np.diff(self.offsets).mean())}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{k: np.asarray(getattr(self, k)) for k in self.FIELDS})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeardBank":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"heard bank {path} does not exist (make it with python -m surgvqa heard-bank)")
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in cls.FIELDS if k not in f.files]
            if missing:
                raise ValueError(f"heard bank {path}: missing {missing}")
            values = {k: f[k] for k in cls.FIELDS}
        bank = cls(**{**values, "audio_pool": int(values["audio_pool"]), "whisper": str(values["whisper"]),
                      "fingerprint": str(values["fingerprint"])})
        n = len(bank.wordings)
        if bank.offsets.shape != (n + 1,) or bank.offsets[0] != 0 or bank.offsets[-1] != len(bank.features) \
                or (np.diff(bank.offsets) <= 0).any() or len(bank.voices) != n or len(bank.splits) != n:
            raise ValueError(f"heard bank {path}: offsets, wordings, voices and splits do not describe "
                             f"{len(bank.features)} feature rows")
        if not np.isfinite(bank.features).all():
            raise ValueError(f"heard bank {path}: non-finite features")
        return bank


def build_heard_bank(cfg: Config, out: str | Path, train_voices: int = 96, eval_voices: int = 16,
                     seed: int = 0, log=print) -> HeardBank:
    """Speak every question wording of both templates with ``train_voices`` voices of the train pool and
    ``eval_voices`` of the eval pool (a seeded draw), encode each utterance with the config's frozen Whisper
    exactly as fine-tuning does (``Collator.log_mel``, ``whisper_states``), pool it as the projector does,
    and save the bank to ``out``."""
    from tqdm.auto import tqdm

    from .audio import encoder_fingerprint, render, voice_pools

    model = build_model(cfg)
    text_collator = collator(model)
    pools = voice_pools(cfg.tts_engine, cfg.disjoint_voices)
    rng = np.random.default_rng(seed)
    chosen = {}
    for split, n in (("train", train_voices), ("eval", eval_voices)):
        if not 0 < n <= len(pools[split]):
            raise ValueError(f"{split}_voices {n}: the {split} pool has {len(pools[split])} voices")
        chosen[split] = [pools[split][i] for i in sorted(rng.choice(len(pools[split]), n, replace=False))]
    wordings = sorted({w for t in TEMPLATES for w in data.question_wordings(t, cfg).values()})
    jobs = [(split, voice, w) for split, voices in chosen.items() for voice in voices for w in wordings]
    features, lengths = [], []
    with torch.no_grad():
        for split, voice, wording in tqdm(jobs, desc="heard bank", disable=None):
            wave = render(wording, voice, cfg.sample_rate)
            mel = text_collator.log_mel(_text_sample(wording, f"{voice.key} saying {wording!r}"), wave)
            pooled = model.projector.pool_frames(model.whisper_states(mel[None]))[0]
            features.append(pooled.numpy().astype(np.float16))
            lengths.append(len(pooled))
    bank = HeardBank(features=np.concatenate(features), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                     wordings=np.array([w for _, _, w in jobs]), voices=np.array([v.key for _, v, _ in jobs]),
                     splits=np.array([split for split, _, _ in jobs]), audio_pool=cfg.audio_pool,
                     whisper=cfg.whisper, fingerprint=encoder_fingerprint(model.whisper))
    bank.save(out)
    log(f"heard bank {out}: {json.dumps(bank.describe())}")
    return bank


class RowBuilder:
    """Single-turn token rows, one per (clip, question), built from cached pieces.

    A row is ``Collator.prompt`` of the question in the text mode (placeholder expanded) followed by the
    answer tokenised alone and ``<|im_end|>``: token for token what ``collate.Collator`` makes for that
    sample in training. ``prefix_positions`` are the M-RoPE positions of the tokens up to the end of the
    video (the same for every row); text positions then grow by one per token from ``text_start``.
    """

    def __init__(self, text_collator: Collator, vision_tokens: int, prefix_positions: torch.Tensor,
                 text_start: int, cfg: Config, question_types: Sequence[str] | None = None,
                 bank: HeardBank | None = None, heard_share: float = 0.0, both_share: float = 0.0):
        if text_collator.question_mode != "text" or text_collator.frames_as != "video":
            raise ValueError("pretraining needs a text-mode collator with frames as one video")
        for name, share in (("heard_share", heard_share), ("both_share", both_share)):
            if not 0 <= share <= 1 or (share and bank is None):
                raise ValueError(f"{name} {share}: must be in [0, 1], and above 0 only with a heard bank")
        if bank is not None and bank.audio_pool != text_collator.audio_pool:
            raise ValueError(f"the heard bank was pooled by {bank.audio_pool}, the model pools by "
                             f"{text_collator.audio_pool}")
        self.bank, self.heard_share, self.both_share = bank, heard_share, both_share
        self.train_utterances = bank.index("train") if bank is not None and (heard_share or both_share) else {}
        self.audio_id = text_collator.token_ids[AUDIO_TOKEN]
        self._heard_prompt: dict[tuple[str, str, int], list[int]] = {}
        self.collator, self.tokenizer, self.vision_tokens = text_collator, text_collator.tokenizer, vision_tokens
        self.wordings = {t: data.question_wordings(t, cfg) for t in TEMPLATES}
        self.im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        self.video_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.pad_id = self.tokenizer.pad_token_id
        self.prefix_positions = prefix_positions.clone()  # (3, n_prefix)
        self.text_start = text_start
        self.question_types = tuple(question_types) if question_types else None
        self._prompt: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompt:
            text = self.collator.prompt(_text_sample(question), self.vision_tokens, 0)
            self._prompt[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompt[question]

    def heard_prompt(self, audio_rows: int, mode: str = "audio", question: str = "") -> list[int]:
        """The prompt with ``audio_rows`` audio placeholders: audio-only (no question text anywhere), or
        ``mode="both"``, the question heard and written."""
        key = (mode, question if mode == "both" else "", audio_rows)
        if key not in self._heard_prompt:
            text = self.collator.prompt(_text_sample(key[1]), self.vision_tokens, audio_rows, mode=mode)
            self._heard_prompt[key] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._heard_prompt[key]

    def heard_row(self, audio: np.ndarray, answer_ids: list[int], question_type: str, question: str,
                  mode: str = "audio") -> Row:
        prompt = self.heard_prompt(len(audio), mode, question)
        return Row(prompt + answer_ids, len(prompt), QUESTION_TYPES.index(question_type), question, audio,
                   mode)

    def answer(self, sentence: str) -> list[int]:
        if sentence not in self._answer:
            self._answer[sentence] = self.tokenizer(sentence, add_special_tokens=False)["input_ids"] + [self.im_end]
        return self._answer[sentence]

    def rows(self, samples: Sequence[Sample], rng: np.random.Generator) -> list[Row]:
        """One row per question of a clip (those of ``question_types`` only, when set), each in a randomly
        chosen template's wording; with probability ``heard_share`` a row where that wording is only heard,
        said by a random train voice of the bank, and with probability ``both_share`` one where it is heard
        and written. No row holds any other question or answer."""
        out = []
        for s in samples:
            if self.question_types is not None and s.question_type not in self.question_types:
                continue
            question = self.wordings[TEMPLATES[rng.integers(len(TEMPLATES))]][s.question_type]
            prompt = self.prompt(question)
            out.append(Row(prompt + self.answer(s.answer), len(prompt), QUESTION_TYPES.index(s.question_type),
                           question))
            for mode, share in (("audio", self.heard_share), ("both", self.both_share)):
                if share and rng.random() < share:
                    audio = self.bank.draw(self.train_utterances, question, rng, f"{s.uid} (train voices)")
                    out.append(self.heard_row(audio, self.answer(s.answer), s.question_type, question, mode))
        return out

    def collate(self, rows_per_clip: Sequence[Sequence[Row]], clips: np.ndarray) -> dict[str, torch.Tensor]:
        """A training batch: the clips' uint8 frames, the rows of all clips right-padded (length rounded up to
        16), ``row_clip`` (the clip of each row), M-RoPE positions, and flat label indices (position p
        predicts token p + 1). Every row holds exactly ``vision_tokens`` video placeholders, all in the shared
        prefix (checked here, in the worker, so the device needs no count sync)."""
        rows = [r for clip_rows in rows_per_clip for r in clip_rows]
        if not rows:
            raise ValueError("no rows in the batch (question_types matches no question of these clips?)")
        length = 16 * math.ceil(max(len(r.ids) for r in rows) / 16)
        n_rows, n_prefix = len(rows), self.prefix_positions.shape[1]
        input_ids = torch.full((n_rows, length), self.pad_id, dtype=torch.long)
        label_positions, label_targets, label_answer = [], [], []
        for i, r in enumerate(rows):
            input_ids[i, : len(r.ids)] = torch.tensor(r.ids)
            label_positions += range(i * (length - 1) + r.answer_start - 1, i * (length - 1) + len(r.ids) - 1)
            label_targets += r.ids[r.answer_start:]
            label_answer += [i] * (len(r.ids) - r.answer_start)
        is_video = input_ids == self.video_id
        if not (input_ids[:, :n_prefix] == input_ids[:1, :n_prefix]).all() or \
                not (is_video.sum(1) == self.vision_tokens).all() or \
                int(is_video[:, :n_prefix].sum()) != n_rows * self.vision_tokens:
            raise ValueError(f"rows do not hold exactly {self.vision_tokens} video placeholders in the shared "
                             f"prefix the positions were computed for")
        audio_rows = torch.tensor([0 if r.audio is None else len(r.audio) for r in rows])
        placeholders = (input_ids == self.audio_id).sum(1)
        if not torch.equal(placeholders, audio_rows):
            bad = (placeholders != audio_rows).nonzero().flatten().tolist()
            raise ValueError(f"rows {bad} ({[rows[i].question for i in bad]}): audio placeholders "
                             f"{placeholders[bad].tolist()} but audio rows {audio_rows[bad].tolist()}")
        ramp = torch.arange(length - n_prefix) + self.text_start
        positions = torch.cat([self.prefix_positions, ramp.expand(3, -1)], dim=1)
        row_clip = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in enumerate(rows_per_clip)])
        grid = self.collator.frame_size // self.collator.patch_size
        return {
            "input_ids": input_ids,
            "mm_token_type_ids": is_video.int() * 2,
            "position_ids": positions.unsqueeze(1).expand(3, n_rows, length).contiguous(),
            "frames": torch.from_numpy(clips),
            "row_clip": row_clip,
            "video_grid_thw": torch.tensor([[FRAMES_PER_CLIP // self.collator.temporal_patch_size, grid, grid]]
                                           ).expand(len(rows_per_clip), 3).contiguous(),
            "label_positions": torch.tensor(label_positions, dtype=torch.long),
            "label_targets": torch.tensor(label_targets, dtype=torch.long),
            "label_answer": torch.tensor(label_answer, dtype=torch.long),
            "answer_type": torch.tensor([r.question_type for r in rows], dtype=torch.long),
            "row_mode": torch.tensor([ROW_MODES.index(r.mode) for r in rows], dtype=torch.long),
            # the heard rows' audio in row order, as the placeholders are in the flattened rows
            **({"audio": torch.from_numpy(np.concatenate([r.audio for r in rows if r.audio is not None]))}
               if int(audio_rows.sum()) else {}),
        }


def _text_sample(question: str, name: str = "prompt") -> Sample:
    """A stand-in sample carrying only a question text (prompts depend on nothing else)."""
    return Sample(id=name, video_id="prompt", frames=(), frame_numbers=(), question=question,
                  question_type="", answer="", short_answer="", source="pretrain prompt")


def vision_token_count(frame_size: int, patch_size: int = 14, temporal_patch_size: int = 2,
                       merge_size: int = 2) -> int:
    side = frame_size // patch_size
    return FRAMES_PER_CLIP // temporal_patch_size * side * side // merge_size ** 2


def check_frame_size(frame_size: int, patch_size: int = 14, merge_size: int = 2) -> None:
    if frame_size % (patch_size * merge_size):
        raise ValueError(f"frame_size {frame_size}: must be a multiple of {patch_size * merge_size} so that "
                         f"clips are rendered at the size that is patched (no resize)")


def video_patches(clips: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                  merge_size: int = 2) -> torch.Tensor:
    """``collate.frames_to_patches`` (video layout, no resize) of a batch of uint8 clips (B, T, S, S, 3), on
    whatever device the clips are: (B * t * h * w, 3 * temporal * patch * patch), CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, device=clips.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=clips.device).view(1, 1, 3, 1, 1)
    x = (clips.permute(0, 1, 4, 2, 3).float() / 255.0 - mean) / std
    return patch_rows(x, patch_size, temporal_patch_size, merge_size)


def row_builder(model: AudioGraftedQwen2VL, frame_size: int, question_types: Sequence[str] | None = None,
                bank: HeardBank | None = None, heard_share: float = 0.0, both_share: float = 0.0) -> RowBuilder:
    """The builder for a model's tokenizer and clips of ``frame_size``, with the M-RoPE positions of the
    shared prefix computed once by Qwen2-VL's own ``get_rope_index``."""
    check_frame_size(frame_size)
    text_collator = dataclasses.replace(collator(model), question_mode="text", frame_size=frame_size)
    vision = model.base_vlm.config.vision_config
    vision_tokens = vision_token_count(frame_size, vision.patch_size, vision.temporal_patch_size,
                                       vision.spatial_merge_size)
    ids = torch.tensor([text_collator.tokenizer(text_collator.prompt(_text_sample("Q"), vision_tokens, 0),
                                                add_special_tokens=False)["input_ids"]])
    is_video = ids == text_collator.token_ids[VIDEO_TOKEN]
    end = int(is_video[0].nonzero().max()) + 1
    grid = frame_size // vision.patch_size
    # Up to the first text token after the video: its position is where the text ramp starts.
    positions, _ = model.base_vlm.model.get_rope_index(
        ids[:, : end + 1], is_video[:, : end + 1].int() * 2,
        video_grid_thw=torch.tensor([[FRAMES_PER_CLIP // vision.temporal_patch_size, grid, grid]]))
    return RowBuilder(text_collator, vision_tokens, positions[:, 0, :end], int(positions[0, 0, end]), model.cfg,
                      question_types, bank, heard_share, both_share)


# --- data ----------------------------------------------------------------------------------------

class PhantomRows(IterableDataset):
    """Endless training batches; batch ``b`` is made from random clip states ``b * K .. (b + 1) * K - 1``
    of ``data_seed`` (K a little over the batch size when lesion clips are over-represented), whichever
    worker makes it, so the data depend on the seed and the batch size only."""

    def __init__(self, builder: RowBuilder, settings: PretrainSettings, cfg: Config):
        self.builder, self.settings, self.cfg = builder, settings, cfg
        self.candidates = int(settings.batch_size * (1 + settings.lesion_share))

    def clips(self, batch_index: int) -> list[tuple[ClipState, list[Sample]]]:
        s = self.settings
        drawn = phantom.random_clip_samples(self.candidates, seed=s.data_seed, start=batch_index * self.candidates,
                                           cfg=self.cfg)
        lesion = [c for c in drawn if c[0].lesion]
        other = [c for c in drawn if not c[0].lesion]
        n_lesion = max(min(len(lesion), round(s.lesion_share * s.batch_size)), s.batch_size - len(other))
        return lesion[:n_lesion] + other[: s.batch_size - n_lesion]

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        clips = self.clips(batch_index)
        rng = np.random.default_rng([self.settings.data_seed, batch_index])
        rendered = np.stack([phantom.render_phantom_clip(state, self.settings.frame_size, self.cfg.phantom_seed)
                             for state, _ in clips])
        return self.builder.collate([self.builder.rows(samples, rng) for _, samples in clips], rendered)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        batch_index = first
        while True:
            yield self.batch(batch_index)
            batch_index += stride


# --- the model -----------------------------------------------------------------------------------

def equal_segment_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, max_length_q=None, **_):
    """Vision attention within segments of equal length as one batched SDPA call.

    query/key/value: (1, heads, total, head_dim) packed; segments by ``cu_seq_lens_q``. Returns
    (1, total, heads, head_dim), as the flash-attention functions do. All lengths are equal iff
    n_segments * max_length == total (every length <= max and they sum to total), checked without a sync.
    """
    heads, total, dim = query.shape[1:]
    n_segments = cu_seq_lens_q.shape[0] - 1
    if n_segments * max_length_q != total:
        raise ValueError(f"{n_segments} vision segments of at most {max_length_q} tokens do not tile {total} "
                         f"tokens: clips of different sizes in one batch")

    def split(x):
        return x[0].reshape(heads, n_segments, max_length_q, dim).transpose(0, 1)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scaling,
                                         dropout_p=dropout)
    return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None


def register_equal_segment_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EQUAL_SEGMENT_ATTENTION, equal_segment_attention)


@contextlib.contextmanager
def stock_attention(model: AudioGraftedQwen2VL):
    """The stock attention name while saving, so a saved config never names a function only we register."""
    vision = model.base_vlm.model.visual.config
    name = vision._attn_implementation
    vision._attn_implementation = "sdpa"
    try:
        yield
    finally:
        vision._attn_implementation = name


def build_pretrain_model(cfg: Config, settings: PretrainSettings) -> AudioGraftedQwen2VL:
    """The tiny preset's graft, with model.tiny_vlm_config's dimensions changed where settings say so."""
    from transformers import Qwen2VLForConditionalGeneration

    from .model import tiny_vlm_config

    model = build_model(cfg)
    overrides = {k: getattr(settings, k) for k in ("vision_depth", "vision_embed", "text_layers", "text_ffn")}
    if all(v is None for v in overrides.values()):
        return model
    config = tiny_vlm_config(model.tokenizer)
    vision, text = config.vision_config, config.text_config
    vision.depth = overrides["vision_depth"] or vision.depth
    vision.embed_dim = overrides["vision_embed"] or vision.embed_dim
    text.num_hidden_layers = overrides["text_layers"] or text.num_hidden_layers
    # layer_types is derived from the layer count when the config is made: keep it one entry per layer
    text.layer_types = [text.layer_types[0]] * text.num_hidden_layers
    text.intermediate_size = overrides["text_ffn"] or text.intermediate_size
    if vision.embed_dim % vision.num_heads:
        raise ValueError(f"vision_embed {vision.embed_dim} is not a multiple of {vision.num_heads} heads")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vlm = Qwen2VLForConditionalGeneration(config).requires_grad_(True)
    return AudioGraftedQwen2VL(vlm, model.whisper, model.tokenizer, model.feature_extractor, cfg,
                               whisper_from_cfg=True)


def shared_vision_token_losses(model: AudioGraftedQwen2VL, batch: dict[str, torch.Tensor]
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every label token of a training batch (on the model's device) and its logits.

    The vision tower encodes each clip ONCE; the clip's video embeddings are written into the placeholder
    positions of each of its rows (``row_clip``), and the language model runs on all rows. Gradients from
    every row of a clip sum into its shared vision embeddings.
    """
    base = model.base_vlm
    vision = base.config.vision_config
    input_ids, frames_ = batch["input_ids"], batch["frames"]
    n_clips, n_rows = frames_.shape[0], input_ids.shape[0]
    patches = video_patches(frames_, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
    visual = base.model.visual
    video = visual(patches.to(visual.dtype), grid_thw=batch["video_grid_thw"]).pooler_output
    per_clip = video.shape[0] // n_clips
    if video.shape[0] != n_clips * per_clip:
        raise ValueError(f"{video.shape[0]} video embeddings for {n_clips} clips")
    # (rows * tokens, hidden): each row gets its clip's embeddings (a gather: gradients sum over the rows)
    video = video.view(n_clips, per_clip, -1).index_select(0, batch["row_clip"]).reshape(n_rows * per_clip, -1)
    embeds = base.model.get_input_embeddings()(input_ids)
    # Every row holds exactly per_clip placeholders (RowBuilder.collate checks it in the worker), so the
    # scatter fills every placeholder with its own row's clip in order, without a device count sync.
    mask = (batch["mm_token_type_ids"] == 2).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, video.to(embeds.dtype))
    if "audio" in batch:
        # Heard rows: the bank's pooled Whisper frames through the trainable projector, in placeholder order
        # (RowBuilder.collate checked the counts).
        audio = model.projector.project(batch["audio"].to(model.projector.linear.weight.dtype))
        heard = (input_ids == model.audio_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(heard, audio.to(embeds.dtype))
    hidden = base.model(input_ids=input_ids, inputs_embeds=embeds, position_ids=batch["position_ids"],
                        mm_token_type_ids=batch["mm_token_type_ids"],
                        video_grid_thw=batch["video_grid_thw"].index_select(0, batch["row_clip"]),
                        use_cache=False).last_hidden_state
    at_labels = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["label_positions"])
    logits = base.lm_head(at_labels).float()
    return F.cross_entropy(logits, batch["label_targets"], reduction="none"), logits


class TypeStats:
    """Per question type and row mode, on the device: token loss sum and count, answers and teacher-forced
    exact answers. Read rows log ``loss/<type>`` and ``answer_exact/<type>``, heard rows ``heard_loss/<type>``
    and ``heard_answer_exact/<type>``, heard-and-written rows ``both_...``."""

    def __init__(self, device: torch.device):
        n = len(ROW_MODES) * len(QUESTION_TYPES)  # the types of each row mode, in ROW_MODES order
        self.loss, self.tokens, self.answers, self.exact = (torch.zeros(n, device=device, dtype=torch.float64)
                                                             for _ in range(4))

    def add(self, batch: dict[str, torch.Tensor], token_loss: torch.Tensor, logits: torch.Tensor) -> None:
        answer_slot = batch["answer_type"] + len(QUESTION_TYPES) * batch["row_mode"]
        token_slot = answer_slot[batch["label_answer"]]
        self.loss.index_add_(0, token_slot, token_loss.detach().double())
        self.tokens.index_add_(0, token_slot, torch.ones_like(token_loss, dtype=torch.float64))
        wrong = (logits.detach().argmax(-1) != batch["label_targets"]).double()
        wrong_per_answer = torch.zeros(len(answer_slot), device=wrong.device, dtype=torch.float64)
        wrong_per_answer.index_add_(0, batch["label_answer"], wrong)
        self.answers.index_add_(0, answer_slot, torch.ones_like(wrong_per_answer))
        self.exact.index_add_(0, answer_slot, (wrong_per_answer == 0).double())

    def read(self) -> dict[str, float]:
        loss, tokens, answers, exact = (t.cpu() for t in (self.loss, self.tokens, self.answers, self.exact))
        out = {"train_loss": float(loss.sum() / tokens.sum().clamp(min=1))}
        for mode_index, mode in enumerate(ROW_MODES):
            prefix, offset = MODE_PREFIX[mode], mode_index * len(QUESTION_TYPES)
            for i, t in enumerate(QUESTION_TYPES):
                if answers[offset + i]:
                    out[f"{prefix}loss/{t}"] = float(loss[offset + i] / tokens[offset + i])
                    out[f"{prefix}answer_exact/{t}"] = float(exact[offset + i] / answers[offset + i])
        return out


class PhaseTimer:
    """Device time of the phases of a step, without host syncs: CUDA events read at log time (on CPU, where
    every op is synchronous, wall clock)."""

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[list] = []
        self.totals = defaultdict(float)
        self.steps = 0

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add_step(self, marks: list) -> None:
        self.pending.append(marks)

    def read(self) -> dict[str, float]:
        """Mean ms per step of each phase since the last read."""
        if self.cuda and self.pending:
            self.pending[-1][-1].synchronize()
        for marks in self.pending:
            for phase, (a, b) in zip(self.PHASES, zip(marks, marks[1:])):
                self.totals[phase] += a.elapsed_time(b) if self.cuda else (b - a) * 1000
            self.steps += 1
        self.pending = []
        out = {f"{p}_ms": self.totals[p] / max(1, self.steps) for p in self.PHASES}
        self.totals, self.steps = defaultdict(float), 0
        return out


def lr_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warmup, then cosine from 1 to min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_for(model: AudioGraftedQwen2VL, settings: PretrainSettings, device: torch.device):
    params = [p for p in model.vlm.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if settings.heard_share or settings.both_share:  # the projector gets gradients from heard rows only
        groups.append({"params": list(model.projector.parameters()), "weight_decay": 0.0,
                       "lr": settings.projector_lr})
    return torch.optim.AdamW(groups, lr=settings.lr, fused=device.type == "cuda")


# --- evaluation ----------------------------------------------------------------------------------

@lru_cache(maxsize=2048)
def _rendered(state: ClipState, frame_size: int, phantom_seed: int) -> np.ndarray:
    return phantom.render_phantom_clip(state, frame_size, phantom_seed)


def clip_frames(state: ClipState, frame_size: int, phantom_seed: int, single_frame: bool) -> np.ndarray:
    """The clip's rendering, or its frame 0 repeated over the clip (the single-frame control)."""
    clip = _rendered(state, frame_size, phantom_seed)
    return np.repeat(clip[:1], FRAMES_PER_CLIP, axis=0) if single_frame else clip


def autocast_for(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def phantom_accuracy(model: AudioGraftedQwen2VL, samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]],
                     frame_size: int, single_frame: bool = False, question_types: Sequence[str] | None = None,
                     batch_size: int = 64, bf16: bool = False) -> pd.DataFrame:
    """Per question type: n, correct, accuracy and chance of candidate scoring in the text question mode
    (the single-turn prompt) on the phantom renderings of the given clip states."""
    text_collator = dataclasses.replace(collator(model), question_mode="text", frame_size=frame_size)
    items = [(s, state) for state, samples in samples_with_states for s in samples
             if question_types is None or s.question_type in question_types]
    device = model.base_vlm.device
    correct: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        batch = text_collator([(s, clip_frames(state, frame_size, model.cfg.phantom_seed, single_frame), None)
                               for s, state in chunk], for_generation=True)
        with autocast_for(device, bf16):
            scores = score_candidates(model, batch)
        for (s, _), score in zip(chunk, scores):
            correct[s.question_type].append(score.label == s.short_answer)
    return type_accuracy_of_answers(correct, model.cfg)


def type_accuracy_of_answers(correct: dict[str, list[bool]], cfg: Config) -> pd.DataFrame:
    """Per question type (in QUESTION_TYPES order, those with answers): n, correct, accuracy and chance."""
    n_labels = {t: len(v) for t, v in data.label_sets(cfg).items()}
    rows = [{"question_type": t, "n": len(correct[t]), "correct": int(sum(correct[t])),
             "accuracy": float(np.mean(correct[t])), "chance": 1 / n_labels[t]}
            for t in QUESTION_TYPES if correct.get(t)]
    return pd.DataFrame(rows, columns=["question_type", "n", "correct", "accuracy", "chance"]).set_index("question_type")


def row_candidate_accuracy(model: AudioGraftedQwen2VL, builder: RowBuilder,
                           samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]], frame_size: int,
                           heard_split: str | None = None, question_types: Sequence[str] | None = None,
                           clips_per_batch: int = 16, bf16: bool = False, seed: int = 0,
                           mode: str = "audio") -> pd.DataFrame:
    """``phantom_accuracy``'s table by candidate scoring on pretraining rows: every candidate answer of every
    question becomes a row after the question's prompt, written, or heard (``heard_split``: said by a
    seeded random voice of that split of the bank; ``mode`` "audio" or "both", heard and written), and the
    label of the most likely candidate wins. Written, it ranks exactly as ``score_candidates`` does (the
    same log-likelihood of answer + end of turn)."""
    if heard_split is not None and builder.bank is None:
        raise ValueError("heard candidate scoring needs a heard bank")
    utterances = builder.bank.index(heard_split) if heard_split is not None else {}
    rng = np.random.default_rng(seed)
    device = model.base_vlm.device
    correct: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(samples_with_states), clips_per_batch):
            rows_per_clip, clips, asked = [], [], []
            for state, samples in samples_with_states[start: start + clips_per_batch]:
                samples = [s for s in samples if question_types is None or s.question_type in question_types]
                if not samples:
                    continue
                owners, labels, candidates = candidate_token_rows(model, samples)
                rows = []
                heard = {i: builder.bank.draw(utterances, s.question, rng, f"sample {s.uid} ({heard_split} voices)")
                         for i, s in enumerate(samples)} if heard_split is not None else {}
                for owner, ids in zip(owners, candidates):
                    s = samples[owner]
                    if heard_split is None:
                        prompt = builder.prompt(s.question)
                        rows.append(Row(prompt + ids, len(prompt), QUESTION_TYPES.index(s.question_type), s.question))
                    else:
                        rows.append(builder.heard_row(heard[owner], ids, s.question_type, s.question, mode))
                rows_per_clip.append(rows)
                clips.append(_rendered(state, frame_size, model.cfg.phantom_seed))
                asked.append((samples, owners, labels))
            if not rows_per_clip:
                continue
            batch = {k: v.to(device) for k, v in builder.collate(rows_per_clip, np.stack(clips)).items()}
            with autocast_for(device, bf16):
                token_loss, _ = shared_vision_token_losses(model, batch)
            n_rows = batch["answer_type"].shape[0]
            nll = torch.zeros(n_rows, device=device, dtype=torch.float64).index_add_(
                0, batch["label_answer"], token_loss.double()).cpu().tolist()
            row = 0
            for samples, owners, labels in asked:
                best: dict[int, tuple[float, str]] = {}
                for owner, label in zip(owners, labels):
                    if owner not in best or nll[row] < best[owner][0]:
                        best[owner] = (nll[row], label)
                    row += 1
                for i, s in enumerate(samples):
                    correct[s.question_type].append(best[i][1] == s.short_answer)
    return type_accuracy_of_answers(correct, model.cfg)


def still_answer_accuracy(samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]],
                          question_types: Sequence[str]) -> pd.DataFrame:
    """Per motion type: the accuracy of answering as if the clip were still (no scope motion, no drift),
    i.e. what a model that reads motion from time scores on a repeated frame. Types asked only of moving
    clips (forward/backward, motion type) have no still answer; chance is their reference."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for state, samples in samples_with_states:
        still = dataclasses.replace(state, moving=False, drift="stable").labels()
        for s in samples:
            if s.question_type in question_types and still[s.question_type] is not None:
                hits[s.question_type].append(still[s.question_type] == s.short_answer)
    rows = [{"question_type": t, "n": len(hits[t]), "accuracy": float(np.mean(hits[t]))} for t in question_types
            if hits.get(t)]
    return pd.DataFrame(rows, columns=["question_type", "n", "accuracy"]).set_index("question_type")


def heldout_clips(settings: PretrainSettings, cfg: Config) -> list[tuple[ClipState, list[Sample]]]:
    return phantom.random_clip_samples(settings.heldout_clips, template="out", seed=settings.heldout_seed, cfg=cfg)


def eval_split_clips(settings: PretrainSettings, cfg: Config) -> list[tuple[ClipState, list[Sample]]]:
    """The published eval split's rows grouped by clip, with the clip state their phantom rendering uses
    (``frames.load_clip`` renders exactly ``clip_state_of``)."""
    rows = data.published_split("out", cfg)["eval"]
    rows = rows[: settings.eval_rows] if settings.eval_rows else rows
    by_clip: dict[tuple, list[Sample]] = defaultdict(list)
    for s in rows:
        by_clip[s.clip_key].append(s)
    return [(phantom.clip_state_of(samples[0], cfg), samples) for samples in by_clip.values()]


def evaluate_all(model: AudioGraftedQwen2VL, heldout, eval_split, settings: PretrainSettings,
                 builder: RowBuilder | None = None) -> dict[str, pd.DataFrame]:
    """The trained question types only (all by default); with heard (and heard-and-written) rows in training,
    also their accuracy, said by the bank's eval voices (never heard in training)."""
    size, batch, types = settings.frame_size, settings.eval_batch_size, settings.question_type_list
    motion = [t for t in MOTION_TYPES if types is None or t in types]
    common = dict(batch_size=batch, bf16=settings.bf16)
    tables = {
        "heldout": phantom_accuracy(model, heldout, size, question_types=types, **common),
        "eval_split": phantom_accuracy(model, eval_split, size, question_types=types, **common),
        "heldout_single_frame": phantom_accuracy(model, heldout, size, single_frame=True, question_types=motion,
                                                 **common),
        "heldout_still_answer": still_answer_accuracy(heldout, motion),
    }
    heard = dict(heard_split="eval", question_types=types, bf16=settings.bf16)
    for mode, share in (("audio", settings.heard_share), ("both", settings.both_share)):
        if builder is not None and share:
            suffix = SET_SUFFIX[mode]
            tables["heldout" + suffix] = row_candidate_accuracy(model, builder, heldout, size, mode=mode, **heard)
            tables["eval_split" + suffix] = row_candidate_accuracy(model, builder, eval_split, size, mode=mode,
                                                                   **heard)
    return tables


# --- outputs -------------------------------------------------------------------------------------

def per_type_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    out = pd.DataFrame(index=[t for t in QUESTION_TYPES if t in tables["heldout"].index or t in tables["eval_split"].index])
    for name, table in tables.items():
        out[f"{name}_n"] = table["n"]
        out[f"{name}_accuracy"] = table["accuracy"]
    out = out.drop(columns=["heldout_still_answer_n"], errors="ignore")  # the single-frame rows, again
    out["chance"] = pd.concat([t["chance"] for t in tables.values() if "chance" in t]).groupby(level=0).first()
    return out


def write_curves(directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_log = pd.read_csv(directory / "train_log.csv")
    eval_log = pd.read_csv(directory / "eval_log.csv")
    sets = [name for name in SCORED_SETS if (eval_log["set"] == name).any()]
    exact = {label: train_log[[c for c in train_log.columns if c.startswith(prefix)]]
             for label, prefix in (("read", "answer_exact/"), ("heard", "heard_answer_exact/"),
                                   ("heard and written", "both_answer_exact/"))}
    exact = {label: columns for label, columns in exact.items() if columns.shape[1]}
    panels = 2 + len(sets)
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels, 4.5), squeeze=False)
    axes = axes[0]
    axes[0].plot(train_log["step"], train_log["train_loss"])
    axes[0].set(xlabel="step", ylabel="answer-token loss", yscale="log", title="training loss")
    # the worst type is what held training back; the mean shows the rest
    for label, columns in exact.items():
        line, = axes[1].plot(train_log["step"], columns.min(axis=1), label=f"{label}: worst type")
        axes[1].plot(train_log["step"], columns.mean(axis=1), ls="--", color=line.get_color(),
                     label=f"{label}: mean over types")
    axes[1].set(xlabel="step", ylabel="teacher-forced exact answers", ylim=(0, 1.02),
                title="training rows, per logging interval")
    axes[1].legend(fontsize=8, loc="lower right")
    for ax, name in zip(axes[2:], sets):
        part = eval_log[eval_log["set"] == name]
        for qtype, rows in part.groupby("question_type"):
            ax.plot(rows["step"], rows["accuracy"], marker=".", label=qtype)
        mode = {"heard": "heard, eval voices", "both": "heard + written, eval voices"}.get(name.rsplit("_", 1)[-1],
                                                                                           "text mode")
        base = name.removesuffix("_heard").removesuffix("_both")
        ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title=f"{base} ({mode})")
    if len(axes) > 3 and axes[3].lines:
        axes[3].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    path = directory / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    def cell(v):
        return "" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else \
            str(int(v)) if isinstance(v, float) else str(v)

    header = [table.index.name or "question_type", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *map(cell, row)]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines)


def write_model_card(directory: Path, metrics: dict[str, Any], table: pd.DataFrame) -> Path:
    s = metrics["settings"]
    lines = [
        "# Tiny Qwen2-VL pretrained on phantom colonoscopy clips (surgvqa stage 0)",
        "",
        f"Training command: `{metrics['command']}`",
        "",
        f"- steps: {metrics['steps']} of {s['steps']} ({metrics['stopped_by']}), wall time "
        f"{metrics['wall_minutes']:.1f} min on {metrics['device']}, {metrics['clips_seen']} clips, "
        f"{metrics['answers_seen']} answers",
        f"- data: random phantom clip states only, data seed {s['data_seed']}, held-out seed {s['heldout_seed']}; "
        f"frames {s['frame_size']} px as one video; lesion share {s['lesion_share']}",
        f"- model: {metrics['parameters']:,} parameters ({json.dumps(metrics['model_dims'])}); "
        f"batch {s['batch_size']} clips, AdamW lr {s['lr']}, warmup {s['warmup_steps']} + cosine to "
        f"{s['min_lr_ratio']} x lr",
        "- supervision: one single-turn text-mode row per (clip, question), wording drawn from both templates; "
        "each clip's video encoded once and shared by its rows; loss on every answer and its end-of-turn"
        + (f"; question types {s['question_types']}" if s.get("question_types") else ""),
        *([f"- heard rows: with probability {s['heard_share']} a question also gets an audio-only row, said by "
           f"a random train voice of the heard bank `{s['heard_bank']}` ({json.dumps(metrics['heard_bank'])}); "
           f"the projector trains on them at lr {s['projector_lr']}; `*_heard` columns are said by the bank's "
           f"eval voices, never heard in training"] if metrics.get("heard_bank") and s.get("heard_share") else []),
        *([f"- heard-and-written rows: with probability {s['both_share']} a question also gets a row where it is "
           f"heard and written (the `both` prompt), same voices; `*_both` columns"]
          if metrics.get("heard_bank") and s.get("both_share") else []),
        *([f"- projector continued from `{s['projector_from']}`"] if s.get("projector_from") else []),
        f"- step time: {json.dumps(metrics['step_time_ms'])} (ms per step)",
        "",
        "Per-type accuracy by candidate scoring with the single-turn text prompt (`heldout`: random clips of the "
        "held-out seed; `eval_split`: phantom renderings of the published eval split; "
        "`heldout_single_frame`: frame 0 repeated 8 times, motion questions only; a model that reads motion "
        "from time answers it as a still clip, so it should score what `heldout_still_answer`, the accuracy of "
        "answering as if nothing moved, scores, or chance where a question is only asked of moving clips):",
        "",
        markdown_table(table),
        "",
        "Curves: `curves.png`. Logs: `train_log.csv`, `eval_log.csv`. Metrics: `metrics.json`.",
        "",
        "Load with `surgvqa.model.load_checkpoint(DIR)`, or as the tiny VLM of any config with `vlm=DIR/vlm`.",
        "",
    ]
    path = directory / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def folder_megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix != ".png") / 2 ** 20


# --- the loop ------------------------------------------------------------------------------------

def pretrain(cfg: Config, settings: PretrainSettings, out: str | Path, device: str = "cpu",
             command: str = "", log=print) -> tuple[AudioGraftedQwen2VL, dict[str, Any]]:
    """Pretrain, evaluating every ``eval_every`` steps and at the end (each time rewriting the output
    folder); the trained model and the final metrics."""
    started = time.time()
    check_frame_size(settings.frame_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(question_mode="text", frames_as="video", frame_size=settings.frame_size)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cpu":
        # Adam's second moments of near-zero gradients turn subnormal within tens of steps, and subnormal
        # arithmetic made CPU steps 10-50x slower (measured: optimizer 5 -> 370 ms/step by step 40).
        torch.set_flush_denormal(True)
    register_equal_segment_attention()
    model = build_pretrain_model(cfg, settings).to(dev).train()
    model.base_vlm.model.visual.config._attn_implementation = EQUAL_SEGMENT_ATTENTION
    if settings.compile:
        model.base_vlm.model.language_model.compile()

    bank = HeardBank.load(settings.heard_bank) if settings.heard_bank else None
    builder = row_builder(model, settings.frame_size, settings.question_type_list, bank, settings.heard_share,
                          settings.both_share)
    if settings.projector_from:
        if bank is None:
            raise ValueError("projector_from: a pretrained projector continues only on a heard bank's audio")
        # its inputs are the bank's (the encoder on this machine is never run), so the bank's fingerprint counts
        load_pretrained_projector(model, Path(settings.projector_from), bank.fingerprint)
    loader = DataLoader(PhantomRows(builder, settings, cfg), batch_size=None,
                        num_workers=settings.num_workers, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if settings.num_workers else None,
                        persistent_workers=False)
    heldout, eval_split = heldout_clips(settings, cfg), eval_split_clips(settings, cfg)
    optimizer = optimizer_for(model, settings, dev)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    log(f"pretraining {count_parameters(model.vlm):,} parameters on {dev}: {settings.steps} steps of "
        f"{settings.batch_size} clips at {settings.frame_size} px, {settings.num_workers} workers -> {out}")

    train_log_path, eval_log_path = out / "train_log.csv", out / "eval_log.csv"
    train_writer = eval_writer = None
    stats, timer = TypeStats(dev), PhaseTimer(dev)
    data_wait = clips_seen = answers_seen = interval_rows = 0
    logged_step = 0
    step, stopped_by, eval_seconds = 0, "steps", 0.0
    interval_started = time.perf_counter()
    history: list[dict[str, Any]] = []
    step_time: dict[str, float] = {}
    deadline = started + settings.max_minutes * 60 if settings.max_minutes else math.inf

    def evaluate_and_save() -> dict[str, Any]:
        nonlocal eval_writer, eval_seconds
        t0 = time.time()
        model.eval()
        tables = evaluate_all(model, heldout, eval_split, settings, builder)
        model.train()
        with stock_attention(model):
            save_checkpoint(model, out, cfg)
        if bank is not None and (settings.heard_share or settings.both_share):
            # The projector was trained on this encoder's outputs: fine-tuning may start from it only with the
            # same encoder (model.build_model checks the fingerprint).
            save_projector_source(out, bank.whisper, bank.fingerprint, bank.audio_pool, cfg.audio_projector)
        eval_seconds = time.time() - t0
        with eval_log_path.open("a", newline="") as f:
            writer = csv.writer(f)
            if eval_writer is None:
                writer.writerow(["step", "set", "question_type", "n", "accuracy", "chance"])
                eval_writer = True
            for name, table in tables.items():
                for qtype, row in table.iterrows():
                    writer.writerow([step, name, qtype, int(row["n"]), f"{row['accuracy']:.4f}",
                                     f"{row['chance']:.4f}" if "chance" in row else ""])
        table = per_type_table(tables)
        minimum = {name: float(tables[name]["accuracy"].min()) for name in SCORED_SETS if name in tables}
        config = model.base_vlm.config
        metrics = {
            "command": command, "device": str(dev), "steps": step, "stopped_by": stopped_by,
            "wall_minutes": (time.time() - started) / 60, "clips_seen": clips_seen, "answers_seen": answers_seen,
            "parameters": count_parameters(model.vlm),
            "model_dims": {"hidden": config.text_config.hidden_size, "text_layers": config.text_config.num_hidden_layers,
                           "text_ffn": config.text_config.intermediate_size,
                           "vision_depth": config.vision_config.depth, "vision_embed": config.vision_config.embed_dim},
            "settings": dataclasses.asdict(settings), "config": cfg.to_dict(), "step_time_ms": step_time,
            "min_accuracy": minimum, "eval_seconds": eval_seconds,
            "heard_bank": bank.describe() if bank is not None else None,
            "per_type": json.loads(table.to_json(orient="index")),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if train_log_path.exists():
            metrics["curves"] = str(write_curves(out))
        write_model_card(out, metrics, table)
        size = folder_megabytes(out)
        if size > CHECKPOINT_LIMIT_MB:
            log(f"warning: the checkpoint folder holds {size:.1f} MB, over {CHECKPOINT_LIMIT_MB} MB")
        log(f"step {step}: min accuracy {minimum}, single frame on motion "
            f"{tables['heldout_single_frame']['accuracy'].round(3).to_dict()} ({eval_seconds:.0f} s)")
        history.append({"step": step, **minimum})
        return metrics

    from tqdm.auto import tqdm

    skipped_steps = 0
    batches = iter(loader)
    progress = tqdm(total=settings.steps, desc="pretrain", disable=None)
    while step < settings.steps:
        # Stop in time for the final evaluation (as long as the last one took, plus a margin).
        if time.time() + 1.2 * eval_seconds + 10 > deadline:
            stopped_by = "max_minutes"
            break
        waited = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - waited
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        marks = [timer.mark()]
        with autocast_for(dev, settings.bf16):
            token_loss, logits = shared_vision_token_losses(model, batch)
        loss = token_loss.mean()
        marks.append(timer.mark())
        loss.backward()
        marks.append(timer.mark())
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0,
                                                   foreach=True)
        if not torch.isfinite(grad_norm):
            # one non-finite batch must not poison the weights: drop its update, count it, go on
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            progress.update(1)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        marks.append(timer.mark())
        timer.add_step(marks)
        stats.add(batch, token_loss, logits)
        clips_seen += batch["frames"].shape[0]
        answers_seen += batch["answer_type"].shape[0]
        interval_rows += batch["answer_type"].shape[0]
        step += 1
        progress.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            train_values = stats.read()
            stats = TypeStats(dev)
            elapsed = time.perf_counter() - interval_started
            n_steps = step - logged_step
            logged_step = step
            step_time = {"step_wall": elapsed / n_steps * 1000, "data_wait": data_wait / n_steps * 1000,
                         **timer.read()}
            row = {"step": step, "elapsed_s": round(time.time() - started, 1), "lr": schedule.get_last_lr()[0],
                   "skipped_steps": skipped_steps, "rows": round(interval_rows / n_steps),
                   **{f"{k}_ms": round(v, 2) for k, v in step_time.items() if not k.endswith("_ms")},
                   **{k: round(v, 2) for k, v in step_time.items() if k.endswith("_ms")}, **train_values}
            with train_log_path.open("a", newline="") as f:
                if train_writer is None:
                    train_writer = list(row)
                    csv.writer(f).writerow(train_writer)
                csv.writer(f).writerow([row.get(k, "") for k in train_writer])
            progress.set_postfix(loss=f"{train_values['train_loss']:.3f}", ms=f"{step_time['step_wall']:.0f}")
            if progress.disable:
                accuracies = {k.split("/", 1)[1]: v for k, v in train_values.items() if k.startswith("answer_exact/")}
                worst = min(accuracies, key=accuracies.get)
                print(f"step {step}: loss {train_values['train_loss']:.4f}, min train accuracy "
                      f"{accuracies[worst]:.3f} ({worst}), {step_time['step_wall']:.0f} ms/step "
                      f"(data wait {step_time['data_wait']:.0f}), {row['rows']} rows, skipped {skipped_steps}",
                      flush=True)
            data_wait, interval_rows, interval_started = 0.0, 0, time.perf_counter()
        if step % settings.eval_every == 0 and step < settings.steps:
            evaluate_and_save()
    progress.close()
    return model, evaluate_and_save()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, PretrainSettings]:
    parser = argparse.ArgumentParser(prog="python -m surgvqa pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the checkpoint, logs and model card)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the tiny preset (e.g. seed=0, phantom_seed=0)")
    defaults = PretrainSettings()
    for f in dataclasses.fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        else:
            kind = {"int": int, "float": float, "int | None": int, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings)})
    return args, settings


def heard_bank_main(argv: list[str] | None = None) -> int:
    """``python -m surgvqa heard-bank --out FILE [--train-voices N] [--eval-voices N] [-p key=value ...]``"""
    parser = argparse.ArgumentParser(prog="python -m surgvqa heard-bank", description=build_heard_bank.__doc__)
    parser.add_argument("--out", required=True, help="the bank file (.npz)")
    parser.add_argument("--train-voices", type=int, default=96)
    parser.add_argument("--eval-voices", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the draw of voices from each pool")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the tiny preset (whisper, audio_pool, tts_engine ...)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    build_heard_bank(get_config("tiny", **parse_overrides(args.param)), args.out, args.train_voices,
                     args.eval_voices, args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    # Pretraining starts from random init unless asked to continue (-p vlm_from_scratch=false or -p vlm=DIR).
    # The projector starts random too (the encoder loaded here may stand in for the bank's); --projector-from
    # continues a pretrained one, checked against the bank's encoder.
    cfg = get_config("tiny", **{"vlm_from_scratch": True, "pretrained_projector": False,
                                **parse_overrides(args.param)})
    command = "python -m surgvqa pretrain " + shlex.join(argv)
    _, metrics = pretrain(cfg, settings, args.out, device=args.device, command=command)
    print(json.dumps({"steps": metrics["steps"], "min_accuracy": metrics["min_accuracy"],
                      "wall_minutes": round(metrics["wall_minutes"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
