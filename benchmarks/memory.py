"""Training memory and speed of the real presets on the card each one is meant for, modelled on one large GPU.

    python benchmarks/memory.py --frames-dir DIR [--presets qwen3vl-8b,qwen3vl-8b[clip_frames=16]]
                                [--vlm DIR] [--whisper DIR] [--steps 16] [--out benchmarks/results/memory.json]

Each preset trains through ``surgvqa.train.train`` itself (one process; the same model build, collator,
encoder cache, autocast and optimizer as a real run), with gradient checkpointing on and off, in a fresh
process whose CUDA memory is capped with ``torch.cuda.set_per_process_memory_fraction`` to the card it
models (CARDS: 24 GiB or 80 GiB), so that a run over budget fails here as it would there. A preset may carry
config overrides in brackets, ``qwen3vl-8b[clip_frames=16;frame_size=768]``: the original study's next steps,
each one parameter; the levers of speed likewise (``bf16-lora-1gpu[group_by_length=false]`` beside
``bf16-lora-1gpu``, ``--checkpointing on,off``), all in one run. Reported per run: whether it fit, peak allocated
and reserved memory, training ms/sample over the last logging window (evaluation and saving excluded), vision
tokens per clip, the data loader's wait fraction, the share of batch positions that were padding, and the sizes
of ``last/`` and ``best/``. The batch is the preset's; ``grad_accum`` is 1 (it changes neither memory nor time per
sample). Questions come from the preset's TTS engine (``-p tts_engine=espeak-ng``
offline); their longest duration is reported.

Weights are random by default: each preset loads the dry-run checkpoint of its backbone under
``data/interim/dry-run/<name>`` (``python -m surgvqa make-checkpoint --like NAME --random``, built here when
missing); memory and time depend on shapes, not values. ``--frames-dir``: frames in REAL-Colon's layout
(``python -m surgvqa phantom-frames``, with ``-p clip_frames=16`` where a run sees 16). Writes the JSON and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2 ** 30
# the card each real preset is sized for (GiB), and the peak allocated memory it must stay under on it (the CUDA
# context, cuBLAS workspaces and fragmentation need the rest)
BUDGET_GIB = {24: 21, 80: 70}
CARDS = {"qwen2vl-2b": 24, "qwen3vl-2b": 24, "qlora-2x24gb": 24, "qwen3vl-8b-qlora-2x24gb": 24, "omni-3b": 24,
         "omni-7b-qlora-2x24gb": 24, "qwen2vl-7b": 80, "bf16-lora-1gpu": 80, "qwen25vl-7b": 80, "qwen3vl-8b": 80,
         "omni-7b": 80}
DRY_RUN_ROOT = REPO / "data" / "interim" / "dry-run"


def parse_run(spec: str) -> tuple[str, dict]:
    """``preset`` or ``preset[key=value;key=value]``: the preset and its overrides (checked by the config)."""
    from surgvqa.config import get_config, parse_overrides

    name, _, rest = spec.partition("[")
    if rest and not rest.endswith("]"):
        raise ValueError(f"{spec!r}: overrides go in brackets, preset[key=value;key=value]")
    if name not in CARDS:
        raise ValueError(f"{spec!r}: no card is known for preset {name!r}; choose among {sorted(CARDS)}")
    overrides = parse_overrides([p for p in rest[:-1].split(";") if p]) if rest else {}
    get_config(name, **overrides)  # an unknown key or a bad value fails here, before any run starts
    return name, overrides


def dry_run_vlm(preset: str) -> Path:
    """The dry-run checkpoint of the preset's backbone, built when missing."""
    from surgvqa.backbones import like_of_hub_id
    from surgvqa.config import get_config
    from surgvqa.dryrun import is_dry_run, make_checkpoint

    like = like_of_hub_id(get_config(preset).vlm)
    folder = DRY_RUN_ROOT / like
    if not is_dry_run(folder):
        print(f"== building the {like} dry-run checkpoint -> {folder}", flush=True)
        make_checkpoint(like, folder)
    return folder


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def clip_vision_tokens(cfg, backbone) -> int:
    """Vision tokens of one REAL-Colon clip (1240x1080 frames) as the preset sizes it for its backbone."""
    from surgvqa.frames import REAL_COLON_FRAME_SIZE, resized_frame_shape, vision_tokens

    width, height = REAL_COLON_FRAME_SIZE
    h, w = resized_frame_shape(height, width, cfg.frame_size, backbone.resize_unit, backbone.min_pixels,
                               backbone.max_pixels)
    return vision_tokens(h, w, cfg.clip_frames, cfg.frames_as, patch=backbone.resize_unit // 2)  # merge 2


def run_one(spec: str, checkpointing: bool, args: argparse.Namespace, scratch: Path) -> dict:
    """One capped training run, in this process (the parent starts one process per run)."""
    import pandas as pd
    import torch

    from surgvqa.audio import manifest_path
    from surgvqa.backbones import backbone_of_like, like_of_hub_id
    from surgvqa.config import get_config, parse_overrides
    from surgvqa.train import train

    preset, overrides = parse_run(spec)
    card_gib = CARDS[preset]
    budget_gib = BUDGET_GIB[card_gib]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * GIB / total))
    base = get_config(preset)
    backbone = backbone_of_like(like_of_hub_id(base.vlm))
    out = scratch / f"{spec.replace('[', '_').replace(']', '').replace(';', '_').replace('=', '-')}-" \
                    f"{'ckpt' if checkpointing else 'nockpt'}"
    cfg = get_config(preset, **{
        **parse_overrides(args.param), **overrides, "vlm": args.vlm or str(dry_run_vlm(preset)),
        "whisper": args.whisper, "frames_dir": args.frames_dir,
        "gradient_checkpointing": checkpointing, "grad_accum": 1, "max_steps": args.steps, "eval_every": args.steps,
        "warmup_steps": 1, "limit_train": args.steps * base.batch_size, "eval_limit": base.batch_size,
        "accelerate_config": "", "output_dir": str(out)})
    row = {"preset": spec, "gradient_checkpointing": checkpointing, "batch_size": cfg.batch_size,
           "card_gib": card_gib, "budget_gib": budget_gib, "frame_size": cfg.frame_size, "clip_frames": cfg.clip_frames,
           "vision_tokens_per_clip": clip_vision_tokens(cfg, backbone), "audio_pool": cfg.audio_pool}
    torch.cuda.reset_peak_memory_stats()
    try:
        summary = train(cfg)
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "fits": False, "error": str(e).splitlines()[0][:300],
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}
    log = pd.read_csv(out / "log.csv").dropna(subset=["samples_per_s"])
    manifest = pd.read_csv(manifest_path("train", cfg, ".csv"))
    peak = torch.cuda.max_memory_allocated() / GIB
    return {**row, "fits": peak <= budget_gib, "peak_allocated_gib": peak,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "ms_per_sample": 1000.0 / float(log["samples_per_s"].iloc[-1]),
            "data_wait_fraction": summary["data_wait_fraction"], "padding_fraction": summary["padding_fraction"],
            "steps": summary["steps"],
            "longest_question_s": float(manifest["duration_s"].max()),
            "last_gib": folder_bytes(out / "last") / GIB, "best_gib": folder_bytes(out / "best") / GIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", help="one checkpoint for every preset (default: each backbone's dry run)")
    parser.add_argument("--whisper", default=str(DRY_RUN_ROOT / "whisper-large-v3-turbo"))
    parser.add_argument("--frames-dir", required=True)
    parser.add_argument("--presets", default="qlora-2x24gb,bf16-lora-1gpu",
                        help="comma-separated; each preset or preset[key=value;key=value]")
    parser.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("-p", "--param", action="append", default=[], help="config override key=value, every run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # preset:on|off, run in a child process
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        preset, flag = args.one.split(":")
        print("RESULT " + json.dumps(run_one(preset, flag == "on", args, Path(args.scratch))), flush=True)
        return 0
    specs = [p for p in args.presets.split(",") if p]
    try:
        for spec in specs:
            parse_run(spec)
    except (KeyError, ValueError) as e:
        parser.error(f"--presets: {e.args[0]}")
    if not Path(args.whisper).is_dir():
        parser.error(f"--whisper {args.whisper}: no such folder (python -m surgvqa make-checkpoint --like "
                     f"whisper-large-v3-turbo --random --out {args.whisper})")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        scratch = str(args.keep or temporary)
        # checkpointing on first: the presets' own setting is measured even if a later run is cut short
        for flag in args.checkpointing.split(","):
            for preset in specs:
                print(f"== {preset}, gradient checkpointing {flag}", flush=True)
                child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                        "--one", f"{preset}:{flag}", "--scratch", scratch],
                                       capture_output=True, text=True, cwd=REPO)
                print("\n".join(line for line in (child.stdout + child.stderr).splitlines()
                                 if line.startswith("[train]"))[-2000:], flush=True)
                found = [line[7:] for line in child.stdout.splitlines() if line.startswith("RESULT ")]
                rows.append(json.loads(found[-1]) if found else
                            {"preset": preset, "gradient_checkpointing": flag == "on", "fits": False,
                             "error": (child.stderr.strip().splitlines() or ["no output"])[-1][:300]})
                args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"\n{'preset':40} {'ckpt':>4} {'batch':>5} {'vision tok':>10} {'fits':>5} {'peak GiB':>8} {'budget':>6} {'ms/sample':>9} "
          f"{'data wait':>9} {'padding':>8} {'last/ GiB':>9} {'best/ GiB':>9}")
    for r in rows:
        def num(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{r['preset']:40} {'on' if r['gradient_checkpointing'] else 'off':>4} {num('batch_size', 'd'):>5} "
              f"{num('vision_tokens_per_clip', 'd'):>10} "
              f"{str(r['fits']):>5} {num('peak_allocated_gib', '.1f'):>8} {num('budget_gib', 'd'):>6} "
              f"{num('ms_per_sample', '.1f'):>9} {num('data_wait_fraction', '.3f'):>9} "
              f"{num('padding_fraction', '.3f'):>8} {num('last_gib', '.3f'):>9} "
              f"{num('best_gib', '.3f'):>9}" + (f"  {r['error']}" if r.get("error") else ""))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
