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

Evaluation (``surgvqa.pretrain_report``): per-type accuracy by candidate scoring in the text mode on held-out
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
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import Config, get_config, parse_overrides
from .data import QUESTION_TYPES
from .fastpath import CLIP_ATTENTION, register_clip_attention, set_vision_attention
from .model import (AudioGraftedQwen2VL, build_model, count_parameters, load_pretrained_projector, save_checkpoint,
                    save_projector_source)
from .pretrain_data import (ROW_MODES, HeardBank, PhantomRows, check_frame_size, row_builder,
                            shared_vision_token_losses)
from .pretrain_report import (SCORED_SETS, autocast_for, eval_split_clips, evaluate_all, folder_megabytes,
                              heldout_clips, per_type_table, write_curves, write_model_card)

CHECKPOINT_LIMIT_MB = 25
# The prefix of each row mode's per-type training metrics.
MODE_PREFIX = {"text": "", "audio": "heard_", "both": "both_"}


@dataclass
class PretrainSettings:
    """What pretraining needs beside its Config (the ``phantom-pretrain`` preset: frame_size, a multiple of 28
    so that clips are rendered at the size patched; batch_size in clips, each giving ~14 single-turn rows;
    max_steps, lr, projector_lr, warmup_steps, eval_every, num_workers)."""
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    data_seed: int = 1  # training clips: random_clip_samples(seed=data_seed)
    heldout_seed: int = 2  # held-out clips: another seed, so other states and other renderings
    heldout_clips: int = 200
    eval_rows: int = 0  # rows of the published eval split to score (0: all)
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


# --- the model -----------------------------------------------------------------------------------

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


def optimizer_for(model: AudioGraftedQwen2VL, settings: PretrainSettings, device: torch.device):
    params = [p for p in model.vlm.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if settings.heard_share or settings.both_share:  # the projector gets gradients from heard rows only
        groups.append({"params": list(model.projector.parameters()), "weight_decay": 0.0,
                       "lr": model.cfg.projector_lr})  # (it trains only on heard rows)
    return torch.optim.AdamW(groups, lr=model.cfg.lr, fused=device.type == "cuda")


# --- the loop ------------------------------------------------------------------------------------

class CsvLog:
    """A CSV file that rows are appended to; its header is the first row's keys (a later row's extra keys are
    dropped, missing ones left empty)."""

    def __init__(self, path: Path):
        self.path, self.columns = path, None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if self.columns is None:
                self.columns = list(rows[0])
                writer.writerow(self.columns)
            writer.writerows([[row.get(k, "") for k in self.columns] for row in rows])


def pretrain(cfg: Config, settings: PretrainSettings, out: str | Path, device: str = "cpu",
             command: str = "", log=print) -> tuple[AudioGraftedQwen2VL, dict[str, Any]]:
    """Pretrain, evaluating every ``eval_every`` steps and at the end (each time rewriting the output
    folder); the trained model and the final metrics. One function, like ``surgvqa.train.train``: the setup,
    the loop and ``evaluate_and_save`` share the model, the loader and the run's counters; the rows, the
    measurements and the reports are in ``pretrain_data`` and ``pretrain_report``."""
    started = time.time()
    check_frame_size(cfg.frame_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(question_mode="text", frames_as="video")
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cpu":
        # Adam's second moments of near-zero gradients turn subnormal within tens of steps, and subnormal
        # arithmetic made CPU steps 10-50x slower (measured: optimizer 5 -> 370 ms/step by step 40).
        torch.set_flush_denormal(True)
    register_clip_attention()
    model = build_pretrain_model(cfg, settings).to(dev).train()
    set_vision_attention(model.base_vlm, CLIP_ATTENTION)  # every clip the same size: one SDPA call a layer
    if settings.compile:
        model.base_vlm.model.language_model.compile()

    bank = HeardBank.load(settings.heard_bank) if settings.heard_bank else None
    builder = row_builder(model, cfg.frame_size, settings.question_type_list, bank, settings.heard_share,
                          settings.both_share)
    if settings.projector_from:
        if bank is None:
            raise ValueError("projector_from: a pretrained projector continues only on a heard bank's audio")
        # its inputs are the bank's (the encoder on this machine is never run), so the bank's fingerprint counts
        load_pretrained_projector(model, Path(settings.projector_from), bank.fingerprint)
    loader = DataLoader(PhantomRows(builder, settings, cfg), batch_size=None,
                        num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if cfg.num_workers else None,
                        persistent_workers=False)
    heldout, eval_split = heldout_clips(settings, cfg), eval_split_clips(settings, cfg)
    optimizer = optimizer_for(model, settings, dev)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                           min_lr_rate=settings.min_lr_ratio)
    log(f"pretraining {count_parameters(model.vlm):,} parameters on {dev}: {cfg.max_steps} steps of "
        f"{cfg.batch_size} clips at {cfg.frame_size} px, {cfg.num_workers} workers -> {out}")

    train_log, eval_log = CsvLog(out / "train_log.csv"), CsvLog(out / "eval_log.csv")
    stats, timer = TypeStats(dev), PhaseTimer(dev)
    data_wait = clips_seen = answers_seen = interval_rows = 0
    logged_step = 0
    step, stopped_by, eval_seconds = 0, "steps", 0.0
    interval_started = time.perf_counter()
    history: list[dict[str, Any]] = []
    step_time: dict[str, float] = {}
    deadline = started + settings.max_minutes * 60 if settings.max_minutes else math.inf

    def evaluate_and_save() -> dict[str, Any]:
        nonlocal eval_seconds
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
        eval_log.write([{"step": step, "set": name, "question_type": qtype, "n": int(row["n"]),
                         "accuracy": f"{row['accuracy']:.4f}", "chance": f"{row['chance']:.4f}" if "chance" in row else ""}
                        for name, table in tables.items() for qtype, row in table.iterrows()])
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
        if train_log.path.exists():
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

    # A step reads top to bottom: batch, forward, backward, a non-finite gradient's skipped update, the
    # optimizer, the logging interval and the evaluation.
    skipped_steps = 0
    batches = iter(loader)
    progress = tqdm(total=cfg.max_steps, desc="pretrain", disable=None)
    while step < cfg.max_steps:
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
        if step % settings.log_every == 0 or step == cfg.max_steps:
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
            train_log.write([row])
            progress.set_postfix(loss=f"{train_values['train_loss']:.3f}", ms=f"{step_time['step_wall']:.0f}")
            if progress.disable:
                accuracies = {k.split("/", 1)[1]: v for k, v in train_values.items() if k.startswith("answer_exact/")}
                worst = min(accuracies, key=accuracies.get)
                print(f"step {step}: loss {train_values['train_loss']:.4f}, min train accuracy "
                      f"{accuracies[worst]:.3f} ({worst}), {step_time['step_wall']:.0f} ms/step "
                      f"(data wait {step_time['data_wait']:.0f}), {row['rows']} rows, skipped {skipped_steps}",
                      flush=True)
            data_wait, interval_rows, interval_started = 0.0, 0, time.perf_counter()
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            evaluate_and_save()
    progress.close()
    return model, evaluate_and_save()


# Flags for the Config keys that pretraining sets most (as the model card's commands give them); ``-p`` sets any.
CONFIG_FLAGS = {"frame_size": int, "batch_size": int, "steps": int, "lr": float, "warmup_steps": int,
                "num_workers": int, "eval_every": int, "projector_lr": float}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config, PretrainSettings]:
    """The run's Config (the ``phantom-pretrain`` preset, then the flags above, ``--steps`` being max_steps,
    then ``-p key=value``) and its PretrainSettings."""
    parser = argparse.ArgumentParser(prog="python -m surgvqa pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the checkpoint, logs and model card)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the phantom-pretrain preset (e.g. seed=0, phantom_seed=0)")
    for name, kind in CONFIG_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"config key {'max_steps' if name == 'steps' else name}")
    defaults = PretrainSettings()
    for f in dataclasses.fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        else:
            kind = {"int": int, "float": float, "int | None": int, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    flagged = {("max_steps" if name == "steps" else name): getattr(args, name) for name in CONFIG_FLAGS
               if getattr(args, name) is not None}
    # Pretraining starts from random init unless asked to continue (-p vlm_from_scratch=false or -p vlm=DIR).
    # The projector starts random too (the encoder loaded here may stand in for the bank's); --projector-from
    # continues a pretrained one, checked against the bank's encoder.
    cfg = get_config("phantom-pretrain", **{**flagged, **parse_overrides(args.param)})
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings)})
    return args, cfg, settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg, settings = parse_args(argv)
    command = "python -m surgvqa pretrain " + shlex.join(argv)
    _, metrics = pretrain(cfg, settings, args.out, device=args.device, command=command)
    print(json.dumps({"steps": metrics["steps"], "min_accuracy": metrics["min_accuracy"],
                      "wall_minutes": round(metrics["wall_minutes"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
