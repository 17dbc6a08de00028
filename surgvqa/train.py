"""Training: ``accelerate launch -m surgvqa.train --preset P [-p key=value ...] [--resume]``.

One loop for any number of processes (CPU or GPU): gradient accumulation, warmup + cosine/linear
schedule, evaluation every ``eval_every`` optimizer steps on eval loss and eval accuracy (candidate
scoring), early stopping on ``early_stop_metric`` with ``patience``, the best checkpoint kept, and a
resumable last state. Logs go to ``output_dir/log.csv`` and to the trackers ``report_to`` names (accelerate's:
TensorBoard in ``output_dir/tb``, Weights & Biases in ``output_dir/wandb``), alignment's as ``align/*``, the best
checkpoint's metrics as ``best/*``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import audio, data
from .collate import EVAL_DRAWS, TRAIN_DRAWS, Collator
from .config import Config, get_config, parse_overrides
from .data import Sample, limited
from .features import QADataset
from .inference import adapter_inputs_uncast, encode_question_audio, score_candidates
from .align import align_projector
from .loop import (STATE_FILE, Interval, RunLog, TrainerState, due, finish_trackers, length_grouped_batches, log_best,
                   optimizer_groups, start_trackers, swap_in)
from .model import build_model, collator, save_checkpoint

ALIGN_SUMMARY = "align_summary.json"  # what projector alignment measured (surgvqa.align), beside the run
LOG_COLUMNS = ["step", "time", "train_loss", "lr", "samples_per_s", "eval_loss", "eval_accuracy"]


def question_audio_paths(samples: Sequence[Sample], split: str, cfg: Config) -> dict[str, str]:
    """Synthesize (or find in the cache) the spoken question of every sample: uid -> wav path."""
    if cfg.question_mode == "text":
        return {}
    manifest = audio.synthesize_split(samples, split, cfg, progress=True)
    return dict(zip(manifest["uid"], manifest["path"]))


TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# What --resume lets differ from the interrupted run's config: where caches live and how work is spread,
# nothing that changes a number.
RESUMABLE_CHANGES = frozenset({"num_workers", "report_to", "device", "fast_inference", "accelerate_config",
                               "phantom_cache_dir", "audio_features_dir", "cache_audio_features"})


def check_resumable(last_dir: Path, cfg: Config) -> None:
    """Refuse to resume when there is no saved state or when ``cfg`` differs from the saved run's config in
    anything outside ``RESUMABLE_CHANGES``; the message names each key with both values."""
    if not (last_dir / STATE_FILE).exists():
        raise FileNotFoundError(f"nothing to resume: no {last_dir / STATE_FILE}")
    saved = json.loads((last_dir / "config.json").read_text())
    differ = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
              if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if differ:
        raise ValueError(f"--resume: this config differs from the run saved in {last_dir} in "
                         + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in sorted(differ.items()))
                         + f"; only {sorted(RESUMABLE_CHANGES)} may change. Start a new output_dir instead.")


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def save_training_state(directory: Path, model, optimizer, scheduler, state: "TrainerState", cfg: Config,
                        accelerator) -> None:
    """What training changes and nothing else: trainable weights (adapter, projector), optimizer and scheduler,
    every process's random generators, step counters and the config. Written into a new folder that is then
    renamed into place, so a run killed while saving resumes from the previous state, whole."""
    import random

    from safetensors.torch import save_file

    staging = directory.with_name(f".{directory.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, staging / _rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        trainable = {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(staging / TRAINABLE_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_FILE)
        state.save(staging)
        cfg.save(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in(staging, directory)
    accelerator.wait_for_everyone()


def load_last(directory: Path, model, optimizer, scheduler, rank: int) -> "TrainerState":
    """Restore ``save_training_state``'s folder into a freshly built model, optimizer and scheduler."""
    import random

    from safetensors.torch import load_file

    trainable = load_file(str(directory / TRAINABLE_FILE))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != expected:
        raise ValueError(f"{directory / TRAINABLE_FILE} holds other trainable weights than this model: missing "
                         f"{sorted(expected - set(trainable))[:5]}, unexpected {sorted(set(trainable) - expected)[:5]}")
    model.load_state_dict(trainable, strict=False)
    saved = torch.load(directory / OPTIMIZER_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = torch.load(directory / _rng_file(rank), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainerState.load(directory)


def trainable_checksum(model) -> torch.Tensor:
    """(sum, sum of squares, weighted sum) of every trainable weight, in float64: equal iff replicas agree."""
    params = [p.detach().double().flatten() for p in model.parameters() if p.requires_grad]
    flat = torch.cat(params)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) / flat.numel()
    return torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]).cpu()


def evaluate_split(model, loader: DataLoader, gen_loader: DataLoader) -> dict[str, float]:
    """Eval loss (answer tokens) and candidate-scoring accuracy over a split."""
    model.eval()
    losses, weights, correct, n = [], [], 0, 0
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(out.loss) * tokens)
            weights.append(tokens)
        for batch in gen_loader:
            for s, scored in zip(batch["samples"], score_candidates(model, batch)):
                correct += scored.label == s.short_answer
                n += 1
    model.train()
    return {"eval_loss": sum(losses) / max(1, sum(weights)), "eval_accuracy": correct / max(1, n)}


# --- the run -------------------------------------------------------------------------------------

@dataclass
class TrainRun:
    """What the loop, its evaluations and its saves share: the accelerator and what it prepared."""
    cfg: Config
    accelerator: Any
    model: Any  # as prepared (wrapped by DDP under several processes)
    optimizer: Any
    scheduler: Any
    collate: Collator
    eval_collate: Collator
    train_set: QADataset
    eval_loader: DataLoader
    eval_gen_loader: DataLoader
    out: Path
    train_rows: int
    eval_rows: int
    length_keys: list[float] | None = None  # the training rows' lengths, when batches are grouped by them

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        """The graft itself: scoring and saving reach into its parts, which DDP's wrapper hides."""
        return self.accelerator.unwrap_model(self.model)


def make_accelerator(cfg: Config):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # NCCL's default 10 min would end a run whose first rank still fills the audio caches or loads weights
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(),
                       mixed_precision="bf16" if cfg.dtype == "bfloat16" and torch.cuda.is_available() else "no",
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2)),
                                        # a batch in which nobody hears the question leaves the projector
                                        # without a gradient
                                        DistributedDataParallelKwargs(
                                            find_unused_parameters=cfg.question_mode != "audio")])


def setup(cfg: Config, accelerator, resume: bool, out: Path, log, trackers: Sequence = ()) -> TrainRun:
    """The rows and their spoken questions (synthesized and encoded once, by the first process), the model
    (its projector aligned first when asked), the optimizer and schedule, all prepared by the accelerator."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    splits = data.load_split(cfg)
    train_rows = limited(splits["train"], cfg.limit_train, cfg.seed)
    eval_rows = limited(splits["eval"], cfg.eval_limit, cfg.seed)
    with accelerator.main_process_first():  # one process writes the audio cache, the others read it
        train_audio = question_audio_paths(train_rows, "train", cfg)
        eval_audio = question_audio_paths(eval_rows, "eval", cfg)
    model = build_model(cfg, device=accelerator.device)
    # The mixed mode's draws: a training epoch's from (seed, epoch), every evaluation's the same, so that a
    # resumed run draws what an uninterrupted one does and evaluations stay comparable.
    collate, eval_collate = collator(model), collator(model)
    with accelerator.main_process_first():
        train_encoded = encode_question_audio(model, train_rows, train_audio, cfg)
        eval_encoded = encode_question_audio(model, eval_rows, eval_audio, cfg)
    if cfg.align_steps and not resume:
        # the projector learns to hear before LoRA (surgvqa.align), on the main process: preparing DDP below
        # broadcasts its weights to every other process
        if accelerator.is_main_process:
            alignment = align_projector(model, train_rows, train_audio, cfg, out, log, trackers)
            (out / ALIGN_SUMMARY).write_text(json.dumps(alignment, indent=2) + "\n")
        accelerator.wait_for_everyone()
    train_set = QADataset(train_rows, cfg, train_audio, encoded_audio=train_encoded, backbone=model.backbone)
    eval_set = QADataset(eval_rows, cfg, eval_audio, encoded_audio=eval_encoded, backbone=model.backbone)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training rows (the {cfg.split} split of {data.data_dir(cfg)}, "
                         f"limit_train {cfg.limit_train}) is fewer than one batch of {cfg.batch_size}")
    optimizer = torch.optim.AdamW(optimizer_groups(model), weight_decay=0.0)
    make_schedule = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    # Not through accelerator.prepare: a prepared scheduler steps once per process for every optimizer step
    # (it assumes each process sees a share of the epoch), so under N processes the schedule ran N times too
    # fast. It is stepped once per optimizer step (train_step), the same in any number of processes.
    scheduler = make_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = accelerator.prepare_data_loader(
        DataLoader(eval_set, batch_size=cfg.batch_size, collate_fn=eval_collate, num_workers=cfg.num_workers),
        device_placement=True)
    eval_gen_loader = accelerator.prepare_data_loader(
        DataLoader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                   collate_fn=lambda items: eval_collate(items, for_generation=True)), device_placement=True)
    return TrainRun(cfg, accelerator, model, optimizer, scheduler, collate, eval_collate, train_set, eval_loader,
                    eval_gen_loader, out, len(train_rows), len(eval_rows),
                    train_set.length_keys() if cfg.group_by_length else None)


def train(cfg: Config, resume: bool = False, stop_after: int | None = None, log=print) -> dict[str, Any]:
    """Train the graft for ``cfg``; returns the final summary (also written to output_dir/summary.json).

    ``stop_after`` ends the run after that many optimizer steps as if interrupted (the last state is
    saved), which is how resuming is tested. Setup, then one flat loop over the epochs' batches: a step
    (``train_step``), a log line every few optimizer steps (``log_interval``), an evaluation every
    ``eval_every`` (``evaluate_and_keep``: the best checkpoint, early stopping, the last state).
    """
    from accelerate.utils import set_seed

    if cfg.align_steps and cfg.question_mode == "text":  # a setting of training only: inference may read a run's cfg
        raise ValueError(f"config align_steps={cfg.align_steps}: aligning the projector needs heard questions, and "
                         f"question_mode='text' hears none (set align_steps=0 for a text-only run)")
    accelerator = make_accelerator(cfg)
    out = cfg.path(cfg.output_dir)
    if resume:
        check_resumable(out / "last", cfg)  # before anything is written
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out)
    set_seed(cfg.seed)
    trackers = start_trackers(cfg, out, fresh=not resume) if accelerator.is_main_process else []
    run = setup(cfg, accelerator, resume, out, log, trackers)
    state = TrainerState()
    if resume:
        state = load_last(out / "last", run.unwrapped, run.optimizer, run.scheduler, accelerator.process_index)
        log(f"[train] resumed at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    logger = RunLog(out / "log.csv", LOG_COLUMNS, fresh=not resume, active=run.main, trackers=trackers)
    uncast = cfg.lora and accelerator.mixed_precision == "bf16"
    run.model.train()
    # the logging interval's training time (evaluation and saving excluded): its samples/s and the ETA
    started, samples_seen, interval = time.time(), 0, Interval()
    # padded and all positions of this process's training batches, counted where the batch is (no sync a step)
    padding = torch.zeros(2, dtype=torch.long, device=accelerator.device)
    while state.step < cfg.max_steps and not state.stopped_early:
        for batch in interval.batches(epoch_batches(run, state)):
            loss = train_step(run, batch, uncast)
            padding[0] += (batch["attention_mask"] == 0).sum()
            padding[1] += batch["attention_mask"].numel()
            state.batches_in_epoch += 1
            samples_seen += len(batch["samples"]) * accelerator.num_processes
            interval.items += len(batch["samples"]) * accelerator.num_processes
            interval.add_loss(loss.item())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            interval.steps += 1
            if due(state.step, max(1, min(10, cfg.eval_every)), cfg.max_steps):
                log_interval(run, state, interval, logger, log)
            if due(state.step, cfg.eval_every, cfg.max_steps):
                evaluate_and_keep(run, state, logger, log)
                interval.restart_clock()
            if state.step >= cfg.max_steps or state.stopped_early:
                break
            if stop_after is not None and state.step >= stop_after:
                save_last(run, state)
                finish_trackers(trackers)
                return {"interrupted_at": state.step}
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    best = [h for h in state.history if h["step"] == state.best_step]
    if best:  # every evaluation's metrics at the best checkpoint's step
        log_best(trackers, {k: v for k, v in best[-1].items() if k != "step"}, state.best_step)
    finish_trackers(trackers)
    return summarize(run, state, samples_seen, time.time() - started, interval.waited_total,
                     float(padding[0]) / max(1, int(padding[1])))


def epoch_batches(run: TrainRun, state: TrainerState):
    """The batches of the run's current epoch still to come. The order of an epoch depends only on
    (seed, epoch), and the batches a resumed run already consumed are skipped: it sees the same batches."""
    cfg = run.cfg
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + state.epoch)
    run.collate.reseed(TRAIN_DRAWS, state.epoch)
    if cfg.group_by_length:
        batches = length_grouped_batches(run.length_keys, cfg.batch_size, generator)
        loader = DataLoader(run.train_set, batch_sampler=batches, collate_fn=run.collate, num_workers=cfg.num_workers,
                            persistent_workers=False)
    else:
        loader = DataLoader(run.train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                            collate_fn=run.collate, num_workers=cfg.num_workers, drop_last=True,
                            persistent_workers=False)
    loader = run.accelerator.prepare_data_loader(loader, device_placement=True)
    skip = state.batches_in_epoch
    return run.accelerator.skip_first_batches(loader, skip) if skip else loader


def train_step(run: TrainRun, batch: dict[str, Any], uncast: bool) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer and the schedule step when the accumulated gradient
    is whole (``accelerator.sync_gradients``). The batch's loss."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        with adapter_inputs_uncast(run.model, uncast):
            loss = run.model(**batch).loss
        accelerator.backward(loss)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
        run.optimizer.zero_grad()
    return loss


def log_interval(run: TrainRun, state: TrainerState, interval: Interval, logger: RunLog, log) -> None:
    """A row of ``log.csv`` (the interval's mean loss, the learning rate, samples/s) and a line with the ETA."""
    cfg, seconds = run.cfg, interval.seconds
    rate, lr = interval.items / seconds, run.scheduler.get_last_lr()[-1]
    logger.log(state.step, {"train_loss": interval.mean_loss, "lr": lr, "samples_per_s": rate}, time=time.time())
    if run.main:
        eta = (cfg.max_steps - state.step) * seconds / interval.steps
        log(f"[train] step {state.step}/{cfg.max_steps}  loss {interval.mean_loss:.4f}  lr {lr:.2e}  "
            f"{rate:.1f} samples/s  eta {int(eta // 60)}m{int(eta % 60):02d}s (training only)")
    interval.restart()


def evaluate_and_keep(run: TrainRun, state: TrainerState, logger: RunLog, log) -> None:
    """Evaluate; keep the checkpoint in ``best/`` when it is the best so far (early stopping counts the others),
    then save the resumable last state."""
    cfg, accelerator = run.cfg, run.accelerator
    run.eval_collate.reseed(EVAL_DRAWS)
    metrics = evaluate_split(run.unwrapped, run.eval_loader, run.eval_gen_loader)
    # every process sees its shard; average the shard results weighted equally by shard size
    gathered = accelerator.gather_for_metrics(torch.tensor([[metrics["eval_loss"], metrics["eval_accuracy"]]],
                                                           device=accelerator.device))
    metrics = {"eval_loss": float(gathered[:, 0].mean()), "eval_accuracy": float(gathered[:, 1].mean())}
    logger.log(state.step, metrics, time=time.time())
    if state.record_evaluation(metrics, cfg.early_stop_metric, cfg.patience):
        accelerator.wait_for_everyone()
        if run.main:
            save_checkpoint(run.unwrapped, run.out / "best", cfg)
    log(f"[train] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + (" (best)" if state.best_step == state.step else ""))
    save_last(run, state)


def save_last(run: TrainRun, state: TrainerState) -> None:
    save_training_state(run.out / "last", run.unwrapped, run.optimizer, run.scheduler, state, run.cfg,
                        run.accelerator)


def summarize(run: TrainRun, state: TrainerState, samples_seen: int, seconds: float, waited: float,
              padding_fraction: float) -> dict[str, Any]:
    """The run's summary (written to ``summary.json`` by the main process), with a check that every process
    ends with the same weights."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    # DDP keeps replicas identical by construction; check it rather than assume it.
    checksums = accelerator.gather(trainable_checksum(run.model).to(accelerator.device).unsqueeze(0)).cpu()
    summary = {"steps": state.step, "best_step": state.best_step, "best_" + cfg.early_stop_metric: state.best_metric,
               "stopped_early": state.stopped_early, "history": state.history,
               "best_checkpoint": str(out / "best"), "train_rows": run.train_rows, "eval_rows": run.eval_rows,
               "processes": accelerator.num_processes,
               "rank_checksums": checksums.tolist(),
               "ranks_in_sync": bool(torch.allclose(checksums, checksums[:1].expand_as(checksums), rtol=0, atol=0)),
               "samples_per_s": samples_seen / max(1e-9, seconds),
               # > a few %: the data workers bound the step (raise num_workers)
               "data_wait_fraction": waited / max(1e-9, seconds),
               # of the main process's training batches: the share of positions that are padding (group_by_length)
               "padding_fraction": padding_fraction,
               # this process's peak of allocated GPU memory (None on a CPU): what the card must hold
               "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None),
               "alignment": json.loads((out / ALIGN_SUMMARY).read_text()) if (out / ALIGN_SUMMARY).is_file() else None}
    if run.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary


def launch_command(preset: str | None, overrides: dict[str, Any], accelerate_config: str | None = None,
                   resume: bool = False) -> list[str]:
    """The command that trains ``preset`` with ``overrides``: ``accelerate launch --config_file F -m
    surgvqa.train ...`` with the config's (or the given) accelerate config, resolved from the repository
    root, or a plain ``python -m surgvqa.train ...`` when there is none (the CPU presets)."""
    cfg = get_config(preset, **overrides)  # validate here: a typo fails before anything starts
    args = ["-m", "surgvqa.train"] + (["--preset", preset] if preset else [])
    for key, value in overrides.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    if resume:
        args.append("--resume")
    config_file = accelerate_config if accelerate_config is not None else cfg.accelerate_config
    if not config_file:
        return [sys.executable] + args
    path = cfg.path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config {config_file!r} not found (looked for {path})")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)] + args


def launch(preset: str | None, overrides: dict[str, Any], accelerate_config: str | None = None,
           resume: bool = False, echo=print) -> dict[str, Any]:
    """Run ``launch_command`` in a subprocess from the repository root, echo its output as it comes, and
    return the run's summary. A notebook calls this so that no CUDA state or process group ever lives in
    the notebook kernel."""
    import subprocess

    from .config import REPO_ROOT

    cfg = get_config(preset, **overrides)
    command = launch_command(preset, overrides, accelerate_config, resume)
    echo("$ " + " ".join(command))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=REPO_ROOT)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.split("\r")[-1]  # progress bars redraw with carriage returns: keep the last state
        tail = (tail + [line])[-40:]
        if not line.startswith(("train:", "synthesize")) or "100%" in line:
            echo(line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n" + "".join(tail))
    return json.loads((cfg.path(cfg.output_dir) / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accelerate launch -m surgvqa.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None)
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. -p lr=3e-4 -p max_steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/last")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = get_config(args.preset, **parse_overrides(args.param))
    summary = train(cfg, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
