"""Backbones side by side: the same reduced study over several presets, one table.

``python -m surgvqa compare --presets qwen2vl-2b,qwen3vl-2b [-p key=value ...] [-p PRESET:key=value ...]``

Each preset runs notebooks 04 and 05 with the same overrides (``-p key=value``; ``-p PRESET:key=value`` for one
preset alone, e.g. its checkpoint) into ``<reports-dir>/<preset>/``, training into the preset's own output folder,
so no run writes over another's. The table then reads their stored metrics: per backbone 05's accuracy heard, read
and zero-shot with n and the 95 % interval, the model time per row of each, 04's training time per sample, and the
peak GPU memory of training and evaluation. It is written as ``comparison.json`` and ``comparison.md``.

``--dry-runs`` runs nothing: it writes the table from the reports that ``python -m surgvqa dry-run --preset P`` left in
``reports/dry-run-P/`` for each preset, so the dry runs of a GPU box line up without training anything twice.

A preset whose model folder is a dry-run checkpoint (random weights, ``python -m surgvqa make-checkpoint``) gets
its accuracies withheld: random weights give timings and memory, never results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .backbones import backbone_of_like
from .config import Config, get_config, parse_pairs
from .dryrun import dry_run_reports, is_dry_run
from .workbook import NotebookFailed, markdown_table, read_metrics, run_workbook

NOTEBOOKS = ("04", "05")
# 05's baseline names for the three columns; "zero-shot" is the base model reading the question (a LoRA run's
# adapter off), or, for a run that starts from a pretrained projector, that model hearing it
HEARD, READ = "audio-only (headline)", "text-only"
ZERO_SHOT = ("text-only, zero-shot base model", "audio-only, before fine-tuning")


def split_params(pairs: Sequence[str], presets: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``key=value`` pairs for every preset, and ``PRESET:key=value`` pairs by preset; values are JSON when they
    parse as JSON, else strings."""
    common: dict[str, Any] = {}
    own: dict[str, dict[str, Any]] = {p: {} for p in presets}
    for key, value in parse_pairs(list(pairs)).items():
        if ":" in key:
            preset, key = key.split(":", 1)
            if preset not in own:
                raise ValueError(f"-p {key!r} names preset {preset!r}, which is not compared ({list(presets)})")
            own[preset][key] = value
        else:
            common[key] = value
    return common, own


def run(presets: Sequence[str], common: dict[str, Any], own: dict[str, dict[str, Any]], reports_dir: str | Path,
        html: bool = False, log=print) -> pd.DataFrame:
    """Notebooks 04 and 05 for each preset (every config checked before anything runs), then the table."""
    for preset in presets:  # unknown presets and bad values stop here, before the first run
        get_config(preset, **{k: v for k, v in {**common, **own[preset]}.items() if k in Config.__dataclass_fields__})
    for preset in presets:
        log(f"[compare] {preset}: notebooks {', '.join(NOTEBOOKS)}")
        run_workbook(list(NOTEBOOKS), preset, {**common, **own[preset]}, Path(reports_dir) / preset, html=html,
                     log=log)
    return write_table(presets, reports_dir)


def table_row(preset: str, reports: Path) -> dict[str, Any]:
    """One preset's line from its stored 04 and 05 metrics (see the module docstring)."""
    trained, evaluated = read_metrics("04-train", reports), read_metrics("05-evaluate", reports)
    dry_run = reports / "dry-run.json"
    if dry_run.is_file():  # a dry run's report says what ran where, also after its box and checkpoints are gone
        report = json.loads(dry_run.read_text())
        model, backbone, device = report["like"], backbone_of_like(report["like"]).model_type, report["gpu"]
        random_weights = True
    else:
        cfg = Config.load(Path(trained["best_checkpoint"]))
        model, backbone, device, random_weights = cfg.vlm, _model_type(cfg), None, _is_local_dry_run(cfg)
    baselines = evaluated["baselines"]
    zero_shot = next((baselines[name] for name in ZERO_SHOT if name in baselines), None)
    row: dict[str, Any] = {"preset": preset, "model": model, "backbone": backbone, "device": device,
                           "weights": "random (dry run)" if random_weights else "checkpoint"}
    for column, found in (("heard", baselines.get(HEARD)), ("read", baselines.get(READ)), ("zero-shot", zero_shot)):
        if found is None:
            row[column] = row[f"{column} ms/row"] = None
            continue
        row[column] = None if random_weights else _accuracy(found)
        row[f"{column} ms/row"] = round(float(found["ms_per_query"]), 1)
    row["n"] = baselines[HEARD]["n"] if HEARD in baselines else None
    rate = trained.get("samples_per_s")
    row["train ms/sample"] = round(1000 / rate, 1) if rate else None
    for name, metrics in (("train", trained), ("eval", evaluated)):
        peak = metrics.get("peak_gpu_gib")
        row[f"{name} peak GiB"] = round(peak, 1) if peak is not None else None
    return row


def write_table(presets: Sequence[str], reports_dir: str | Path, folders: dict[str, Path] | None = None
                ) -> pd.DataFrame:
    """The table from each preset's stored metrics, in ``folders[preset]`` (default ``reports_dir/preset``)."""
    reports_dir = Path(reports_dir)
    folders = folders or {p: reports_dir / p for p in presets}
    table = pd.DataFrame([table_row(p, folders[p]) for p in presets]).set_index("preset")
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "comparison.json").write_text(json.dumps(table.reset_index().to_dict("records"), indent=2) + "\n")
    note = ("Accuracy: strict scorer, with n and 95 % interval; withheld (blank) for random dry-run weights. "
            "ms/row: model time per test row at 05's batch; train ms/sample: 04's whole run; peaks: allocated GPU "
            "memory of the training process and of 05.\n\n")
    (reports_dir / "comparison.md").write_text(note + markdown_table(table) + "\n")
    return table


def _accuracy(baseline: dict[str, Any]) -> str:
    return (f"{100 * baseline['accuracy']:.1f} % [{100 * baseline['ci_low']:.1f}, {100 * baseline['ci_high']:.1f}]")


def _is_local_dry_run(cfg: Config) -> bool:
    folder = None if cfg.vlm == "tiny" else cfg.local_dir(cfg.vlm)
    return folder is not None and is_dry_run(folder)


def _model_type(cfg: Config) -> str:
    if cfg.vlm == "tiny":
        return "qwen2_vl (tiny)"
    folder = cfg.local_dir(cfg.vlm)
    if folder is None:
        return "(hub id)"
    return json.loads((folder / "config.json").read_text()).get("model_type", "?")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", required=True, help="comma-separated presets to compare")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="[PRESET:]KEY=VALUE")
    parser.add_argument("--reports-dir", default="reports/compare")
    parser.add_argument("--html", action="store_true", help="also write each executed notebook as HTML")
    parser.add_argument("--dry-runs", action="store_true",
                        help="run nothing: the table from each preset's dry-run reports (reports/dry-run-PRESET)")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if len(set(presets)) != len(presets) or not presets:
        parser.error(f"--presets {args.presets!r}: name each preset once")
    try:
        common, own = split_params(args.param, presets)
        if args.dry_runs:
            table = write_table(presets, args.reports_dir, {p: dry_run_reports(p) for p in presets})
        else:
            table = run(presets, common, own, args.reports_dir, html=args.html)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # an OSError's first argument is its errno: the message and the file are in its str
        print(f"[compare] {e if isinstance(e, OSError) or not e.args else e.args[0]}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        print(f"[compare] FAILED: {e}", file=sys.stderr)
        return 1
    print(markdown_table(table))
    return 0
