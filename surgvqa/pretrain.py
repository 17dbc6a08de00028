"""Stage 0: phantom pretraining of the tiny preset's Qwen2-VL, so that the offline study starts from a model
that can see. ``python -m surgvqa pretrain --out DIR [--device cuda] [-p key=value ...]``, where a key is a
Config key (over the ``phantom-pretrain`` preset) or a pretraining setting (``config.PretrainSettings``).

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
  rope index with its host syncs on the device); frames travel as uint8 and are patched and
  normalised on the device (4x less to move than float patches).
- The vision tower attends every temporal slice of every clip in ONE batched SDPA call (all slices have
  the same size) instead of one call per slice after a ``lengths.tolist()`` host sync in every layer.
- The clips' video embeddings are gathered per row (``row_clip``) and written into the placeholder positions
  with one ``masked_scatter``; the worker checks that every row holds exactly one clip's placeholders.
- Rows are right-padded and run without an attention mask: causal attention never lets a real token see
  the padding after it, and padding carries no label. Logits are computed at label positions only, by an
  index computed in the worker (no boolean-mask host sync).
- Metrics accumulate on the device; they are read (one sync) every ``log_every`` steps.

The loop (``pretrain``) reads as fine-tuning's and alignment's do (``surgvqa.loop``): setup, one flat loop over
steps, and named helpers for a step, a log line and an evaluation.

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
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import Config, PretrainSettings, parse_overrides, pretrain_config
from .data import QUESTION_TYPES
from .loop import Interval, RunLog, autocast_for, due, finish_trackers, optimizer_groups, start_trackers
from .model import (AudioGraftedVLM, build_model, count_parameters, load_pretrained_projector, save_checkpoint,
                    save_projector_source)
from .pretrain_data import (ROW_MODES, HeardBank, PhantomRows, RowBuilder, check_frame_size, row_builder,
                            shared_vision_token_losses)
from .pretrain_report import (SCORED_SETS, eval_log_rows, eval_split_clips, evaluate_all, folder_megabytes,
                              heldout_clips, per_type_table, pretrain_command, write_curves, write_model_card)

CHECKPOINT_LIMIT_MB = 25
# The prefix of each row mode's per-type training metrics.
MODE_PREFIX = {"text": "", "audio": "heard_", "both": "both_"}


# --- the model -----------------------------------------------------------------------------------

def build_pretrain_model(cfg: Config, settings: PretrainSettings) -> AudioGraftedVLM:
    """The tiny preset's graft, with the tiny backbone's dimensions changed where settings say so."""
    from .backbones import TINY

    model = build_model(cfg)
    overrides = {k: getattr(settings, k) for k in ("vision_depth", "vision_embed", "text_layers", "text_ffn")}
    if all(v is None for v in overrides.values()):
        return model
    config = TINY.tiny_config(model.tokenizer)
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
        vlm = TINY.model_class(config).requires_grad_(True)
    return AudioGraftedVLM(vlm, model.whisper, model.tokenizer, model.feature_extractor, cfg,
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


# --- the run -------------------------------------------------------------------------------------

@dataclass
class PretrainRun:
    """What the loop, its log lines and its evaluations share: the run's fixed parts and its counters."""
    cfg: Config
    settings: PretrainSettings
    out: Path
    device: torch.device
    model: AudioGraftedVLM
    bank: HeardBank | None
    builder: RowBuilder
    heldout: list
    eval_split: list
    command: str
    log: Callable[[str], None]
    started: float = field(default_factory=time.time)
    # what the loop counts, which log lines, evaluations and metrics.json read
    step: int = 0
    skipped_steps: int = 0  # steps whose update a non-finite gradient dropped
    clips_seen: int = 0
    answers_seen: int = 0
    stopped_by: str = "steps"  # or "max_minutes"
    eval_seconds: float = 0.0  # the last evaluation's: the deadline leaves as long for the final one
    step_time: dict[str, float] = field(default_factory=dict)  # the last interval's ms per step, by phase

    def __post_init__(self) -> None:
        self.trackers = start_trackers(self.cfg, self.out)
        self.train_log = RunLog(self.out / "train_log.csv", trackers=self.trackers)
        self.eval_log = RunLog(self.out / "eval_log.csv", trackers=self.trackers, prefix="eval/")
        self.deadline = self.started + self.settings.max_minutes * 60 if self.settings.max_minutes else math.inf

    @property
    def heard(self) -> bool:
        """Whether rows hear their questions (the projector then trains)."""
        return bool(self.settings.heard_share or self.settings.both_share)

    def out_of_time(self) -> bool:
        """Whether to stop now, in time for the final evaluation (as long as the last one took, and a margin)."""
        return time.time() + 1.2 * self.eval_seconds + 10 > self.deadline


def setup(cfg: Config, settings: PretrainSettings, out: str | Path, device: str, command: str,
          log: Callable[[str], None]) -> PretrainRun:
    """The model on its device (seeded), the heard bank, the row builder and the evaluation clips."""
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
    model = build_pretrain_model(cfg, settings).to(dev).train()  # its towers on packed attention (model.py)
    if settings.compile:
        model.base_vlm.model.language_model.compile()
    bank = HeardBank.load(settings.heard_bank) if settings.heard_bank else None
    builder = row_builder(model, cfg.frame_size, settings.question_type_list, bank, settings.heard_share,
                          settings.both_share)
    if settings.projector_from:
        # its inputs are the bank's (the encoder on this machine is never run), so the bank's fingerprint counts
        load_pretrained_projector(model, Path(settings.projector_from), bank.fingerprint)
    return PretrainRun(cfg, settings, out, dev, model, bank, builder, heldout_clips(settings, cfg),
                       eval_split_clips(settings, cfg), command, log, started)


def pretrain(cfg: Config, settings: PretrainSettings, out: str | Path, device: str = "cpu",
             command: str = "", log=print) -> tuple[AudioGraftedVLM, dict[str, Any]]:
    """Pretrain, evaluating every ``eval_every`` steps and at the end (each time rewriting the output
    folder); the trained model and the final metrics. The rows, the measurements and the reports are in
    ``pretrain_data`` and ``pretrain_report``."""
    from tqdm.auto import tqdm

    run = setup(cfg, settings, out, device, command, log)
    cfg, model, dev = run.cfg, run.model, run.device
    loader = DataLoader(PhantomRows(run.builder, settings, cfg), batch_size=None, num_workers=cfg.num_workers,
                        pin_memory=dev.type == "cuda", prefetch_factor=4 if cfg.num_workers else None,
                        persistent_workers=False)
    optimizer = torch.optim.AdamW(optimizer_groups(model, settings.weight_decay, projector=run.heard), lr=cfg.lr,
                                  fused=dev.type == "cuda")
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                           min_lr_rate=settings.min_lr_ratio)
    log(f"pretraining {count_parameters(model.vlm):,} parameters on {dev}: {cfg.max_steps} steps of "
        f"{cfg.batch_size} clips at {cfg.frame_size} px, {cfg.num_workers} workers -> {run.out}")
    stats, timer, interval = TypeStats(dev), PhaseTimer(dev), Interval()
    batches = interval.batches(loader)
    progress = tqdm(total=cfg.max_steps, desc="pretrain", disable=None)
    while run.step < cfg.max_steps:
        if run.out_of_time():
            run.stopped_by = "max_minutes"
            break
        batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
        losses = train_step(model, batch, optimizer, schedule, settings.bf16, timer)
        run.step += 1
        interval.steps += 1
        progress.update(1)
        if losses is None:  # a non-finite gradient: its update was dropped
            run.skipped_steps += 1
            continue
        stats.add(batch, *losses)
        run.clips_seen += batch["frames"].shape[0]
        run.answers_seen += batch["answer_type"].shape[0]
        interval.items += batch["answer_type"].shape[0]
        if due(run.step, settings.log_every, cfg.max_steps):
            # the language model's rate (the projector's group, when any, comes first)
            log_interval(run, stats.read(), interval, timer, schedule.get_last_lr()[-1], progress)
            stats = TypeStats(dev)
        if run.step < cfg.max_steps and due(run.step, cfg.eval_every):
            evaluate_and_save(run)
    progress.close()
    metrics = evaluate_and_save(run)
    finish_trackers(run.trackers)
    return model, metrics


def train_step(model: AudioGraftedVLM, batch: dict[str, torch.Tensor], optimizer, schedule, bf16: bool,
               timer: PhaseTimer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Forward, backward and the clipped update of one batch, timed by phase: the token losses and logits, or
    None when the gradient was not finite (one such batch must not poison the weights: its update is dropped,
    the schedule still steps)."""
    marks = [timer.mark()]
    with autocast_for(batch["input_ids"].device, bf16):
        token_loss, logits = shared_vision_token_losses(model, batch)
    loss = token_loss.mean()
    marks.append(timer.mark())
    loss.backward()
    marks.append(timer.mark())
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0,
                                               foreach=True)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    if not finite:
        return None
    marks.append(timer.mark())
    timer.add_step(marks)
    return token_loss, logits


def log_interval(run: PretrainRun, train_values: dict[str, float], interval: Interval, timer: PhaseTimer,
                 lr: float, progress) -> None:
    """One row of ``train_log.csv`` for the steps since the last (losses and teacher-forced exact answers per
    type and row mode, step time by phase, the wait for data), and a line where no progress bar is drawn."""
    n_steps = interval.steps
    run.step_time = {"step_wall": interval.seconds / n_steps * 1000, "data_wait": interval.waited / n_steps * 1000,
                     **timer.read()}
    row = {"step": run.step, "elapsed_s": round(time.time() - run.started, 1), "lr": lr,
           "skipped_steps": run.skipped_steps, "rows": round(interval.items / n_steps),
           **{f"{k}_ms": round(v, 2) for k, v in run.step_time.items() if not k.endswith("_ms")},
           **{k: round(v, 2) for k, v in run.step_time.items() if k.endswith("_ms")}, **train_values}
    run.train_log.log(run.step, {k: v for k, v in row.items() if k != "step"})
    progress.set_postfix(loss=f"{train_values['train_loss']:.3f}", ms=f"{run.step_time['step_wall']:.0f}")
    if progress.disable:
        accuracies = {k.split("/", 1)[1]: v for k, v in train_values.items() if k.startswith("answer_exact/")}
        worst = min(accuracies, key=accuracies.get)
        print(f"step {run.step}: loss {train_values['train_loss']:.4f}, min train accuracy "
              f"{accuracies[worst]:.3f} ({worst}), {run.step_time['step_wall']:.0f} ms/step "
              f"(data wait {run.step_time['data_wait']:.0f}), {row['rows']} rows, skipped {run.skipped_steps}",
              flush=True)
    interval.restart()


def evaluate_and_save(run: PretrainRun) -> dict[str, Any]:
    """Evaluate, then rewrite the output folder: the checkpoint (with the projector's source when it heard),
    ``eval_log.csv``, ``metrics.json``, the curves and the model card; the metrics."""
    t0 = time.time()
    run.model.eval()
    tables = evaluate_all(run.model, run.heldout, run.eval_split, run.settings, run.builder)
    run.model.train()
    save_checkpoint(run.model, run.out, run.cfg)
    if run.bank is not None and run.heard:
        # The projector was trained on this encoder's outputs: fine-tuning may start from it only with the
        # same encoder (model.build_model checks the fingerprint).
        save_projector_source(run.out, run.bank.whisper, run.bank.fingerprint, run.bank.audio_pool,
                              run.cfg.audio_projector)
    run.eval_seconds = time.time() - t0
    rows = eval_log_rows(run.step, tables)
    run.eval_log.write(rows)
    run.eval_log.log_trackers(run.step, {f"{r['set']}/{r['question_type']}": float(r["accuracy"]) for r in rows})
    table = per_type_table(tables)
    metrics = run_metrics(run, tables, table)
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if run.train_log.path.exists():
        metrics["curves"] = str(write_curves(run.out))
    write_model_card(run.out, metrics, table)
    size = folder_megabytes(run.out)
    if size > CHECKPOINT_LIMIT_MB:
        run.log(f"warning: the checkpoint folder holds {size:.1f} MB, over {CHECKPOINT_LIMIT_MB} MB")
    run.log(f"step {run.step}: min accuracy {metrics['min_accuracy']}, single frame on motion "
            f"{tables['heldout_single_frame']['accuracy'].round(3).to_dict()} ({run.eval_seconds:.0f} s)")
    return metrics


def run_metrics(run: PretrainRun, tables: dict, table) -> dict[str, Any]:
    """``metrics.json``: how the run was made and how far it got, and what the evaluation measured."""
    config = run.model.base_vlm.config
    return {
        "command": run.command, "device": str(run.device), "steps": run.step, "stopped_by": run.stopped_by,
        "wall_minutes": (time.time() - run.started) / 60, "clips_seen": run.clips_seen,
        "answers_seen": run.answers_seen, "parameters": count_parameters(run.model.vlm),
        "model_dims": {"hidden": config.text_config.hidden_size, "text_layers": config.text_config.num_hidden_layers,
                       "text_ffn": config.text_config.intermediate_size,
                       "vision_depth": config.vision_config.depth, "vision_embed": config.vision_config.embed_dim},
        "settings": run.settings.to_dict(), "config": run.cfg.to_dict(), "step_time_ms": run.step_time,
        "min_accuracy": {name: float(tables[name]["accuracy"].min()) for name in SCORED_SETS if name in tables},
        "eval_seconds": run.eval_seconds,
        "heard_bank": run.bank.describe() if run.bank is not None else None,
        "per_type": json.loads(table.to_json(orient="index")),
    }


# --- the command line ----------------------------------------------------------------------------

# The flags the model card's commands use (checkpoints/tiny-phantom/MODEL_CARD.md), each an alias of one -p key.
CONFIG_ALIASES = {"steps": "max_steps", "frame_size": "frame_size", "batch_size": "batch_size", "lr": "lr",
                  "warmup_steps": "warmup_steps", "num_workers": "num_workers", "eval_every": "eval_every",
                  "projector_lr": "projector_lr"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config, PretrainSettings, dict[str, Any]]:
    """The run's Config (the ``phantom-pretrain`` preset and the Config keys given), its PretrainSettings (the
    other keys given), and what was given (aliases first, then ``-p``, which wins)."""
    parser = argparse.ArgumentParser(prog="python -m surgvqa pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the checkpoint, logs and model card)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Pretraining starts from random init unless asked to continue (-p vlm_from_scratch=false or -p vlm=DIR).
    # The projector starts random too (the encoder loaded here may stand in for the bank's); -p projector_from=DIR
    # continues a pretrained one, checked against the bank's encoder.
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key over the phantom-pretrain preset (e.g. max_steps=2000, seed=0) or a "
                             "pretraining setting of surgvqa.config.PretrainSettings (e.g. heard_share=1.0)")
    aliases = parser.add_argument_group(
        "aliases", "kept for the commands quoted by the model card (checkpoints/tiny-phantom/MODEL_CARD.md): each "
                   "sets the -p key of its name (--steps: max_steps); a -p of the same key wins")
    fields = {**{flag: (key, Config.__dataclass_fields__[key].type) for flag, key in CONFIG_ALIASES.items()},
              **{name: (name, f.type) for name, f in PretrainSettings.__dataclass_fields__.items()}}
    for flag, (key, kind) in fields.items():
        names, dest = ["--" + flag.replace("_", "-")], "alias:" + key
        if str(kind) == "bool":
            aliases.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                 help=f"-p {key}=true/false")
        else:
            aliases.add_argument(*names, dest=dest, type={"int": int, "float": float, "str": str}[
                str(kind).removesuffix(" | None")], default=argparse.SUPPRESS, metavar="V", help=f"-p {key}=V")
    args = parser.parse_args(argv)
    given = {dest.removeprefix("alias:"): v for dest, v in vars(args).items() if dest.startswith("alias:")}
    given.update(parse_overrides(args.param, pretraining=True))
    cfg, settings = pretrain_config(given)
    return args, cfg, settings, given


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg, settings, given = parse_args(argv)
    _, metrics = pretrain(cfg, settings, args.out, device=args.device,
                          command=pretrain_command(args.out, args.device, given))
    print(json.dumps({"steps": metrics["steps"], "min_accuracy": metrics["min_accuracy"],
                      "wall_minutes": round(metrics["wall_minutes"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
