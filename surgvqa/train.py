"""Training: ``accelerate launch -m surgvqa.train --preset P [-p key=value ...] [--resume]``.

One loop for any number of processes (CPU or GPU): gradient accumulation, warmup + cosine/linear
schedule, evaluation every ``eval_every`` optimizer steps on eval loss and eval accuracy (candidate
scoring), early stopping on ``early_stop_metric`` with ``patience``, the best checkpoint kept, and a
resumable last state. Logs go to ``output_dir/log.csv`` and TensorBoard (``output_dir/tb``); Weights &
Biases only when ``wandb=True`` and it is installed.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import audio, data, whisper
from .collate import EVAL_DRAWS, TRAIN_DRAWS, EncodedAudio, QADataset
from .config import Config, get_config, parse_overrides
from .data import Sample, limited
from .inference import adapter_inputs_uncast, score_candidates
from .align import align_projector
from .model import build_model, collator, parameter_groups, save_checkpoint

STATE_FILE = "trainer_state.json"
ALIGN_SUMMARY = "align_summary.json"  # what projector alignment measured (surgvqa.align), beside the run
LOG_COLUMNS = ["step", "time", "train_loss", "lr", "samples_per_s", "eval_loss", "eval_accuracy"]


def encode_question_audio(model, samples: Sequence[Sample], audio_paths: dict[str, str], cfg: Config
                          ) -> EncodedAudio | None:
    """Run the frozen Whisper encoder once over every question file not yet in the cache (``None`` when the
    run hears no audio or ``cache_audio_features`` is off); training then reads the cached outputs."""
    if cfg.question_mode == "text" or not cfg.cache_audio_features:
        return None
    folder = whisper.encoded_audio_dir(whisper.encoder_fingerprint(model.whisper), cfg.audio_pool, cfg)
    collate, by_uid = collator(model), {s.uid: s for s in samples}
    device = next(model.whisper.parameters()).device
    paths = whisper.cache_encoded_audio({s.uid: audio_paths[s.uid] for s in samples},
                                      lambda uid, wave: collate.log_mel(by_uid[uid], wave),
                                      lambda mel: model.whisper_states(mel.to(device)), folder, cfg)
    return EncodedAudio(paths, model.whisper.config.d_model)


def question_audio_paths(samples: Sequence[Sample], split: str, cfg: Config) -> dict[str, str]:
    """Synthesize (or find in the cache) the spoken question of every sample: uid -> wav path."""
    if cfg.question_mode == "text":
        return {}
    manifest = audio.synthesize_split(samples, split, cfg, progress=True)
    return dict(zip(manifest["uid"], manifest["path"]))


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))


TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# What --resume lets differ from the interrupted run's config: where caches live and how work is spread,
# nothing that changes a number.
RESUMABLE_CHANGES = frozenset({"num_workers", "wandb", "device", "fast_inference", "accelerate_config",
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
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
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


def timed(iterable, waited: list[float]):
    """The items of ``iterable``, adding the seconds spent waiting for each to ``waited[0]``."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield item


def improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


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


class Logger:
    """CSV + TensorBoard (+ W&B when asked) logging, main process only."""

    def __init__(self, directory: Path, cfg: Config, active: bool, resume: bool):
        self.active, self.path = active, directory / "log.csv"
        self.writer = self.wandb = None
        if not active:
            return
        if not resume and self.path.exists():
            self.path.unlink()
        if not resume:  # one run per TensorBoard folder: a fresh run's curves never mix with an older one's
            shutil.rmtree(directory / "tb", ignore_errors=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory / "tb"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb=True but the wandb package is not installed (pip install wandb)")
            self.wandb = wandb.init(project="surgvqa", config=cfg.to_dict(), dir=str(directory))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def train(cfg: Config, resume: bool = False, stop_after: int | None = None, log=print) -> dict[str, Any]:
    """Train the graft for ``cfg``; returns the final summary (also written to output_dir/summary.json).

    ``stop_after`` ends the run after that many optimizer steps as if interrupted (the last state is
    saved), which is how resuming is tested. It stays one function, as accelerate's own training loops are: the
    setup, the loop, evaluation and saving share the accelerator and what it prepared; what stands alone (the
    saved state, the resume checks, the logger, the evaluation pass) is a function above.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if cfg.align_steps and cfg.question_mode == "text":  # a setting of training only: inference may read a run's cfg
        raise ValueError(f"config align_steps={cfg.align_steps}: aligning the projector needs heard questions, and "
                         f"question_mode='text' hears none (set align_steps=0 for a text-only run)")
    # NCCL's default 10 min would end a run whose first rank still fills the audio caches or loads weights
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if cfg.dtype == "bfloat16" and torch.cuda.is_available() else "no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2)),
                                               # a batch in which nobody hears the question leaves the
                                               # projector without a gradient
                                               DistributedDataParallelKwargs(
                                                   find_unused_parameters=cfg.question_mode != "audio")])
    main = accelerator.is_main_process
    out = cfg.path(cfg.output_dir)
    last_dir, best_dir = out / "last", out / "best"
    if resume:
        check_resumable(last_dir, cfg)  # before anything is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out)
    set_seed(cfg.seed)

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
        if main:
            alignment = align_projector(model, train_rows, train_audio, cfg, out, log)
            (out / ALIGN_SUMMARY).write_text(json.dumps(alignment, indent=2) + "\n")
        accelerator.wait_for_everyone()
    train_set = QADataset(train_rows, cfg, train_audio, encoded_audio=train_encoded)
    eval_set = QADataset(eval_rows, cfg, eval_audio, encoded_audio=eval_encoded)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training rows (the {cfg.split} split of {data.data_dir(cfg)}, "
                         f"limit_train {cfg.limit_train}) is fewer than one batch of {cfg.batch_size}")

    optimizer = torch.optim.AdamW(parameter_groups(model), weight_decay=0.0)
    make_schedule = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    # Not through accelerator.prepare: a prepared scheduler steps once per process for every optimizer step
    # (it assumes each process sees a share of the epoch), so under N processes the schedule ran N times too
    # fast. It is stepped below once per optimizer step, the same in any number of processes.
    scheduler = make_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainerState()
    if resume:
        state = load_last(last_dir, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.process_index)
        log(f"[train] resumed at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    logger = Logger(out, cfg, main, resume)

    def epoch_loader(epoch: int) -> DataLoader:
        # The order of an epoch depends only on (seed, epoch): a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        collate.reseed(TRAIN_DRAWS, epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                            collate_fn=collate, num_workers=cfg.num_workers, drop_last=True,
                            persistent_workers=False)
        return accelerator.prepare_data_loader(loader, device_placement=True)

    eval_loader = accelerator.prepare_data_loader(
        DataLoader(eval_set, batch_size=cfg.batch_size, collate_fn=eval_collate, num_workers=cfg.num_workers),
        device_placement=True)
    eval_gen_loader = accelerator.prepare_data_loader(
        DataLoader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                   collate_fn=lambda items: eval_collate(items, for_generation=True)), device_placement=True)

    def run_eval() -> dict[str, float]:
        eval_collate.reseed(EVAL_DRAWS)
        # the unwrapped module: scoring reaches into the graft's parts, which DDP's wrapper hides
        metrics = evaluate_split(accelerator.unwrap_model(model), eval_loader, eval_gen_loader)
        # every process sees its shard; average the shard results weighted equally by shard size
        gathered = accelerator.gather_for_metrics(torch.tensor([[metrics["eval_loss"], metrics["eval_accuracy"]]],
                                                               device=accelerator.device))
        return {"eval_loss": float(gathered[:, 0].mean()), "eval_accuracy": float(gathered[:, 1].mean())}

    def save_last() -> None:
        save_training_state(last_dir, accelerator.unwrap_model(model), optimizer, scheduler, state, cfg, accelerator)

    uncast = cfg.lora and accelerator.mixed_precision == "bf16"
    model.train()
    started, samples_seen, window_loss, window_n = time.time(), 0, 0.0, 0
    # the logging window's training time (evaluation and saving excluded): its samples/s and the ETA
    window_started, window_samples, window_steps = time.time(), 0, 0
    waited = [0.0]  # seconds the loop waited for its next batch (frames decoded, audio read, collated)
    while state.step < cfg.max_steps and not state.stopped_early:
        loader = epoch_loader(state.epoch)
        skip = state.batches_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in timed(batches, waited):
            with accelerator.accumulate(model):
                with adapter_inputs_uncast(model, uncast):
                    loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            samples_seen += len(batch["samples"]) * accelerator.num_processes
            window_samples += len(batch["samples"]) * accelerator.num_processes
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            window_steps += 1
            if state.step % max(1, min(10, cfg.eval_every)) == 0 or state.step == cfg.max_steps:
                seconds = max(1e-9, time.time() - window_started)
                rate, lr = window_samples / seconds, scheduler.get_last_lr()[-1]
                logger.log(state.step, {"train_loss": window_loss / window_n, "lr": lr, "samples_per_s": rate})
                if main:
                    eta = (cfg.max_steps - state.step) * seconds / window_steps
                    log(f"[train] step {state.step}/{cfg.max_steps}  loss {window_loss / window_n:.4f}  lr {lr:.2e}  "
                        f"{rate:.1f} samples/s  eta {int(eta // 60)}m{int(eta % 60):02d}s (training only)")
                window_loss, window_n = 0.0, 0
                window_started, window_samples, window_steps = time.time(), 0, 0
            if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
                metrics = run_eval()
                logger.log(state.step, metrics)
                state.history.append({"step": state.step, **metrics})
                value = metrics[cfg.early_stop_metric]
                if improved(cfg.early_stop_metric, value, state.best_metric):
                    state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
                    accelerator.wait_for_everyone()
                    if main:
                        save_checkpoint(accelerator.unwrap_model(model), best_dir, cfg)
                else:
                    state.evals_without_improvement += 1
                    state.stopped_early = state.evals_without_improvement >= cfg.patience
                log(f"[train] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + (" (best)" if state.best_step == state.step else ""))
                save_last()
                window_started = time.time()
            if state.step >= cfg.max_steps or state.stopped_early:
                break
            if stop_after is not None and state.step >= stop_after:
                save_last()
                logger.close()
                return {"interrupted_at": state.step}
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    logger.close()
    # DDP keeps replicas identical by construction; check it rather than assume it.
    checksums = accelerator.gather(trainable_checksum(model).to(accelerator.device).unsqueeze(0)).cpu()
    summary = {"steps": state.step, "best_step": state.best_step, "best_" + cfg.early_stop_metric: state.best_metric,
               "stopped_early": state.stopped_early, "history": state.history,
               "best_checkpoint": str(best_dir), "train_rows": len(train_rows), "eval_rows": len(eval_rows),
               "processes": accelerator.num_processes,
               "rank_checksums": checksums.tolist(),
               "ranks_in_sync": bool(torch.allclose(checksums, checksums[:1].expand_as(checksums), rtol=0, atol=0)),
               "samples_per_s": samples_seen / max(1e-9, time.time() - started),
               # > a few %: the data workers bound the step (raise num_workers)
               "data_wait_fraction": waited[0] / max(1e-9, time.time() - started),
               "alignment": json.loads((out / ALIGN_SUMMARY).read_text()) if (out / ALIGN_SUMMARY).is_file() else None}
    if main:
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
