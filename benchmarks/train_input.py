"""Training throughput of the tiny preset with and without the cached Whisper encoder outputs.

    python benchmarks/train_input.py [--steps 40] [--preset tiny] [-p key=value ...]

Each variant trains the same model for ``--steps`` optimizer steps from the same seed (one evaluation on a
few eval rows at the end) and reports training samples/s (from the run's own log, evaluation excluded),
the seconds spent filling the encoder-output cache, and the wall seconds of the whole run. The cache is
emptied first, so the "cached" row pays for encoding every question once. Prints a table and writes
benchmarks/results/train_input.json. CPU seconds beside wall seconds: on a shared machine wall time also
measures the neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from surgvqa.config import get_config, parse_overrides
from surgvqa.train import train

RESULTS = Path(__file__).resolve().parent / "results" / "train_input.json"


def run_variant(cached: bool, steps: int, preset: str, overrides: dict, scratch: Path) -> dict:
    features = scratch / "features"
    shutil.rmtree(features, ignore_errors=True)
    cfg = get_config(preset, **{**overrides, "max_steps": steps, "eval_every": steps, "eval_limit": 16,
                                "warmup_steps": min(5, steps), "cache_audio_features": cached,
                                "audio_features_dir": str(features), "output_dir": str(scratch / f"run-{cached}")})
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg, log=lambda *_: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    log = pd.read_csv(scratch / f"run-{cached}" / "log.csv")
    return {"audio": "cached encoder outputs" if cached else "Whisper every step", "steps": steps,
            "batch_size": cfg.batch_size, "question_mode": cfg.question_mode,
            "train_samples_per_s": round(float(log["samples_per_s"].dropna().iloc[-1]), 2),
            "cached_files": len(list(features.glob("*/*.npy"))), "run_wall_s": round(wall, 1),
            "run_cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("-p", "--param", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides = parse_overrides(args.param)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run_variant(cached, args.steps, args.preset, overrides, Path(scratch)) for cached in (False, True)]
    table = pd.DataFrame(rows)
    table["speedup"] = (table["train_samples_per_s"] / table["train_samples_per_s"].iloc[0]).round(2)
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                    "preset": args.preset, "overrides": overrides, "rows": table.to_dict("records")},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
