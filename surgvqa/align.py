"""Projector alignment, the first stage of a real preset's training (``Config.align_steps``): before LoRA, only the
audio projector trains, so that the language model's answer to the heard question becomes its own answer to the
written one.

A real preset's projector starts random, so fine-tuning would otherwise teach it to hear and the task at once, from
one wording per type. Here it is distilled first, as DiVA and Ultravox align a speech encoder to a frozen language
model: the teacher is the language model reading the question (no frames, the adapter off), the student the same
model hearing it through the projector; the loss is the KL divergence of the student's next-token distributions
from the teacher's, over the teacher's first ``ALIGN_TOKENS`` greedy tokens (its own answer, whatever it says).
The questions are the train split's: with ``train_wordings="bank"`` the paraphrase bank's train wordings, said by
the train voices (every engine of the train pool, perturbed, under room noise for ``train_noise`` of them). No
frame is loaded.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import audio
from .collate import IGNORE_INDEX, IM_END, pad_rows
from .data import Sample
from .loop import RunLog, due, optimizer_groups
from .model import AudioGraftedVLM, adapter_disabled, collator

ALIGN_TOKENS = 8  # teacher tokens a heard question is distilled over
ALIGN_LOG = "align_log.csv"
ALIGN_LOG_COLUMNS = ["step", "time", "kl", "agreement", "lr"]


def adapter_off(model: AudioGraftedVLM) -> contextlib.AbstractContextManager:
    """The base model (LoRA, when any, switched off) for the whole of alignment; not to be nested."""
    return adapter_disabled(model) if model.cfg.lora else contextlib.nullcontext(model)


class AlignmentRows:
    """The token rows of alignment: each question written and heard, without frames, followed by the teacher's
    greedy continuation of the written prompt (computed once per wording). Used inside ``adapter_off``: the
    teacher is the base model."""

    def __init__(self, model: AudioGraftedVLM, tokens: int = ALIGN_TOKENS):
        self.model, self.tokens = model, tokens
        self.collate = collator(model)
        self.tokenizer = self.collate.tokenizer
        self.im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        self._continuation: dict[str, list[int]] = {}

    def prompt(self, sample: Sample, mode: str, audio_tokens: int = 0) -> list[int]:
        text = self.collate.prompt(sample, 0, audio_tokens, mode=mode, with_frames=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def continuations(self, samples: Sequence[Sample]) -> list[list[int]]:
        """The teacher's answer to each written question: greedy, up to ``tokens`` tokens, ending at <|im_end|>."""
        todo = list(dict.fromkeys(s.question for s in samples if s.question not in self._continuation))
        if todo:
            by_question = {s.question: s for s in samples}
            prompts = [self.prompt(by_question[q], "text") for q in todo]
            ids, mask = pad_rows(prompts, self.tokenizer.pad_token_id, left=True)
            device = self.model.base_vlm.device
            training = self.model.training
            self.model.eval()  # generation with its KV cache, not through checkpointed layers
            out = self.model.base_vlm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                               mm_token_type_ids=self.collate.token_types(ids).to(device),
                                               max_new_tokens=self.tokens, do_sample=False,
                                               eos_token_id=self.im_end, pad_token_id=self.tokenizer.pad_token_id)
            self.model.train(training)
            for question, row in zip(todo, out[:, ids.shape[1]:].tolist()):
                kept = row[: row.index(self.im_end) + 1] if self.im_end in row else row
                self._continuation[question] = kept or [self.im_end]
        return [self._continuation[s.question] for s in samples]

    def batch(self, samples: Sequence[Sample], mels: Sequence[torch.Tensor]) -> tuple[dict, dict]:
        """(written, heard) model inputs for ``samples`` with their log-mels; both label the same continuation
        tokens, so their label logits line up one to one."""
        device = self.model.base_vlm.device
        written, heard, labels_written, labels_heard = [], [], [], []
        for s, mel, continuation in zip(samples, mels, self.continuations(samples)):
            text = self.prompt(s, "text")
            rows = self.collate.backbone.audio_tokens(mel.shape[-1], self.collate.audio_pool)
            spoken = self.prompt(s, "audio", audio_tokens=rows)
            written.append(text + continuation)
            heard.append(spoken + continuation)
            labels_written.append([IGNORE_INDEX] * len(text) + continuation)
            labels_heard.append([IGNORE_INDEX] * len(spoken) + continuation)
        lengths = torch.tensor([m.shape[-1] for m in mels], dtype=torch.long)
        features = torch.zeros(len(mels), mels[0].shape[0], int(lengths.max()))
        for i, mel in enumerate(mels):
            features[i, :, : mel.shape[-1]] = mel

        def inputs(rows, labels, **extra):
            ids, mask = pad_rows(rows, self.tokenizer.pad_token_id, left=False)
            return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "mm_token_type_ids": self.collate.token_types(ids).to(device),
                    "labels": pad_rows(labels, IGNORE_INDEX, left=False)[0].to(device), **extra}

        return (inputs(written, labels_written),
                inputs(heard, labels_heard, audio_features=features, audio_lengths=lengths, samples=list(samples)))


def distillation(model: AudioGraftedVLM, written: dict, heard: dict) -> tuple[torch.Tensor, float]:
    """KL(teacher || student) per continuation token, and how often the student's most likely token is the
    teacher's (its greedy answer to the heard question would then be the written one's). Inside ``adapter_off``,
    backward included: recomputing a checkpointed layer with the adapter back on would be another graph."""
    with torch.no_grad():
        teacher = model(**written).logits
    student = model(**heard).logits
    if teacher.shape != student.shape:
        raise RuntimeError(f"written and heard label logits differ in shape: {tuple(teacher.shape)} vs "
                           f"{tuple(student.shape)}")
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    agreement = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
    return kl, agreement


@contextlib.contextmanager
def projector_only(model: AudioGraftedVLM):
    """Within it only the projector trains (its weights are yielded); every weight's ``requires_grad`` is put
    back after, for the fine-tuning that follows."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("projector."))
    try:
        yield [p for p in model.projector.parameters() if p.requires_grad]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def heard_against_written(model: AudioGraftedVLM, rows: AlignmentRows, picked: Sequence[Sample],
                          audio_paths: dict[str, str], cfg) -> tuple[torch.Tensor, float]:
    """``distillation`` of the picked questions, each heard from its file and written."""
    mels = [rows.collate.log_mel(s, audio.load_question_audio(s.uid, audio_paths[s.uid], cfg)) for s in picked]
    return distillation(model, *rows.batch(picked, mels))


def align_projector(model: AudioGraftedVLM, samples: Sequence[Sample], audio_paths: dict[str, str], cfg,
                    out_dir: str | Path | None = None, log: Callable[[str], None] = print,
                    trackers: Sequence = ()) -> dict[str, Any]:
    """``cfg.align_steps`` steps of ``cfg.batch_size`` heard questions of ``samples`` (cycled in a seeded order),
    projector only, AdamW at ``cfg.projector_lr`` with warmup and cosine decay; returns (and logs every
    ``cfg.eval_every``-th step and at the end) KL, agreement, time and peak memory per 1,000 utterances. Every
    step's values go to ``out_dir``'s CSV and to ``trackers`` as ``align/*``."""
    from transformers import get_cosine_schedule_with_warmup

    if cfg.align_steps <= 0:
        raise ValueError("align_steps must be positive to align the projector")
    missing = [s.uid for s in samples if s.uid not in audio_paths]
    if missing:
        raise KeyError(f"no question audio for {len(missing)} sample(s) to align on, e.g. {missing[:3]}")
    rows = AlignmentRows(model)
    order = np.random.default_rng(cfg.seed).permutation(len(samples))
    cuda = model.base_vlm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    align_log = RunLog(Path(out_dir) / ALIGN_LOG if out_dir is not None else None, ALIGN_LOG_COLUMNS,
                       trackers=trackers, prefix="align/")
    model.train()
    started, seen, history = time.perf_counter(), 0, []
    with projector_only(model) as trainable, adapter_off(model):
        optimizer = torch.optim.AdamW(optimizer_groups(model, language_model=False))
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.align_steps // 10),
                                                    cfg.align_steps)
        for step in range(1, cfg.align_steps + 1):
            picked = [samples[order[(seen + i) % len(samples)]] for i in range(cfg.batch_size)]
            seen += len(picked)
            kl, agreement = heard_against_written(model, rows, picked, audio_paths, cfg)
            value = kl.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"alignment step {step}: KL is {value}")
            optimizer.zero_grad(set_to_none=True)
            kl.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            history.append((value, agreement))
            align_log.log(step, {"kl": value, "agreement": agreement, "lr": scheduler.get_last_lr()[0]},
                          time=time.perf_counter() - started)
            if due(step, cfg.eval_every, cfg.align_steps):
                recent = history[-cfg.eval_every:]
                log(f"[align] step {step}/{cfg.align_steps}: KL {np.mean([k for k, _ in recent]):.4f}, "
                    f"agreement {np.mean([a for _, a in recent]):.3f} ({seen} utterances, "
                    f"{time.perf_counter() - started:.0f} s)")
    return alignment_summary(history, seen, time.perf_counter() - started, cuda)


def alignment_summary(history: list[tuple[float, float]], seen: int, wall: float, cuda: bool) -> dict[str, Any]:
    """KL and agreement over the first and the last tenth of the steps, time and peak memory."""
    first, last = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10):]
    return {"steps": len(history), "utterances": seen, "wall_s": wall,
            "s_per_1000_utterances": 1000 * wall / seen,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "kl_first": float(np.mean([k for k, _ in first])), "kl_last": float(np.mean([k for k, _ in last])),
            "agreement_first": float(np.mean([a for _, a in first])),
            "agreement_last": float(np.mean([a for _, a in last]))}
