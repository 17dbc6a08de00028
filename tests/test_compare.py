"""The backbone comparison: its command line, and the table it writes from each preset's stored 04 / 05 metrics
(accuracies withheld for random dry-run weights)."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from surgvqa import compare
from surgvqa.config import get_config
from surgvqa.dryrun import DRY_RUN_MARK
from surgvqa.workbook import store_metrics


def test_parameters_for_every_preset_and_for_one():
    common, own = compare.split_params(["limit_test=64", "qwen3vl-2b:vlm=data/x", "max_steps=4"],
                                       ["qwen2vl-2b", "qwen3vl-2b"])
    assert common == {"limit_test": 64, "max_steps": 4}
    assert own == {"qwen2vl-2b": {}, "qwen3vl-2b": {"vlm": "data/x"}}
    with pytest.raises(ValueError, match="names preset 'qwen9'"):
        compare.split_params(["qwen9:vlm=x"], ["qwen2vl-2b"])
    with pytest.raises(ValueError, match="is not key=value"):
        compare.split_params(["limit_test"], ["qwen2vl-2b"])


def test_an_unknown_preset_or_key_stops_before_any_notebook_runs(tmp_path, capsys):
    assert compare.main(["--presets", "smoke,nope", "--reports-dir", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert compare.main(["--presets", "smoke", "-p", "max_stepz=3", "--reports-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def _stored_run(root, preset, vlm_dir, dry_run: bool, samples_per_s=4.0, peak=None):
    model = root / vlm_dir
    model.mkdir(parents=True)
    config = {"model_type": "qwen3_vl"}
    if dry_run:
        config[DRY_RUN_MARK] = {"like": "qwen3vl-2b", "weights": "random"}
    (model / "config.json").write_text(json.dumps(config))
    best = root / "runs" / preset / "best"
    best.mkdir(parents=True)
    get_config(preset, vlm=str(model)).save(best)
    reports = root / "reports" / preset
    store_metrics("04-train", {"best_checkpoint": str(best), "samples_per_s": samples_per_s, "peak_gpu_gib": peak},
                  reports)
    baseline = {"n": 64, "accuracy": 0.5, "ci_low": 0.38, "ci_high": 0.62, "ms_per_query": 12.34}
    store_metrics("05-evaluate", {"baselines": {
        "blind prior": {**baseline, "ms_per_query": 0.0}, "audio-only (headline)": baseline,
        "text-only": {**baseline, "accuracy": 0.75, "ms_per_query": 10.0},
        "text-only, zero-shot base model": {**baseline, "ms_per_query": 8.0}}, "peak_gpu_gib": peak}, reports)


def test_the_table_withholds_random_weights_accuracies_and_keeps_their_timings(tmp_path):
    _stored_run(tmp_path, "qwen3vl-2b", "dry", dry_run=True, samples_per_s=4.0, peak=10.04)
    _stored_run(tmp_path, "qwen2vl-2b", "real", dry_run=False, samples_per_s=8.0)
    table = compare.write_table(["qwen3vl-2b", "qwen2vl-2b"], tmp_path / "reports")
    dry, real = table.loc["qwen3vl-2b"], table.loc["qwen2vl-2b"]
    assert dry["weights"] == "random (dry run)" and pd.isna(dry["heard"]) and pd.isna(dry["read"])
    assert (dry["heard ms/row"], dry["read ms/row"], dry["zero-shot ms/row"]) == (12.3, 10.0, 8.0)
    assert dry["train ms/sample"] == 250.0 and dry["train peak GiB"] == 10.0 and dry["backbone"] == "qwen3_vl"
    assert real["weights"] == "checkpoint" and real["read"] == "75.0 % [38.0, 62.0]" and real["n"] == 64
    assert real["train ms/sample"] == 125.0 and pd.isna(real["train peak GiB"])
    written = json.loads((tmp_path / "reports" / "comparison.json").read_text())
    assert [r["preset"] for r in written] == ["qwen3vl-2b", "qwen2vl-2b"]
    markdown = (tmp_path / "reports" / "comparison.md").read_text()
    assert "withheld" in markdown and "| qwen3vl-2b |" in markdown


def test_the_dry_runs_table_reads_their_reports_and_names_a_missing_one(tmp_path, monkeypatch, capsys):
    _stored_run(tmp_path, "qwen3vl-2b", "dry", dry_run=True, samples_per_s=5.0, peak=8.0)
    (tmp_path / "reports" / "qwen3vl-2b").rename(tmp_path / "reports" / "dry-run-qwen3vl-2b")
    monkeypatch.setattr(compare, "dry_run_reports", lambda preset: tmp_path / "reports" / f"dry-run-{preset}")
    out = str(tmp_path / "reports" / "compare")
    assert compare.main(["--presets", "qwen3vl-2b", "--dry-runs", "--reports-dir", out]) == 0
    written = json.loads((tmp_path / "reports" / "compare" / "comparison.json").read_text())
    assert written[0]["preset"] == "qwen3vl-2b" and written[0]["train ms/sample"] == 200.0
    assert compare.main(["--presets", "qwen3vl-2b,omni-7b", "--dry-runs", "--reports-dir", out]) == 2
    assert "dry-run-omni-7b" in capsys.readouterr().err


def test_a_dry_runs_report_names_its_model_and_card_after_its_checkpoints_are_gone(tmp_path, monkeypatch, capsys):
    """The rows of a GPU box's dry runs, read elsewhere: the checkpoint paths their metrics name do not exist there,
    so the model, backbone and card come from the dry run's own report."""
    _stored_run(tmp_path, "omni-7b", "dry", dry_run=True, samples_per_s=1.0, peak=26.0)
    reports = tmp_path / "reports" / "dry-run-omni-7b"
    (tmp_path / "reports" / "omni-7b").rename(reports)
    trained = json.loads((reports / "metrics" / "04-train.json").read_text())
    shutil.rmtree(trained["best_checkpoint"])
    (reports / "dry-run.json").write_text(json.dumps({"like": "qwen2.5-omni-7b", "gpu": "NVIDIA H100 80GB HBM3"}))
    monkeypatch.setattr(compare, "dry_run_reports", lambda preset: tmp_path / "reports" / f"dry-run-{preset}")
    out = tmp_path / "compare"
    assert compare.main(["--presets", "omni-7b", "--dry-runs", "--reports-dir", str(out)]) == 0
    row = json.loads((out / "comparison.json").read_text())[0]
    assert (row["model"], row["backbone"], row["device"], row["weights"]) == (
        "qwen2.5-omni-7b", "qwen2_5_omni_thinker", "NVIDIA H100 80GB HBM3", "random (dry run)")
    reports.joinpath("dry-run.json").unlink()  # without its report, the missing checkpoint is named, not an errno
    assert compare.main(["--presets", "omni-7b", "--dry-runs", "--reports-dir", str(out)]) == 2
    assert "No such file or directory" in capsys.readouterr().err
