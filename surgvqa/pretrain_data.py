"""What phantom pretraining reads: single-turn rows of random phantom clips (``RowBuilder``, ``PhantomRows``)
and spoken questions already through the frozen Whisper (``HeardBank``, ``python -m surgvqa heard-bank``).

A row is token for token what ``collate.Collator`` makes in the ``text`` question mode (the video placeholders,
the question in a wording drawn at random from the two templates, the answer and its end-of-turn), or in the
``audio`` / ``both`` modes for a heard question. Every clip's video is encoded once and shared by its rows
(``row_clip``). DataLoader workers render, tokenise and lay out whole batches, M-RoPE positions included
(every clip has the same vision layout: a fixed prefix plus a text ramp), and frames travel as uint8, patched
and normalised on the device. ``surgvqa.pretrain`` says why the rows are single-turn and what the loop does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from . import data, phantom
from .backbones import AUDIO_TOKEN, IM_END, TINY, VIDEO_TOKEN, patch_rows
from .collate import Collator
from .config import Config, PretrainSettings, get_config, parse_overrides
from .data import FRAMES_PER_CLIP, QUESTION_TYPES, Sample
from .model import AudioGraftedVLM, build_model, collator
from .phantom import ClipState
from .progress import progress_bar

TEMPLATES = ("in", "out")
# The question modes of pretraining rows.
ROW_MODES = ("text", "audio", "both")


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
    fingerprint: str  # whisper.encoder_fingerprint of its weights

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


def build_heard_bank(cfg: Config, out: str | Path, train_voices: int = 32, eval_voices: int = 12,
                     seed: int = 0, variant_voices: int = 4, log=print) -> HeardBank:
    """Speak every training wording (``data.training_wordings``) ``train_voices`` times (a generated variant,
    ``cfg.wording_variants``, ``variant_voices`` times: there are many), each time by a voice
    drawn as fine-tuning draws a train question's (every engine of the train pool, perturbed with
    ``cfg.voice_perturbation``, under room noise for ``cfg.train_noise`` of them), and both templates' wordings by
    ``eval_voices`` voices of the eval pool, clean (the heard measurements of pretraining); encode each
    utterance with the config's frozen Whisper exactly as fine-tuning does (``Collator.log_mel``,
    ``whisper_states``), pool it as the projector does, and save the bank to ``out``."""
    from .audio import audio_relpath, load_question_audio, render_into_cache
    from .noise import noise_sources, training_noise
    from .tts import assign_voices, voice_pools
    from .whisper import encoder_fingerprint

    model = build_model(cfg)
    text_collator = collator(model)
    eval_pool = voice_pools(cfg.tts_engine, cfg.disjoint_voices)["eval"]
    if not 0 < eval_voices <= len(eval_pool) or train_voices <= 0 or variant_voices <= 0:
        raise ValueError(f"train_voices {train_voices} and variant_voices {variant_voices} must be > 0 and "
                         f"eval_voices {eval_voices} in 1..{len(eval_pool)}")
    variants = {w for ws in data.wording_variants(cfg).values() for w in ws}
    rng = np.random.default_rng(seed)
    chosen_eval = [eval_pool[i] for i in sorted(rng.choice(len(eval_pool), eval_voices, replace=False))]
    jobs = []  # (split, voice, wording, noise, noise seed)
    for wording in sorted({w for ws in data.training_wordings(cfg).values() for w in ws}):
        said = [_text_sample(wording, f"heard-bank-{seed}-{i}-{wording}")
                for i in range(variant_voices if wording in variants else train_voices)]
        for voice in assign_voices(said, "train", cfg).values():
            noisy = cfg.train_noise > 0 and rng.uniform() < cfg.train_noise
            jobs.append(("train", voice, wording, training_noise(rng) if noisy else None, int(rng.integers(2**31))))
    templates = sorted({w for t in TEMPLATES for w in data.question_wordings(t, cfg).values()})
    jobs += [("eval", voice, w, None, 0) for voice in chosen_eval for w in templates]
    # rendered into the synthesis cache on every core (a re-run re-renders nothing), then encoded here
    root = cfg.path(cfg.audio_dir)
    sources = noise_sources(root / "noise", "train", cfg.sample_rate) if cfg.train_noise else None
    paths = [root / audio_relpath(w, voice, noise, noise_seed) for _, voice, w, noise, noise_seed in jobs]
    render_into_cache([(w, voice, str(p), cfg.sample_rate, noise, noise_seed, sources, True)
                       for p, (_, voice, w, noise, noise_seed) in zip(paths, jobs)],
                      root, os.cpu_count() or 1, "heard bank: speak")
    features, lengths = [], []
    with torch.no_grad():
        for (_, voice, wording, noise, _), path in zip(progress_bar(jobs, desc="heard bank: encode", unit="utterance"),
                                                       paths):
            who = f"{voice.key} saying {wording!r}" + (f" under {noise.tag}" if noise else "")
            wave = load_question_audio(who, path, cfg)
            mel = text_collator.log_mel(_text_sample(wording, who), wave)
            pooled = model.projector.pool_frames(model.whisper_states(mel[None]))[0]
            features.append(pooled.numpy().astype(np.float16))
            lengths.append(len(pooled))
    bank = HeardBank(features=np.concatenate(features), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                     wordings=np.array([j[2] for j in jobs]), voices=np.array([j[1].key for j in jobs]),
                     splits=np.array([j[0] for j in jobs]), audio_pool=cfg.audio_pool,
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
        self.wordings = data.training_wordings(cfg)  # question type -> the wordings a row may ask in
        unheard = sorted({w for ws in self.wordings.values() for w in ws} - set(self.train_utterances)) \
            if self.train_utterances else []
        if unheard:
            # before any step: a bank made for other wordings (wording_variants, train_wordings) fails here
            raise ValueError(f"the heard bank has no train-voice utterance of {len(unheard)} training wording(s), "
                             f"e.g. {unheard[:3]}: rebuild it with the same wording settings (python -m surgvqa "
                             f"heard-bank -p ...)")
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
        chosen training wording (``data.training_wordings``); with probability ``heard_share`` a row where that wording is only heard,
        said by a random train voice of the bank, and with probability ``both_share`` one where it is heard
        and written. No row holds any other question or answer."""
        out = []
        for s in samples:
            if self.question_types is not None and s.question_type not in self.question_types:
                continue
            options = self.wordings[s.question_type]
            question = options[rng.integers(len(options))]
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
    """``backbones.frames_to_patches`` (video layout, no resize) of a batch of uint8 clips (B, T, S, S, 3), on
    whatever device the clips are: (B * t * h * w, 3 * temporal * patch * patch), CLIP-normalised."""
    mean = torch.tensor(TINY.image_mean, device=clips.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(TINY.image_std, device=clips.device).view(1, 1, 3, 1, 1)
    x = (clips.permute(0, 1, 4, 2, 3).float() / 255.0 - mean) / std
    return patch_rows(x, patch_size, temporal_patch_size, merge_size)


def row_builder(model: AudioGraftedVLM, frame_size: int, question_types: Sequence[str] | None = None,
                bank: HeardBank | None = None, heard_share: float = 0.0, both_share: float = 0.0) -> RowBuilder:
    """The builder for a model's tokenizer and clips of ``frame_size``, with the M-RoPE positions of the
    shared prefix computed once by the model's own rope index."""
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
    prefix = {"input_ids": ids[:, : end + 1], "mm_token_type_ids": is_video[:, : end + 1].int() * 2,
              "attention_mask": torch.ones_like(ids[:, : end + 1]),
              "video_grid_thw": torch.tensor([[FRAMES_PER_CLIP // vision.temporal_patch_size, grid, grid]])}
    positions, _ = model.backbone.rope_index(model.base_vlm, prefix)
    return RowBuilder(text_collator, vision_tokens, positions[:, 0, :end], int(positions[0, 0, end]), model.cfg,
                      question_types, bank, heard_share, both_share)


# --- data ----------------------------------------------------------------------------------------

class PhantomRows(IterableDataset):
    """Endless training batches; batch ``b`` is made from random clip states ``b * K .. (b + 1) * K - 1``
    of ``data_seed`` (K a little over the batch size when lesion clips are over-represented), whichever
    worker makes it, so the data depend on the seed and the batch size only."""

    def __init__(self, builder: RowBuilder, settings: PretrainSettings, cfg: Config):
        self.builder, self.settings, self.cfg = builder, settings, cfg
        self.candidates = int(cfg.batch_size * (1 + settings.lesion_share))

    def clips(self, batch_index: int) -> list[tuple[ClipState, list[Sample]]]:
        s = self.settings
        drawn = phantom.random_clip_samples(self.candidates, seed=s.data_seed, start=batch_index * self.candidates,
                                           cfg=self.cfg)
        lesion = [c for c in drawn if c[0].lesion]
        other = [c for c in drawn if not c[0].lesion]
        size = self.cfg.batch_size
        n_lesion = max(min(len(lesion), round(s.lesion_share * size)), size - len(other))
        return lesion[:n_lesion] + other[: size - n_lesion]

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        clips = self.clips(batch_index)
        rng = np.random.default_rng([self.settings.data_seed, batch_index])
        rendered = np.stack([phantom.render_phantom_clip(state, self.cfg.frame_size, self.cfg.phantom_seed)
                             for state, _ in clips])
        return self.builder.collate([self.builder.rows(samples, rng) for _, samples in clips], rendered)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        batch_index = first
        while True:
            yield self.batch(batch_index)
            batch_index += stride


def heard_bank_main(argv: list[str] | None = None) -> int:
    """``python -m surgvqa heard-bank --out FILE [--train-voices N] [--variant-voices N] [--eval-voices N]
    [-p key=value ...]``"""
    parser = argparse.ArgumentParser(prog="python -m surgvqa heard-bank", description=build_heard_bank.__doc__)
    parser.add_argument("--out", required=True, help="the bank file (.npz)")
    parser.add_argument("--train-voices", type=int, default=32, help="utterances of each training wording")
    parser.add_argument("--variant-voices", type=int, default=4,
                        help="utterances of each generated wording (-p wording_variants=N)")
    parser.add_argument("--eval-voices", type=int, default=12, help="eval-pool voices saying the templates' wordings")
    parser.add_argument("--seed", type=int, default=0, help="the draw of voices and noise")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the tiny preset (whisper, audio_pool, tts_engine ...)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    build_heard_bank(get_config("tiny", **parse_overrides(args.param)), args.out, args.train_voices,
                     args.eval_voices, args.seed, args.variant_voices)
    return 0


# --- the forward of a batch of rows ----------------------------------------------------------------

def shared_vision_token_losses(model: AudioGraftedVLM, batch: dict[str, torch.Tensor]
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
