"""The pieces the training loops share (surgvqa.loop)."""
import csv

import pytest
import torch

from surgvqa.loop import Interval, RunLog, TrainerState, due


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_run_log_keeps_its_columns_and_starts_fresh_unless_appending(tmp_path):
    path = tmp_path / "log.csv"
    log = RunLog(path, ["step", "time", "loss", "acc"])
    log.log(1, {"loss": 0.5}, time=12.34567)
    log.log(2, {"acc": 1.0, "extra": 3})  # a missing value is empty, an unknown key dropped
    assert _rows(path) == [["step", "time", "loss", "acc"], ["1", "12.346", "0.5", ""], ["2", "", "", "1.0"]]
    RunLog(path, ["step", "time", "loss", "acc"], fresh=False).log(3, {"loss": 0.25})
    assert _rows(path)[-1] == ["3", "", "0.25", ""] and len(_rows(path)) == 4
    free = RunLog(tmp_path / "free.csv")  # no columns: the first row's keys
    free.write([{"step": 1, "a": 2}])
    RunLog(tmp_path / "free.csv", fresh=False).write([{"step": 2, "b": 3, "a": 4}])
    assert _rows(tmp_path / "free.csv") == [["step", "a"], ["1", "2"], ["2", "4"]]
    RunLog(path).write([{"step": 1}])  # fresh: a new file
    assert _rows(path) == [["step"], ["1"]]
    RunLog(None).log(1, {"loss": 1.0})  # no path: nothing is written
    RunLog(tmp_path / "inactive.csv", active=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "inactive.csv").exists()


def test_due_steps_and_the_interval():
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 3)] == [3, 6]
    interval = Interval()
    assert list(interval.batches(range(3))) == [0, 1, 2]
    interval.add_loss(1.0)
    interval.add_loss(2.0)
    assert interval.mean_loss == 1.5 and interval.waited >= 0 and interval.seconds > 0
    total = interval.waited_total
    interval.restart()
    assert interval.losses == interval.steps == interval.items == 0 and interval.waited_total == total


@pytest.mark.parametrize("metric, values, best_step, stopped", [
    ("eval_accuracy", [0.5, 0.7, 0.6, 0.6], 2, True), ("eval_loss", [1.0, 0.8, 0.9, 0.7], 4, False)])
def test_the_best_evaluation_and_patience(metric, values, best_step, stopped, tmp_path):
    state = TrainerState()
    for step, value in enumerate(values, 1):
        state.step = step
        state.record_evaluation({metric: value}, metric, patience=2)
    assert state.best_step == best_step and state.stopped_early == stopped and len(state.history) == 4
    state.save(tmp_path)
    assert TrainerState.load(tmp_path) == state


def test_length_grouped_batches_are_full_seeded_and_pad_less_than_random_ones():
    from surgvqa.loop import length_grouped_batches

    lengths = [float((i * 37) % 101) for i in range(203)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), window=5)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 8 for b in batches) and len(flat) == len(set(flat)) == 200  # the incomplete batch dropped
    assert batches == length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), window=5)
    assert batches != length_grouped_batches(lengths, 8, torch.Generator().manual_seed(2), window=5)

    def padding(groups):  # padded positions: each row padded to its batch's longest
        return sum(max(lengths[i] for i in b) - lengths[i] for b in groups for i in b)

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [order[i:i + 8] for i in range(0, 200, 8)]
    assert padding(batches) < 0.25 * padding(shuffled)
    # sorted within windows, but the batches' order is drawn: not short to long
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest)
