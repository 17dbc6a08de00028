"""The vision towers (and Qwen2.5-Omni's audio tower) on the stock attention path against packed attention.

    python benchmarks/towers.py [--likes qwen2.5vl-7b,qwen2vl-7b,qwen3vl-8b,qwen2.5-omni-7b] [--clips 8]
                                [--frame-size 392] [--repeats 10] [--out benchmarks/results/towers.json]

transformers hands a tower's packed sequence (its frames, Qwen2.5-VL's windows of 8x8 patches, an audio tower's
chunks) to one attention call only for attention functions whose name contains "flash"; any other runs one call
per slice after a host sync in every layer. ``surgvqa.model.PackedAttention`` (what every model the project builds
runs) makes it one SDPA call a layer. Per published config (random weights, bf16 on CUDA, float32 on a CPU), this
times a forward of ``--clips`` clips of 8 REAL-Colon-sized frames (1240x1080, resized by the backbone's own rule to
``--frame-size``) and, for a tower that hears, as many 4 s questions: median ms over ``--repeats`` after two
warm-up calls, on each path, with the largest difference between the two outputs. Only the towers are built.
Prints a table and writes the JSON. ``--smoke``: tiny configs on the CPU (for tests).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from surgvqa import backbones as B  # noqa: E402
from surgvqa.frames import REAL_COLON_FRAME_SIZE  # noqa: E402
from surgvqa.model import PACKED_ATTENTION, register_packed_attention  # noqa: E402

QUESTION_MEL_FRAMES = 400  # a 4 s question at Whisper's 100 mel frames a second


def tower_classes(backbone: B.Backbone, config) -> dict[str, type]:
    """The classes the model builds its towers from (read off a model built on the meta device: no memory)."""
    with torch.device("meta"):
        model = backbone.model_class(config)
    return {name: type(getattr(model.model, name)) for name in ("visual", "audio_tower") if hasattr(model.model, name)}


def build_towers(like: str, device: torch.device, dtype: torch.dtype, smoke: bool) -> tuple[B.Backbone, dict]:
    backbone = B.backbone_of_like(like)
    config = backbone.tiny_config(_tokenizer(backbone)) if smoke else backbone.published_config(like)
    towers = {}
    for name, cls in tower_classes(backbone, config).items():
        sub = config.vision_config if name == "visual" else config.audio_config
        sub._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            towers[name] = cls._from_config(sub, dtype=dtype).eval()
    return backbone, towers


def _tokenizer(backbone: B.Backbone):
    from surgvqa.dryrun import qwen_tokenizer

    return qwen_tokenizer(backbone)


def tower_inputs(backbone: B.Backbone, towers: dict, clips: int, frame_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """Each tower's call on a batch: clips of 8 random frames at REAL-Colon's size, questions of 4 s."""
    rng = np.random.default_rng(0)
    inputs = {}
    vision = towers["visual"].config
    width, height = REAL_COLON_FRAME_SIZE
    rows, grids = [], []
    for _ in range(clips):
        frames = rng.integers(0, 256, (8, height, width, 3), dtype=np.uint8)
        patches, grid = backbone.clip_inputs(frames, "video", frame_size, vision.patch_size,
                                             vision.temporal_patch_size, vision.spatial_merge_size)
        rows.append(patches)
        grids.append(grid)
    patches = torch.cat(rows).to(device, dtype)
    grid = torch.cat(grids).to(device)
    visual = towers["visual"]
    inputs["visual"] = lambda: visual(patches, grid_thw=grid).pooler_output
    if "audio_tower" in towers:
        audio = towers["audio_tower"]
        mel = torch.randn(clips, audio.config.num_mel_bins, QUESTION_MEL_FRAMES, device=device, dtype=dtype)
        lengths = torch.full((clips,), QUESTION_MEL_FRAMES, device=device)
        inputs["audio_tower"] = lambda: audio(mel.transpose(0, 1).reshape(mel.shape[1], -1), feature_lens=lengths,
                                              aftercnn_lens=(lengths - 1) // 2 + 1).last_hidden_state
    return inputs


def timed(call, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--likes", default="qwen2.5vl-7b,qwen2vl-7b,qwen3vl-8b,qwen2.5-omni-7b")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frame-size", type=int, default=392)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/towers.json")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    counters = register_packed_attention()
    rows = []
    for like in [s.strip() for s in args.likes.split(",") if s.strip()]:
        backbone, towers = build_towers(like, device, dtype, args.smoke)
        for name, call in tower_inputs(backbone, towers, args.clips, args.frame_size, device, dtype).items():
            config = towers[name].config
            config._attn_implementation = "sdpa"
            stock_ms, stock = timed(call, device, args.repeats)
            config._attn_implementation = PACKED_ATTENTION
            calls = counters.packed_calls
            packed_ms, packed = timed(call, device, args.repeats)
            layers = len(getattr(towers[name], "blocks", None) or towers[name].layers)
            rows.append(dict(like=like, tower=name, clips=args.clips, stock_ms=stock_ms, packed_ms=packed_ms,
                             speedup=stock_ms / packed_ms, packed_calls_per_layer=(counters.packed_calls - calls)
                             / (layers * (args.repeats + 2)),
                             max_abs_diff=float((packed.float() - stock.float()).abs().max()),
                             output_abs_mean=float(stock.float().abs().mean())))
        del towers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, dtype=str(dtype), frame_size=args.frame_size, repeats=args.repeats,
                  rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['device']}, {result['dtype']}, {args.clips} clips of 8 frames at {args.frame_size} px "
          f"(median of {args.repeats})")
    print("| backbone | tower | stock ms | packed ms | speed-up | max abs diff (mean abs) |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['like']} | {r['tower']} | {r['stock_ms']:.1f} | {r['packed_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.3g} ({r['output_abs_mean']:.3g}) |")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
