"""Frames: the real REAL-Colon loader and ``load_clip``, the one entry point for a sample's 8 frames.

Real frames are read in REAL-Colon's own layout (``<frames_dir>/<video>_frames/<video>_<n>.jpg``) or from
``<frames_dir>/<video>/``, resized keeping their aspect ratio to sides that are multiples of 28 (Qwen2-VL's
patch 14 x merge 2); a missing or unreadable frame is an error naming the sample and every bad file, never a
black image. ``python -m surgvqa phantom-frames`` writes phantom clips (``surgvqa.phantom``) in that layout.
``load_clip`` gives the real JPEGs or the phantom, as the config says; the figures show clips.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .backbones import TINY, Backbone
from .config import Config, get_config
from .data import FRAMES_PER_CLIP, QUESTION_TYPES, Sample
from .phantom import RENDERER_VERSION, ClipState, clip_state_of, render_phantom_clip, stable_seed

log = logging.getLogger(__name__)


# --- real frames ---------------------------------------------------------------------------------

class FrameError(ValueError):
    """Frames of a sample are missing or unreadable; the message names the sample and every bad file."""


# REAL-Colon ships each recording as a folder ``{SSS}-{VVV}_frames/`` of ``SSS-VVV_t.jpg`` files (1240x1080);
# SurgViVQA's frame names are the same ``VVV-VVV_N`` stems.
REAL_COLON_FOLDER = "{video}_frames"
REAL_COLON_FRAME_SIZE = (1240, 1080)  # width, height
_MAX_FRAME_PIXELS = 50_000_000  # a frame larger than this is not a video frame (and could be a decompression bomb)


def real_frame_candidates(frames_dir: Path, video_id: str, frame_name: str) -> list[Path]:
    """Where a frame may live: REAL-Colon's ``<video>_frames/<video>_<n>.jpg``, then ``<video>/<video>_<n>.jpg``
    and ``<video>/<n>.jpg``."""
    number = frame_name.rsplit("_", 1)[-1]
    return [frames_dir / REAL_COLON_FOLDER.format(video=video_id) / f"{frame_name}.jpg",
            frames_dir / video_id / f"{frame_name}.jpg", frames_dir / video_id / f"{number}.jpg"]


def resized_frame_shape(height: int, width: int, frame_size: int, unit: int = TINY.resize_unit,
                        min_pixels: int = TINY.min_pixels, max_pixels: int = TINY.max_pixels) -> tuple[int, int]:
    """(height, width) a frame is resized to: the longer side to ``frame_size``, the aspect ratio kept, both
    sides rounded to a multiple of ``unit`` (the backbone's patch x spatial merge) and the area kept within its
    image processor's pixel bounds, as that processor's smart_resize does. 1240x1080 at 392 gives 392x336 (width
    x height) for the tiny backbone's generation (Qwen2-VL: patch 14 x merge 2)."""
    scale = frame_size / max(height, width)
    h = max(unit, round(height * scale / unit) * unit)
    w = max(unit, round(width * scale / unit) * unit)
    if h * w > max_pixels:
        shrink = math.sqrt(h * w / max_pixels)
        h, w = (max(unit, math.floor(side / shrink / unit) * unit) for side in (h, w))
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (h * w))
        h, w = (math.ceil(side * grow / unit) * unit for side in (h, w))
    return h, w


def vision_tokens(height: int, width: int, frames: int = 8, frames_as: str = "video", patch: int = 14,
                  merge: int = 2, temporal: int = 2) -> int:
    """Vision tokens a clip of frames of this (resized) shape costs the language model."""
    per_frame = (height // patch) * (width // patch) // (merge * merge)
    return per_frame * (frames // temporal if frames_as == "video" else frames)


def load_real_clip(sample: Sample, cfg: Config | None = None, backbone: Backbone = TINY) -> np.ndarray:
    """The real frames of a sample (``clip_frames`` of them) as uint8 (F, H, W, 3), resized as ``resized_frame_shape`` says for the
    backbone that will see them (its patch x merge multiple and pixel bounds), so its patching resizes nothing again.

    Frames are resized, not cropped, so that nothing near the border (a lesion, a tool) is cut away, and
    keep their aspect ratio. Every frame of a clip must have the size of the first.
    """
    cfg = cfg or get_config()
    frames_dir = cfg.path(cfg.frames_dir)
    names = sample.clip_frames(cfg.clip_frames)[0]
    images: list[np.ndarray | None] = [None] * len(names)
    problems, shape = [], None
    for i, name in enumerate(names):
        candidates = real_frame_candidates(frames_dir, sample.video_id, name)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            problems.append(f"missing: {' or '.join(map(str, candidates))}")
            continue
        try:
            with Image.open(path) as image:
                if image.width * image.height > _MAX_FRAME_PIXELS:
                    problems.append(f"unreadable: {path} ({image.width}x{image.height} pixels is not a video frame)")
                    continue
                image.load()
                if shape is None:
                    shape = (image.height, image.width)
                elif (image.height, image.width) != shape:
                    problems.append(f"wrong size: {path} is {image.width}x{image.height}, the clip's first frame "
                                    f"{shape[1]}x{shape[0]}")
                    continue
                h, w = resized_frame_shape(image.height, image.width, cfg.frame_size, backbone.resize_unit,
                                           backbone.min_pixels, backbone.max_pixels)
                images[i] = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            problems.append(f"unreadable: {path} ({type(e).__name__}: {e})")
    if problems:
        raise FrameError(f"sample {sample.uid} ({sample.source}): {len(problems)} of {len(names)} "
                         f"frames missing or unreadable under {frames_dir}:\n  " + "\n  ".join(problems))
    return np.stack(images)


def write_real_colon_frames(samples: Sequence[Sample], out_dir: str | Path, cfg: Config | None = None,
                            render_size: int = 392, quality: int = 90) -> list[Path]:
    """Phantom clips of ``samples`` (``clip_frames`` frames each) written as REAL-Colon JPEGs: 1240x1080, ``<video>_frames/<video>_<n>.jpg``.

    The phantom renders square frames (at ``render_size``); they are stretched to REAL-Colon's frame size so
    that the real-frames path (layout, decoding, aspect-keeping resize, token count) runs end to end anywhere.
    Frames shared by several clips are written once. Returns the files written.
    """
    cfg = cfg or get_config()
    out_dir = Path(out_dir)
    written, done = [], set()
    for s in samples:
        names = s.clip_frames(cfg.clip_frames)[0]
        if all(name in done for name in names):
            continue
        clip = render_phantom_clip(clip_state_of(s, cfg), render_size, cfg.phantom_seed, len(names))
        folder = out_dir / REAL_COLON_FOLDER.format(video=s.video_id)
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in zip(names, clip):
            if name in done:
                continue
            path = folder / f"{name}.jpg"
            image = Image.fromarray(frame).resize(REAL_COLON_FRAME_SIZE, Image.Resampling.BICUBIC)
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="JPEG", quality=quality)
            tmp.replace(path)
            done.add(name)
            written.append(path)
    return written


def phantom_frames_main(argv: list[str] | None = None) -> int:
    """``python -m surgvqa phantom-frames --out DIR [--splits test] [--limit N] [-p key=value]``"""
    import argparse
    import sys

    from .config import parse_overrides
    from .data import limited, load_split

    parser = argparse.ArgumentParser(prog="python -m surgvqa phantom-frames",
                                     description="Write phantom clips of annotation rows as REAL-Colon JPEGs "
                                                 "(1240x1080, <video>_frames/<video>_<n>.jpg), for frames_dir.")
    parser.add_argument("--out", required=True, help="the frames_dir to write")
    parser.add_argument("--splits", default="train,eval,test")
    parser.add_argument("--limit", type=int, default=0,
                        help="rows per split (0: all), chosen as training and evaluation choose them")
    parser.add_argument("--render-size", type=int, default=392, help="phantom render size before the stretch")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = get_config(None, **parse_overrides(args.param))
    splits = load_split(cfg)
    rows = [s for name in args.splits.split(",") for s in limited(splits[name.strip()], args.limit, cfg.seed)]
    out = cfg.path(args.out)
    written = write_real_colon_frames(rows, out, cfg, render_size=args.render_size)
    print(f"[phantom-frames] {len(rows)} rows: {len(written)} frames written under {out}")
    return 0


# --- one entry point for the dataset -------------------------------------------------------------

def _cache_path(cfg: Config, state: ClipState) -> Path:
    # 8-frame clips keep the keys they had before clips could be seen through 16
    frames = () if cfg.clip_frames == FRAMES_PER_CLIP else (cfg.clip_frames,)
    key = stable_seed(RENDERER_VERSION, repr(state), cfg.frame_size, cfg.phantom_seed, *frames)
    return cfg.path(cfg.phantom_cache_dir) / f"v{RENDERER_VERSION}" / f"{key:016x}.npy"


class RenderedClips:
    """Phantom clips this process drew, by (state, size, seed, frames), the most recently used kept within
    ``budget_bytes``. Notebook 05 asks for every test clip once a pass (six passes and more) and 08 twice a
    condition, and a 112 px clip takes about 44 ms to draw on one core. The arrays are read-only: a reader that
    wrote into one would change it for every later reader, so writing raises instead."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.clips: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()  # evaluation decodes its batches in threads

    def get(self, key: tuple) -> np.ndarray:
        with self.lock:
            if key in self.clips:
                self.clips.move_to_end(key)
                return self.clips[key]
        frames = render_phantom_clip(*key)
        frames.setflags(write=False)
        with self.lock:
            if key not in self.clips and frames.nbytes <= self.budget:
                self.clips[key] = frames
                self.used += frames.nbytes
                while self.used > self.budget:
                    self.used -= self.clips.popitem(last=False)[1].nbytes
        return frames


_RENDERED = RenderedClips(512 * 2 ** 20)  # 1,700 clips of 8 frames at 112 px


def load_clip(sample: Sample, cfg: Config | None = None, backbone: Backbone = TINY) -> np.ndarray:
    """The frames of a sample (``clip_frames`` of them), uint8 (F, size, size, 3): real JPEGs (sized for ``backbone``) or the phantom, per
    the config.

    Phantom clips are rendered from the state of the sample's clip; with ``phantom_cache_dir`` set they
    are read from (or written to) an on-disk cache keyed by the state, size, seed and renderer version.
    """
    cfg = cfg or get_config()
    if cfg.frames_source == "real":
        return load_real_clip(sample, cfg, backbone)
    state = clip_state_of(sample, cfg)
    if not cfg.phantom_cache_dir:
        return _RENDERED.get((state, cfg.frame_size, cfg.phantom_seed, cfg.clip_frames))
    path = _cache_path(cfg, state)
    if path.exists():
        frames = np.load(path)
        if frames.shape == (cfg.clip_frames, cfg.frame_size, cfg.frame_size, 3) and frames.dtype == np.uint8:
            return frames
        log.warning("phantom cache %s holds %s %s; rendering again", path, frames.dtype, frames.shape)
    frames = render_phantom_clip(state, cfg.frame_size, cfg.phantom_seed, cfg.clip_frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{stable_seed(path, np.random.random())}.tmp.npy")
    np.save(tmp, frames)
    tmp.replace(path)
    return frames


# --- figures -------------------------------------------------------------------------------------

def frame_grid_figure(frames: np.ndarray, title: str | None = None, columns: int = 4):
    """A matplotlib figure of the frames of one clip in a grid, numbered in time order."""
    import matplotlib.pyplot as plt

    frames = np.asarray(frames)
    rows = int(np.ceil(len(frames) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(frames):
            ax.imshow(frames[i])
            ax.set_title(f"frame {i + 1}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _tight_below_title(fig)
    return fig


def _tight_below_title(fig, title_inches: float = 0.45) -> None:
    # tight_layout ignores the suptitle: keep its band free so it never covers the first row's titles
    fig.tight_layout(rect=(0, 0, 1, 1 - title_inches / fig.get_figheight()))


def save_flipbook_gif(frames: np.ndarray, path: str | Path, fps: float = 2) -> Path:
    """An animated GIF of a clip that loops forever (``fps`` frames a second)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    return path


def gallery_examples(samples: Sequence[Sample]) -> list[tuple[str, str, Sample]]:
    """One sample per (question type, label) present in ``samples``, in question-type order."""
    first: dict[tuple[str, str], Sample] = {}
    for s in samples:
        first.setdefault((s.question_type, s.short_answer), s)
    return [(t, label, first[(t, label)]) for t in QUESTION_TYPES
            for label in sorted(lab for (qt, lab) in first if qt == t)]


def question_type_gallery(samples: Sequence[Sample], cfg: Config | None = None, size: int = 96):
    """A figure with one row per question type and one panel per label: the first and last frame of an
    example clip side by side, so that motion shows as well as appearance."""
    import matplotlib.pyplot as plt

    cfg = (cfg or get_config()).replace(frame_size=size)
    examples = gallery_examples(samples)
    types = [t for t in QUESTION_TYPES if any(e[0] == t for e in examples)]
    columns = max(sum(e[0] == t for e in examples) for t in types)
    fig, axes = plt.subplots(len(types), columns, figsize=(2.6 * columns, 1.45 * len(types)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, qtype in enumerate(types):
        for col, (_, label, sample) in enumerate(e for e in examples if e[0] == qtype):
            frames = load_clip(sample, cfg)
            gap = np.full((size, 3, 3), 255, np.uint8)
            axes[row, col].imshow(np.concatenate([frames[0], gap, frames[-1]], axis=1))
            axes[row, col].set_title(f"{qtype}: {label}", fontsize=7)
    fig.suptitle("Phantom clips per question type and label (first | last frame)", fontsize=10)
    _tight_below_title(fig)
    return fig
