"""What the package's training loops share: fine-tuning (``surgvqa.train.train``), phantom pretraining
(``surgvqa.pretrain.pretrain``) and projector alignment (``surgvqa.align.align_projector``).

Each of them reads as setup, one flat loop over optimizer steps, and named helpers; the pieces here are the
ones all of them need: the run log (CSV, and TensorBoard and Weights & Biases where asked), the optimizer
groups of a graft, bf16 autocast, when a step is due for a log line or an evaluation, the logging interval
(with the time spent waiting for data), and the bookkeeping of the best evaluation and of a resumable state.
Models are taken as arguments (anything with the graft's ``cfg``, ``projector``, ``vlm`` and ``whisper``), so
this module sits below the model.
"""
from __future__ import annotations

import contextlib
import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

STATE_FILE = "trainer_state.json"


# --- the step --------------------------------------------------------------------------------------

def autocast_for(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; elsewhere nothing (a CPU step stays fp32)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_groups(model, weight_decay: float = 0.0, projector: bool = True,
                     language_model: bool = True) -> list[dict[str, Any]]:
    """AdamW groups of a graft's trainable weights: the projector's at ``cfg.projector_lr``, then the language
    model's at ``cfg.lr``. With ``weight_decay`` the language model's matrices decay by it and its biases and
    norms not at all (two groups); the projector never decays. Whisper must stay frozen."""
    if model.whisper is not None and any(p.requires_grad for p in model.whisper.parameters()):
        raise RuntimeError("Whisper must stay frozen")
    cfg, groups = model.cfg, []
    if projector and model.projector is not None:  # a natively hearing model has none
        groups.append({"params": [p for p in model.projector.parameters() if p.requires_grad],
                       "lr": cfg.projector_lr, "weight_decay": 0.0})
    if language_model:
        params = [p for p in model.vlm.parameters() if p.requires_grad]
        if weight_decay:
            groups += [{"params": [p for p in params if p.ndim >= 2], "lr": cfg.lr, "weight_decay": weight_decay},
                       {"params": [p for p in params if p.ndim < 2], "lr": cfg.lr, "weight_decay": 0.0}]
        else:
            groups.append({"params": params, "lr": cfg.lr, "weight_decay": 0.0})
    return groups


# --- the schedule of a run ---------------------------------------------------------------------------

def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether ``step`` ends a period of ``every`` steps, or is ``last`` (the final step, always due)."""
    return step % every == 0 or step == last


class Interval:
    """What one log line reports on: the steps, items (samples or rows) and losses since the line before, the
    seconds they took and the seconds of them spent waiting for the next batch (``batches``); the run's total
    wait is kept too (a few % of the run: the data workers bound the step)."""

    def __init__(self):
        self.waited_total = 0.0
        self.restart()

    def restart(self) -> None:
        self.steps = self.items = self.losses = 0
        self.loss_sum = self.waited = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return max(1e-9, time.perf_counter() - self.started)

    def add_loss(self, value: float) -> None:
        self.loss_sum, self.losses = self.loss_sum + value, self.losses + 1

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.losses

    def batches(self, iterable: Iterable) -> Iterator:
        """The items of ``iterable``, the seconds spent waiting for each added to the wait."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            self.waited, self.waited_total = self.waited + waited, self.waited_total + waited
            yield item


def length_grouped_batches(lengths: Sequence[float], batch_size: int, generator: torch.Generator,
                           window: int = 50) -> list[list[int]]:
    """Full batches of indices whose ``lengths`` are close: a random permutation cut into windows of ``window``
    batches, each window sorted by length and cut into batches, then the batches in a random order (so that no
    epoch runs short to long). The incomplete last batch is dropped, as the random loader drops it."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * window):
        chunk = sorted(order[start:start + batch_size * window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# --- the run log -------------------------------------------------------------------------------------

def start_trackers(cfg, out: Path, fresh: bool = True) -> list:
    """accelerate's trackers for the run in ``out``, as ``cfg.report_to`` names them, started: TensorBoard in
    ``out/tb`` (emptied for a fresh run), Weights & Biases in ``out/wandb`` with the run's config (one W&B run per
    output folder: a resumed run goes on in the same one; ``WANDB_MODE=offline`` keeps it on disk until
    ``wandb sync``). The caller ends them with ``finish_trackers``."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in cfg.trackers():
        if name == "tensorboard":
            if fresh:  # one run per TensorBoard folder: a fresh run's curves never mix with an older one's
                shutil.rmtree(out / "tb", ignore_errors=True)
            tracker = TensorBoardTracker("tb", out)
        else:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise RuntimeError(f"config report_to={cfg.report_to!r} names wandb, which is not installed: "
                                   f"pip install -e .[wandb] (or leave wandb out of report_to)") from None
            id_file = out / "wandb-run-id"
            if fresh or not id_file.is_file():
                id_file.write_text(f"{out.name[:40]}-{int(time.time())}".replace("/", "-") + "\n")
            (out / "wandb").mkdir(exist_ok=True)
            tracker = WandBTracker("surgvqa", dir=str(out), name=out.name, id=id_file.read_text().strip(),
                                   resume="allow", config=cfg.to_dict())
        tracker.start()
        trackers.append(tracker)
    return trackers


def log_best(trackers: Sequence, metrics: dict[str, float], step: int) -> None:
    """The best checkpoint's metrics, as ``best/<name>``: W&B's run summary, TensorBoard's scalars at its step."""
    best = {f"best/{k}": v for k, v in metrics.items()}
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.tracker.summary.update({**best, "best/step": step})
        else:
            tracker.log(best, step=step)


def finish_trackers(trackers: Sequence) -> None:
    for tracker in trackers:
        tracker.finish()


class RunLog:
    """A run's CSV log, written by one process (``active``; without a ``path`` no CSV is written).
    ``columns`` fix the header (a missing value is left empty, an unknown key dropped); without them the first
    row's keys are the header. ``fresh`` starts a new file, else rows are appended to the run's. Every logged
    value also goes to ``trackers`` (``start_trackers``) as ``prefix + name``: TensorBoard at the row's step,
    W&B against its own ``prefix + "step"`` axis (alignment, pretraining and training count steps apart)."""

    def __init__(self, path: str | Path | None, columns: Sequence[str] | None = None, fresh: bool = True,
                 active: bool = True, trackers: Sequence = (), prefix: str = ""):
        self.path, self.active = Path(path) if path is not None else None, active
        self.columns = list(columns) if columns else None
        self.trackers, self.prefix, self.stepped = list(trackers) if self.active else [], prefix, set()
        if self.active and fresh and self.path is not None:
            self.path.unlink(missing_ok=True)  # one run per file: a fresh run's rows never mix with an older one's

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to the CSV file only."""
        if not self.active or self.path is None or not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        if self.columns is None:
            if new:
                self.columns = list(rows[0])
            else:  # appending to a run's file: its header
                with self.path.open(newline="") as f:
                    self.columns = next(csv.reader(f))
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerows([[row.get(k, "") for k in self.columns] for row in rows])

    def log(self, step: int, values: dict[str, float], time: float | None = None) -> None:
        """One row: ``step``, ``time`` when given (rounded to ms), then ``values``, which also go to the
        trackers."""
        if not self.active:
            return
        self.write([{"step": step, **({"time": round(time, 3)} if time is not None else {}), **values}])
        self.log_trackers(step, values)

    def log_trackers(self, step: int, values: dict[str, float]) -> None:
        """``values`` to the trackers only (a table the CSV holds in another shape)."""
        if not self.active:
            return
        tagged = {self.prefix + k: v for k, v in values.items()}
        for tracker in self.trackers:
            if tracker.name == "wandb":
                axis = self.prefix + "step"
                for key in set(tagged) - self.stepped:
                    tracker.tracker.define_metric(key, step_metric=axis)
                self.stepped |= set(tagged)
                tracker.log({**tagged, axis: step})
            else:
                tracker.log(tagged, step=step)


# --- best and last -----------------------------------------------------------------------------------

def improved(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (a loss by being lower, anything else by being higher)."""
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


@dataclass
class TrainerState:
    """The counters of a resumable run, saved beside its last state as ``trainer_state.json``."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def record_evaluation(self, metrics: dict[str, float], metric: str, patience: int) -> bool:
        """Add this step's evaluation to the history; True when it is the best so far by ``metric`` (the caller
        then keeps that checkpoint). ``patience`` evaluations in a row without one stop the run early."""
        self.history.append({"step": self.step, **metrics})
        value = metrics[metric]
        if improved(metric, value, self.best_metric):
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
            return True
        self.evals_without_improvement += 1
        self.stopped_early = self.evals_without_improvement >= patience
        return False

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def swap_in(staging: Path, directory: Path) -> None:
    """Put a fully written ``staging`` folder in the place of ``directory``: a run killed at any moment leaves
    either the previous folder or the new one, whole (the old one is moved aside first, then removed)."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
