"""Phantom renderer throughput: clips (8 frames) per second, in one process and in one process per core.

    python benchmarks/phantom_speed.py [--clips 200] [--sizes 64 112 224] [--workers 2]

Prints a table and writes benchmarks/results/phantom_speed.json. Clip states are random (every
attribute drawn from the priors), so the mix of tools, jets, fluid and lesions is the augmentation mix.
CPU seconds are reported beside wall seconds: on a shared machine wall time also measures the neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from surgvqa.phantom import random_clip_state, render_phantom_clip

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_speed.json"


def render_range(args: tuple[int, int, int]) -> float:
    """Render clips [start, stop) at ``size``; returns the CPU seconds spent."""
    start, stop, size = args
    states = [random_clip_state(i, seed=99) for i in range(start, stop)]
    cpu = time.process_time()
    for state in states:
        render_phantom_clip(state, size)
    return time.process_time() - cpu


def measure(clips: int, size: int, workers: int) -> dict:
    render_range((0, 2, size))  # warm the noise banks and grids
    if workers == 1:
        wall = time.perf_counter()
        cpu = render_range((0, clips, size))
        wall = time.perf_counter() - wall
    else:
        chunks = [(w * clips // workers, (w + 1) * clips // workers, size) for w in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(render_range, [(0, 2, size)] * workers))  # warm every worker
            wall = time.perf_counter()
            cpu = sum(pool.map(render_range, chunks))
            wall = time.perf_counter() - wall
    return {"size": size, "workers": workers, "clips": clips, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "clips_per_s": round(clips / wall, 1),
            "clips_per_cpu_s": round(clips / cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 224])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rows = []
    print(f"{'size':>5} {'workers':>7} {'clips':>6} {'wall s':>8} {'clips/s':>8} {'clips/cpu-s':>11}")
    for size in args.sizes:
        for workers in sorted({1, args.workers}):
            row = measure(args.clips, size, workers)
            rows.append(row)
            print(f"{size:>5} {workers:>7} {row['clips']:>6} {row['wall_s']:>8.2f} {row['clips_per_s']:>8.1f} "
                  f"{row['clips_per_cpu_s']:>11.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "cpu_count": os.cpu_count(), "load_average": load, "results": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
