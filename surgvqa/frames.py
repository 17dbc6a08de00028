"""Frames: the real REAL-Colon loader and a phantom colonoscopy renderer whose pixels carry every label.

Real frames are read in REAL-Colon's own layout (``<frames_dir>/<video>_frames/<video>_<n>.jpg``) or from
``<frames_dir>/<video>/``, resized keeping their aspect ratio to sides that are multiples of 28 (Qwen2-VL's
patch 14 x merge 2); a missing or unreadable frame is an error naming the sample and every bad file, never a
black image. ``python -m surgvqa phantom-frames`` writes phantom clips in that layout.

The phantom is for running the whole study offline. Every annotated clip gets a ``ClipState``: every
visual attribute of the clip, fixed by the annotation rows that share the clip and by the video's lesion
facts (lesion_info.csv), completed by consistency rules and, for what nothing fixes, by a prior drawn
deterministically from (clip, seed). ``render_phantom_clip`` draws 8 frames in which each attribute has
the visual cue a clinician would look for (white light vs NBI palette, dye, tool shapes, water jets,
fluid, red-out, debris, the endoscope body, the room outside the patient, zoom for advancing and
withdrawing, a lateral drift of the scene for lesion motion, the lesion's quadrant, size, colour and
surface pattern, the fold pattern of the colon segment), with nuisance variation (exposure, flicker,
vignetting, camera jitter, specular highlights, texture and sensor noise) so that no single pixel or
global statistic carries a label and one frame alone cannot tell a motion direction.

A learnability probe (generic colour, layout, texture and motion features plus logistic regression)
checks that each label is readable from the pixels of a clip and that motion is not readable from a frame.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .config import Config, get_config
from .data import (FRAMES_PER_CLIP, QUESTION_TYPES, Sample, answer_sentences, data_dir, load_template,
                   question_wordings)

log = logging.getLogger(__name__)

# Bump whenever the renderer's output changes: it is part of every on-disk cache key.
RENDERER_VERSION = 3
PHANTOM_VIDEO = "phantom"  # video_id of the extra random clips made by ``random_clip_samples``
_PHANTOM_FRAME = re.compile(r"^phantom_(\d+)_(\d+)_\d+$")


# --- real frames ---------------------------------------------------------------------------------

class FrameError(ValueError):
    """Frames of a sample are missing or unreadable; the message names the sample and every bad file."""


# REAL-Colon ships each recording as a folder ``{SSS}-{VVV}_frames/`` of ``SSS-VVV_t.jpg`` files (1240x1080);
# SurgViVQA's frame names are the same ``VVV-VVV_N`` stems.
REAL_COLON_FOLDER = "{video}_frames"
REAL_COLON_FRAME_SIZE = (1240, 1080)  # width, height
# Qwen2-VL's image processor keeps the pixel count within these bounds (preprocessor_config.json).
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280
_MAX_FRAME_PIXELS = 50_000_000  # a frame larger than this is not a video frame (and could be a decompression bomb)


def real_frame_candidates(frames_dir: Path, video_id: str, frame_name: str) -> list[Path]:
    """Where a frame may live: REAL-Colon's ``<video>_frames/<video>_<n>.jpg``, then ``<video>/<video>_<n>.jpg``
    and ``<video>/<n>.jpg``."""
    number = frame_name.rsplit("_", 1)[-1]
    return [frames_dir / REAL_COLON_FOLDER.format(video=video_id) / f"{frame_name}.jpg",
            frames_dir / video_id / f"{frame_name}.jpg", frames_dir / video_id / f"{number}.jpg"]


def resized_frame_shape(height: int, width: int, frame_size: int, unit: int = 28,
                        min_pixels: int = QWEN2_VL_MIN_PIXELS, max_pixels: int = QWEN2_VL_MAX_PIXELS
                        ) -> tuple[int, int]:
    """(height, width) a frame is resized to: the longer side to ``frame_size``, the aspect ratio kept, both
    sides rounded to a multiple of ``unit`` (patch 14 x merge 2) and the area kept within Qwen2-VL's pixel
    bounds, as its processor's smart_resize does. 1240x1080 at 392 gives 392x336 (width x height)."""
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


def load_real_clip(sample: Sample, cfg: Config | None = None) -> np.ndarray:
    """The 8 real frames of a sample as uint8 (8, H, W, 3), resized as ``resized_frame_shape`` says.

    Frames are resized, not cropped, so that nothing near the border (a lesion, a tool) is cut away, and
    keep their aspect ratio. Every frame of a clip must have the size of the first.
    """
    cfg = cfg or get_config()
    frames_dir = cfg.path(cfg.frames_dir)
    images: list[np.ndarray | None] = [None] * len(sample.frames)
    problems, shape = [], None
    for i, name in enumerate(sample.frames):
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
                h, w = resized_frame_shape(image.height, image.width, cfg.frame_size)
                images[i] = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            problems.append(f"unreadable: {path} ({type(e).__name__}: {e})")
    if problems:
        raise FrameError(f"sample {sample.uid} ({sample.source}): {len(problems)} of {len(sample.frames)} "
                         f"frames missing or unreadable under {frames_dir}:\n  " + "\n  ".join(problems))
    return np.stack(images)


def write_real_colon_frames(samples: Sequence[Sample], out_dir: str | Path, cfg: Config | None = None,
                            render_size: int = 392, quality: int = 90) -> list[Path]:
    """Phantom clips of ``samples`` written as REAL-Colon JPEGs: 1240x1080, ``<video>_frames/<video>_<n>.jpg``.

    The phantom renders square frames (at ``render_size``); they are stretched to REAL-Colon's frame size so
    that the real-frames path (layout, decoding, aspect-keeping resize, token count) runs end to end anywhere.
    Frames shared by several clips are written once. Returns the files written.
    """
    cfg = cfg or get_config()
    out_dir = Path(out_dir)
    written, done = [], set()
    for s in samples:
        if all(name in done for name in s.frames):
            continue
        clip = render_phantom_clip(clip_state_of(s, cfg), render_size, cfg.phantom_seed)
        folder = out_dir / REAL_COLON_FOLDER.format(video=s.video_id)
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in zip(s.frames, clip):
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


# --- clip states ---------------------------------------------------------------------------------

SITES = ("ascending", "descending", "sigma", "rectum")  # colon segments with a fold pattern of their own
TOOLS = ("none", "catheter", "forceps", "snare")
QUADRANTS = ("upper-left", "upper-right", "lower-left", "lower-right")
DRIFTS = ("stable", "up", "down", "left", "right")
HISTOLOGY_CLASSES = {"AD": "adenoma", "HP": "hyperplastic"}  # lesion_info classes the labels can name


@dataclass(frozen=True)
class ClipState:
    """Every visual attribute of one phantom clip. ``clip`` names the clip and seeds its rendering."""
    clip: str
    outside: bool  # the scope is outside the patient: a room, no colon
    nbi: bool  # narrow-band imaging instead of white light
    blue_dye: bool  # chromoendoscopy dye on the mucosa
    tool: str  # "none", "catheter", "forceps" or "snare", out of the working channel
    endoscope_body: bool  # the endoscope's own shaft in view (retroflexion)
    mucosa_clean: bool  # False: debris on the mucosa
    fluid: bool  # fluid completely occludes the view
    closeup: bool  # the tip is pressed against the wall (red-out)
    flushing: bool  # water jets from the nozzle
    moving: bool  # the scope moves during the clip
    direction: str  # "advancing" (zoom in) or "withdrawing" (zoom out) when moving
    drift: str  # lateral drift of the scene on screen: "stable", "up", "down", "left", "right"
    site: str  # colon segment, shown by its fold pattern
    lesion: bool  # a lesion is in view
    histology: str  # "adenoma" or "hyperplastic": colour and surface pattern of the lesion
    size_mm: int  # lesion size, drawn as its radius
    quadrant: str  # screen quadrant of the lesion over the clip

    def labels(self) -> dict[str, str | None]:
        """The answer label of every question type for this clip (None where the question has no answer,
        e.g. a tool question when no tool is in view)."""
        occluded = self.fluid or self.closeup or self.outside
        tool = None if self.tool == "none" else self.tool
        yes = {True: "yes", False: "no"}
        lesion = self.lesion
        return {
            "mucosa_visibility": yes[self.mucosa_clean and not occluded],
            "tool_identification": tool,
            "tool_catheter_check": None if tool is None else yes[tool == "catheter"],
            "endoscope_visibility": yes[self.endoscope_body],
            "nbi_status": yes[self.nbi],
            "lighting_mode": "NBI" if self.nbi else "WL",
            "blue_dye_presence": yes[self.blue_dye],
            "occlusion_check": yes[self.closeup],
            "fluid_occlusion_level": "complete" if self.fluid else "absent",
            "scope_motion": yes[self.moving],
            "scope_forward_motion": yes[self.direction == "advancing"] if self.moving else None,
            "scope_backward_motion": yes[self.direction == "withdrawing"] if self.moving else None,
            "scope_outside": yes[self.outside],
            "flush_action": yes[self.flushing],
            "scope_motion_type": self.direction if self.moving else None,
            "lesion_histology_extended": self.histology if lesion else None,
            "lesion_size_range": size_range(self.size_mm) if lesion else None,
            "lesion_site": self.site if lesion else None,
            "lesion_screen_position": self.quadrant if lesion else None,
            "lesion_motion_direction": self.drift if lesion else None,
        }


def size_range(size_mm: int) -> str:
    return "<5" if size_mm < 5 else ("5-10" if size_mm <= 10 else ">10")


ATTRIBUTES: dict[str, tuple] = {
    "outside": (False, True), "nbi": (False, True), "blue_dye": (False, True), "tool": TOOLS,
    "endoscope_body": (False, True), "mucosa_clean": (False, True), "fluid": (False, True),
    "closeup": (False, True), "flushing": (False, True), "moving": (False, True),
    "direction": ("advancing", "withdrawing"), "drift": DRIFTS, "site": SITES, "lesion": (False, True),
    "histology": ("adenoma", "hyperplastic"), "size_mm": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20),
    "quadrant": QUADRANTS,
}
# Drawing order of unfixed attributes: occluders before what they would hide, motion before drift.
DRAW_ORDER = ("outside", "fluid", "closeup", "lesion", "tool", "endoscope_body", "blue_dye", "mucosa_clean",
              "flushing", "nbi", "moving", "direction", "drift", "site", "histology", "size_mm", "quadrant")

# Priors for what no annotation fixes (weights per value). Lesion sizes stay under 5 mm, the only size
# bracket the annotations name; a drift needs a moving scope (see the rules).
PRIORS: dict[str, dict] = {
    "outside": {False: 0.9, True: 0.1}, "nbi": {False: 0.6, True: 0.4},
    "blue_dye": {False: 0.92, True: 0.08},
    "tool": {"none": 0.6, "catheter": 0.15, "forceps": 0.15, "snare": 0.1},
    "endoscope_body": {False: 0.85, True: 0.15}, "mucosa_clean": {False: 0.4, True: 0.6},
    "fluid": {False: 0.9, True: 0.1}, "closeup": {False: 0.9, True: 0.1},
    "flushing": {False: 0.85, True: 0.15}, "moving": {False: 0.5, True: 0.5},
    "direction": {"advancing": 0.5, "withdrawing": 0.5}, "drift": {d: 0.2 for d in DRIFTS},
    "site": {s: 0.25 for s in SITES}, "lesion": {False: 0.7, True: 0.3},
    "histology": {"adenoma": 0.5, "hyperplastic": 0.5}, "size_mm": {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25},
    "quadrant": {q: 0.25 for q in QUADRANTS},
}


def _exclusive(a, b) -> bool:
    return not (a and b)


# Pairwise consistency rules (attribute, attribute, compatible(value, value)). Outside the patient there
# is no colon (no lesion, tool, body, dye, fluid, red-out, jets); what a question asks about must be in
# view (a lesion, tool, body or dye is not hidden by fluid or red-out); a drifting scene needs a moving scope.
RULES: list[tuple[str, str, object]] = [
    *[("outside", other, _exclusive) for other in
      ("lesion", "endoscope_body", "blue_dye", "fluid", "closeup", "flushing")],
    ("outside", "tool", lambda outside, tool: not (outside and tool != "none")),
    ("fluid", "closeup", _exclusive),
    *[(occluder, seen, _exclusive) for occluder in ("fluid", "closeup")
      for seen in ("lesion", "endoscope_body", "blue_dye")],
    *[(occluder, "tool", lambda occluded, tool: not (occluded and tool != "none"))
      for occluder in ("fluid", "closeup")],
    ("drift", "moving", lambda drift, moving: drift == "stable" or moving),
]

# What each annotation row fixes: (question_type, label) -> {attribute: allowed values}. The inverse of
# ``ClipState.labels``; where several states give the label, the one with the clearest cue is chosen
# (mucosa "no" is debris; a lesion row puts a lesion in view; a direction row needs a moving scope).
_YES_NO = {"yes": True, "no": False}


def row_constraints(question_type: str, label: str) -> dict[str, set]:
    t, y = question_type, _YES_NO.get(label)
    simple = {"endoscope_visibility": "endoscope_body", "nbi_status": "nbi", "blue_dye_presence": "blue_dye",
              "occlusion_check": "closeup", "scope_motion": "moving", "scope_outside": "outside",
              "flush_action": "flushing"}
    if t in simple and y is not None:
        return {simple[t]: {y}}
    if t == "mucosa_visibility" and y is not None:
        return ({"mucosa_clean": {True}, "fluid": {False}, "closeup": {False}, "outside": {False}} if y
                else {"mucosa_clean": {False}})
    if t == "tool_identification" and label in TOOLS[1:]:
        return {"tool": {label}}
    if t == "tool_catheter_check" and y is not None:
        return {"tool": {"catheter"} if y else {"forceps", "snare"}}
    if t == "lighting_mode" and label in ("NBI", "WL"):
        return {"nbi": {label == "NBI"}}
    if t == "fluid_occlusion_level" and label in ("complete", "absent"):
        return {"fluid": {label == "complete"}}
    if t in ("scope_forward_motion", "scope_backward_motion") and y is not None:
        forward = y if t == "scope_forward_motion" else not y
        return {"moving": {True}, "direction": {"advancing" if forward else "withdrawing"}}
    if t == "scope_motion_type" and label in ("advancing", "withdrawing"):
        return {"moving": {True}, "direction": {label}}
    lesion_attribute = {"lesion_histology_extended": ("histology", ATTRIBUTES["histology"]),
                        "lesion_site": ("site", SITES), "lesion_screen_position": ("quadrant", QUADRANTS),
                        "lesion_motion_direction": ("drift", DRIFTS)}
    if t in lesion_attribute and label in lesion_attribute[t][1]:
        return {"lesion": {True}, lesion_attribute[t][0]: {label}}
    if t == "lesion_size_range":
        sizes = {s for s in ATTRIBUTES["size_mm"] if size_range(s) == label}
        if sizes:
            return {"lesion": {True}, "size_mm": sizes}
    raise ValueError(f"no phantom rendering for question type {t!r} with label {label!r}")


class ClipStateConflict(ValueError):
    """The annotation rows of one clip (with the consistency rules) admit no clip state."""


def _neighbours() -> dict[str, list[tuple[str, object]]]:
    """For every attribute, the attributes it constrains: (target, ok(target value, its value))."""
    out: dict[str, list] = defaultdict(list)
    for a, b, ok in RULES:
        out[a].append((b, lambda vb, va, ok=ok: ok(va, vb)))
        out[b].append((a, ok))
    return out


_NEIGHBOURS = _neighbours()


def _propagate(domains: dict[str, list], changed: Iterable[str], why: str) -> None:
    """Remove values that no value of a related attribute allows, until nothing changes (arc consistency)."""
    queue = list(changed)
    while queue:
        source = queue.pop()
        for target, ok in _NEIGHBOURS[source]:
            keep = [v for v in domains[target] if any(ok(v, w) for w in domains[source])]
            if not keep:
                raise ClipStateConflict(f"{why}: no value of {target!r} is consistent with {source!r} in "
                                        f"{domains[source]}")
            if len(keep) != len(domains[target]):
                domains[target] = keep
                queue.append(target)


def _draw(rng: np.random.Generator, attribute: str, allowed: list) -> object:
    prior = PRIORS[attribute]
    weights = np.array([prior.get(v, 0.0) for v in allowed], float)
    if weights.sum() == 0:  # fixed to values the prior never draws (e.g. a 6 mm lesion): uniform
        weights = np.ones(len(allowed))
    return allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))]


def stable_seed(*parts: object) -> int:
    """A seed from any parts, stable across processes and Python versions (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def solve_clip_state(clip: str, constraints: Iterable[tuple[str, dict[str, set]]], seed: int = 0,
                     lesions: Sequence[dict] = ()) -> ClipState:
    """The clip state of ``clip`` given (reason, constraints) pairs, the video's lesion facts and the priors.

    Constraints are intersected (a contradiction raises ``ClipStateConflict`` naming the reasons), the
    rules propagated, and every attribute left open drawn from its prior in ``DRAW_ORDER`` with an rng
    seeded by (clip, seed). When a lesion is in view and the video has lesion facts that agree with the
    rows, the lesion is one of them (its histology, site and size).
    """
    domains = {a: list(v) for a, v in ATTRIBUTES.items()}
    reasons: dict[str, list[str]] = defaultdict(list)
    for reason, fixed in constraints:
        for attribute, allowed in fixed.items():
            reasons[attribute].append(reason)
            domains[attribute] = [v for v in domains[attribute] if v in allowed]
            if not domains[attribute]:
                raise ClipStateConflict(f"clip {clip}: rows disagree on {attribute}: {reasons[attribute]}")
    _propagate(domains, ATTRIBUTES, f"clip {clip} (rows {sorted({r for rs in reasons.values() for r in rs})})")
    rng = np.random.default_rng(stable_seed("state", clip, seed))
    for attribute in DRAW_ORDER:
        if len(domains[attribute]) > 1:
            domains[attribute] = [_draw(rng, attribute, domains[attribute])]
            _propagate(domains, [attribute], f"clip {clip}")
        if attribute == "lesion" and domains["lesion"] == [True] and lesions:
            fits = [f for f in lesions if f["histology"] in domains["histology"]
                    and f["site"] in domains["site"] and f["size_mm"] in domains["size_mm"]]
            if fits:
                fact = fits[int(rng.integers(len(fits)))]
                domains.update(histology=[fact["histology"]], site=[fact["site"]], size_mm=[fact["size_mm"]])
    return ClipState(clip=clip, **{a: d[0] for a, d in domains.items()})


def clip_name(video_id: str, frames: Sequence[str]) -> str:
    return f"{video_id}:{','.join(frames)}"


@lru_cache(maxsize=8)
def lesion_facts(directory: str) -> dict[str, tuple[dict, ...]]:
    """Per video, the lesions of lesion_info.csv that a phantom can draw (adenoma or hyperplastic, at a
    site with a fold pattern); other lesions (no polyp, SSL, caecum, ...) are left out."""
    import csv

    path = Path(directory) / "lesion_info.csv"
    facts: dict[str, list[dict]] = defaultdict(list)
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                video, size, site, klass = (row["unique_video_name"], int(row["size [mm]"]), row["site"],
                                            row["histology_class"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line}: bad lesion row ({e})") from None
            if klass in HISTOLOGY_CLASSES and site in SITES:
                facts[video].append({"histology": HISTOLOGY_CLASSES[klass], "site": site, "size_mm": size})
    return {video: tuple(rows) for video, rows in facts.items()}


def clip_states_from_annotations(samples: Iterable[Sample], cfg: Config | None = None
                                 ) -> dict[tuple[str, tuple[str, ...]], ClipState]:
    """One ``ClipState`` per clip (keyed by ``Sample.clip_key``) from every row of that clip."""
    cfg = cfg or get_config()
    facts = lesion_facts(str(data_dir(cfg)))
    by_clip: dict[tuple, list[Sample]] = defaultdict(list)
    for s in samples:
        by_clip[s.clip_key].append(s)
    return {key: solve_clip_state(
        clip_name(*key),
        [(f"{s.source} {s.question_type}={s.short_answer}", row_constraints(s.question_type, s.short_answer))
         for s in rows],
        seed=cfg.phantom_seed, lesions=facts.get(key[0], ()))
        for key, rows in by_clip.items()}


@lru_cache(maxsize=4)
def _annotation_states(directory: str, template: str, seed: int) -> dict:
    cfg = get_config(data_dir=directory, template=template, phantom_seed=seed)
    return clip_states_from_annotations(load_template(template, cfg), cfg)


def clip_state_of(sample: Sample, cfg: Config | None = None) -> ClipState:
    """The state of a sample's clip. Annotated clips take every row of the clip in the template file
    (the pixels of a clip do not depend on which of its questions is asked, nor on the split); phantom
    clips from ``random_clip_samples`` are re-made from their seed and index."""
    cfg = cfg or get_config()
    m = _PHANTOM_FRAME.match(sample.frames[0]) if sample.video_id == PHANTOM_VIDEO else None
    if m:
        return random_clip_state(int(m.group(2)), seed=int(m.group(1)))
    states = _annotation_states(str(data_dir(cfg)), cfg.template, cfg.phantom_seed)
    state = states.get(sample.clip_key)
    if state is None:  # a clip that is not in the shipped annotations: its own row alone fixes it
        state = clip_states_from_annotations([sample], cfg)[sample.clip_key]
    return state


# --- random clips for augmentation ---------------------------------------------------------------

def random_clip_state(index: int, seed: int = 0) -> ClipState:
    """A new clip state drawn from the priors alone; the same (index, seed) always gives the same state."""
    frames = [f"phantom_{seed}_{index}_{4 * k}" for k in range(FRAMES_PER_CLIP)]
    return solve_clip_state(clip_name(PHANTOM_VIDEO, frames), [], seed=seed)


def random_clip_samples(n: int, template: str = "out", seed: int = 0, start: int = 0,
                        cfg: Config | None = None) -> list[tuple[ClipState, list[Sample]]]:
    """``n`` new random clips (indices ``start`` .. ``start + n - 1``), each with every question that has
    an answer for it, in the wording of ``template`` and with the annotations' answer sentences.

    A question is left out when the clip gives it no answer (no lesion, no tool, no motion) or when its
    label has no answer sentence in the annotations (white-light ``lighting_mode``, dye present)."""
    wordings = question_wordings(template, cfg)
    sentences = answer_sentences(cfg)
    out = []
    for index in range(start, start + n):
        state = random_clip_state(index, seed)
        frames = tuple(f"phantom_{seed}_{index}_{4 * k}" for k in range(FRAMES_PER_CLIP))
        samples = [Sample(id=f"p{seed}-{index}-{qtype}", video_id=PHANTOM_VIDEO, frames=frames,
                          frame_numbers=tuple(4 * k for k in range(FRAMES_PER_CLIP)),
                          question=wordings[qtype], question_type=qtype,
                          answer=sentences[(qtype, label)], short_answer=label,
                          source=f"phantom seed {seed} clip {index}")
                   for qtype, label in state.labels().items()
                   if label is not None and (qtype, label) in sentences]
        out.append((state, samples))
    return out


# --- rendering -----------------------------------------------------------------------------------

CANVAS_EXTENT = 1.35  # the scene canvas spans [-1.35, 1.35]; a frame at zoom 1 sees [-1, 1]
ZOOM_RANGE = 0.35  # a moving scope changes the zoom by 35 % over the clip
DRIFT_DISTANCE = 0.36  # a drifting scene moves 18 % of the frame width over the clip
JITTER = 0.012  # camera shake per frame, in frame half-widths
LESION_RADIUS = 0.19  # drawn radius of a polyp of 0 mm (see ``lesion_radius``)
# Narrow-band imaging: only blue and green light, shown as brown vessels on teal mucosa.
NBI_MATRIX = np.array([[0.15, 0.45, 0.10], [0.10, 0.60, 0.30], [0.05, 0.45, 0.55]], np.float32)


@dataclass(frozen=True)
class FoldPattern:
    """What a clinician tells a colon segment by when looking down its lumen (drawn by ``_colon``)."""
    frequency: float  # folds per unit of inverse radius: equally spaced along the tube, seen in perspective
    contrast: float  # light a fold's lit crest adds and its shadowed crease takes away
    lobes: int  # corners of the cross-section: 3 for the triangular ascending colon, 0 for a round tube
    tortuosity: float  # how far folds wander from rings, each fold its own way (the bends of the sigma)
    valves: bool  # each fold spans about half the circumference, on alternating sides (valves of Houston)
    lumen: tuple[float, float]  # radius range of the dark lumen, in frame half-widths


# Ascending: thick folds around a triangular lumen; descending: a smooth round tube with faint folds;
# sigma: tight, tortuous folds around a narrow lumen; rectum: a wide ampulla with one to three broad valves.
# The fold frequencies of the sigma, ascending colon and rectum are 2.3 to 2.6 times apart, more than zoom
# and jitter change them, so the spacing alone tells these three apart.
FOLD_PATTERNS = {
    "ascending": FoldPattern(frequency=1.4, contrast=0.45, lobes=3, tortuosity=0.0, valves=False,
                             lumen=(0.17, 0.24)),
    "descending": FoldPattern(frequency=2.0, contrast=0.07, lobes=0, tortuosity=0.0, valves=False,
                              lumen=(0.17, 0.24)),
    "sigma": FoldPattern(frequency=3.6, contrast=0.4, lobes=0, tortuosity=0.9, valves=False, lumen=(0.12, 0.18)),
    "rectum": FoldPattern(frequency=0.6, contrast=0.55, lobes=0, tortuosity=0.0, valves=True, lumen=(0.26, 0.34)),
}
FOLD_FINEST = 0.07  # folds with a shorter period (frame half-widths) fade out, as blur and distance hide them
# The smooth shading is drawn on a grid of half the canvas, but of at least this many pixels (or the whole
# canvas): enough for 3 grid pixels across the finest folds.
SHADING_PIXELS = 128


def _rgb(*values) -> np.ndarray:
    return np.clip(np.array(values, np.float32), 0, 1)


@lru_cache(maxsize=8)
def _noise_bank(n: int, seed: int = 12345) -> np.ndarray:
    """Smooth value noise in [0, 1] of twice the canvas size; clips take random crops of it."""
    rng = np.random.default_rng(seed)
    out = np.zeros((2 * n, 2 * n), np.float32)
    for cells, weight in ((4, 0.5), (12, 0.3), (40, 0.2)):
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        out += weight * np.asarray(coarse.resize((2 * n, 2 * n), Image.Resampling.BICUBIC), np.float32) / 255
    return (out - out.min()) / (out.max() - out.min())


@lru_cache(maxsize=8)
def _sensor_noise(size: int, seed: int = 54321) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 5, (size + 16, size + 16, 3)).astype(np.float32)


@lru_cache(maxsize=8)
def _grid(n: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 * extent - extent
    x, y = np.meshgrid(c, c)  # x to the right, y down
    return x, y


class _Canvas:
    """A float RGB image over [-extent, extent]^2 with its coordinate grids; paints stay local."""

    def __init__(self, n: int, extent: float):
        self.n, self.extent = n, extent
        self.x, self.y = _grid(n, extent)
        self.rgb = np.zeros((n, n, 3), np.float32)

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice]:
        k = self.n / (2 * self.extent)
        lo_y, lo_x = (max(0, int(np.floor((c - r + self.extent) * k))) for c in (cy, cx))
        hi_y, hi_x = (min(self.n, int(np.ceil((c + r + self.extent) * k)) + 1) for c in (cy, cx))
        return slice(lo_y, hi_y), slice(lo_x, hi_x)

    def paint(self, mask: np.ndarray, colour, where: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        """Alpha-blend ``colour`` (a colour or an image of colours) where ``mask`` > 0, in place."""
        region = self.rgb[where]
        m = mask[..., None]
        region *= 1 - m
        region += m * colour

    def disc(self, cx: float, cy: float, r: float, colour, soft: float = 0.3, strength: float = 1.0) -> None:
        where = self.window(cx, cy, r * (1 + soft))
        x, y = self.x[where], self.y[where]
        mask = np.clip((r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)) / (soft * r + 1e-6), 0, 1) * strength
        self.paint(mask, colour, where)


def _segment_distance(x, y, x0, y0, x1, y1):
    """Distance from every point to the segment (x0,y0)-(x1,y1), and the position t in [0, 1] along it."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2), t


def _colon(rng, state, c: _Canvas, texture) -> tuple[float, float]:
    """Mucosa, folds, vessels and lumen of the colon segment; returns the lumen centre.

    Each fold is lit on the side facing the scope and shadowed behind its crest (a skewed wave over depth).
    The shading is smooth, so on large canvases it is computed on a coarser grid and resized; the texture
    and vessels stay at full resolution.
    """
    pattern = FOLD_PATTERNS[state.site]
    x, y = _grid(min(c.n, max(c.n // 2, SHADING_PIXELS)), c.extent)
    # Python floats, so that the float32 grids stay float32 (numpy scalars would promote them to float64)
    lx, ly = rng.uniform(-0.15, 0.15, 2).tolist()
    phase, bend_phase = rng.uniform(0, 2 * np.pi, 2).tolist()
    frequency = pattern.frequency * float(rng.uniform(0.93, 1.07))
    rho = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) + 1e-3
    theta = np.arctan2(y - ly, x - lx)
    if pattern.lobes:
        rho = rho * (1 + 0.22 * np.cos(pattern.lobes * theta + phase))
    depth = 1 / rho  # perspective: unlike equal spacing in log radius, no zoom maps the folds onto themselves
    cycles = frequency * depth + phase / (2 * np.pi)
    if pattern.tortuosity:  # the bend turns with depth, so neighbouring folds bend differently
        cycles += pattern.tortuosity * (np.sin(2 * theta + 1.5 * depth + bend_phase)
                                        + 0.5 * np.sin(3 * theta - 1.1 * depth + 2 * bend_phase))
    wave = 2 * np.pi * cycles
    folds = (np.sin(wave) - 0.5 * np.sin(2 * wave)) / 1.3  # slow rise to the crest, sharp drop to the crease
    if pattern.valves:  # fold k on the side at angle phase + k pi; at the fold boundaries the wave is 0
        side = np.cos(theta - phase - np.pi * np.floor(cycles))
        folds *= np.clip(0.5 + 0.7 * side, 0, 1) ** 1.5
    folds *= np.clip(rho ** 2 / (frequency * FOLD_FINEST) - 1, 0, 1)  # a fold's period is rho^2 / frequency
    light = 1 + pattern.contrast * folds
    light *= np.sqrt(np.clip(rho / 0.9, 0.12, 1.0))  # farther wall, less light
    lumen_r = float(rng.uniform(*pattern.lumen))
    light *= 1 - 0.85 * np.clip((lumen_r - rho) / (0.8 * lumen_r), 0, 1)
    light = np.asarray(Image.fromarray(light, mode="F").resize((c.n, c.n), Image.Resampling.BILINEAR))
    light = light * (0.85 + 0.3 * texture)
    base = _rgb(0.84, 0.44, 0.38) + rng.normal(0, [0.04, 0.04, 0.03]).astype(np.float32)
    c.rgb[:] = light[..., None] * base
    vessels = np.clip(1 - np.abs(texture - float(rng.uniform(0.35, 0.65))) / 0.02, 0, 1) * 0.5
    c.paint(vessels, _rgb(0.55, 0.12, 0.12) * light[..., None])
    return lx, ly


def _outside(rng, c: _Canvas, texture) -> None:
    """The procedure room seen by a scope outside the patient: walls, drapes, lamps; no tissue."""
    wall = _rgb(0.62, 0.64, 0.66) + rng.normal(0, 0.04, 3).astype(np.float32)
    c.rgb[:] = wall * ((0.75 + 0.3 * (c.y + c.extent) / (2 * c.extent)) * (0.9 + 0.2 * texture))[..., None]
    for _ in range(rng.integers(2, 4)):
        x0, y0 = rng.uniform(-1.2, 0.6, 2)
        w, h = rng.uniform(0.4, 1.0, 2)
        where = c.window(x0 + w / 2, y0 + h / 2, max(w, h) / 2)
        x, y = c.x[where], c.y[where]
        drape = ((x > x0) & (x < x0 + w) & (y > y0) & (y < y0 + h)).astype(np.float32)
        c.paint(drape, _rgb(0.25, 0.48, 0.5) * (0.8 + 0.3 * texture[where])[..., None], where)
    for _ in range(rng.integers(1, 3)):
        c.disc(*rng.uniform(-1, 1, 2), rng.uniform(0.1, 0.2), _rgb(1, 1, 1), soft=1.0)


def _closeup(rng, c: _Canvas, texture) -> None:
    """Red-out: the tip against the wall, a blurred red field with a broad glare and no lumen."""
    red = _rgb(0.78, 0.16, 0.12) + rng.normal(0, 0.03, 3).astype(np.float32)
    c.rgb[:] = red * (0.8 + 0.4 * texture)[..., None]
    c.disc(*rng.uniform(-0.6, 0.6, 2), rng.uniform(0.5, 0.9), _rgb(1.0, 0.55, 0.45), soft=1.0, strength=0.6)


def lesion_radius(size_mm: int) -> float:
    """The drawn radius of a polyp in frame half-widths: even a 1 mm polyp is drawn ~20 % of the frame wide,
    as it looks up close, so that its colour and pattern can be seen at 64 px."""
    return LESION_RADIUS + 0.015 * min(size_mm, 10)


def _lesion(rng, state, c: _Canvas, cx: float, cy: float) -> None:
    """A small polyp: size by radius, a shadow at its base; adenoma red-brown with tubular pits (stripes),
    hyperplastic pale with round pits (dots)."""
    r = lesion_radius(state.size_mm)
    where = c.window(cx, cy, 1.6 * r)
    x, y = c.x[where] - cx, c.y[where] - cy
    d = np.sqrt(x ** 2 + y ** 2) / (1 + 0.08 * np.sin(5 * np.arctan2(y, x) + rng.uniform(0, 6.3)))
    c.paint(0.45 * np.clip((1.45 * r - d) / (0.5 * r), 0, 1), _rgb(0.25, 0.06, 0.05), where)  # base shadow
    mask = np.clip((r - d) / (0.2 * r), 0, 1)
    dome = np.clip(1 - (d / r) ** 2, 0, 1)
    angle = rng.uniform(0, np.pi)
    period = r / 2.2  # pits scale with the polyp, so the pattern shows at any size
    if state.histology == "adenoma":
        colour = _rgb(0.66, 0.1, 0.03) + rng.normal(0, 0.02, 3).astype(np.float32)
        pattern = 0.7 + 0.3 * np.cos(2 * np.pi / period * (x * np.cos(angle) + y * np.sin(angle)))
    else:
        colour = _rgb(0.95, 0.83, 0.74) + rng.normal(0, 0.02, 3).astype(np.float32)
        pattern = 1 - 0.25 * (np.cos(2 * np.pi / period * x) * np.cos(2 * np.pi / period * y) > 0.5)
    c.paint(mask, ((0.8 + 0.25 * dome) * pattern)[..., None] * colour, where)
    c.disc(cx - 0.3 * r, cy - 0.3 * r, 0.18 * r, _rgb(1, 1, 1), soft=1.0, strength=0.7)


def _endoscope_body(rng, c: _Canvas, lumen: tuple[float, float], away_from: tuple[float, float] | None = None
                    ) -> None:
    """The scope's own black shaft seen in retroflexion, with depth markings, from the lumen to an edge;
    at least 70 degrees away from the point ``away_from`` (the lesion), so that it never hides it."""
    x0, y0 = lumen
    if away_from is None:
        angle = rng.uniform(0, 2 * np.pi)
    else:
        angle = np.arctan2(away_from[1] - y0, away_from[0] - x0) + rng.uniform(1.2, 2 * np.pi - 1.2)
    d, t = _segment_distance(c.x, c.y, x0, y0, x0 + 2.2 * np.cos(angle), y0 + 2.2 * np.sin(angle))
    width = 0.13 + 0.1 * t
    mask = np.clip((width - d) / 0.02, 0, 1)
    shine = 0.08 + 0.3 * np.clip(1 - np.abs(d / width - 0.35) / 0.15, 0, 1)
    marks = (np.cos(2 * np.pi * (9 * t - 0.5)) > 0.92).astype(np.float32)  # none on the tip: no pale blob
    c.paint(mask, (shine * (1 - marks) + 0.85 * marks)[..., None] * np.ones(3, np.float32))


def _aim(rng, x0: float, y0: float, spread: float, away_from: tuple[float, float] | None) -> float:
    """The screen angle of something entering at (x0, y0) and pointing at the centre, turned by up to
    ``spread`` radians; turned away from the point ``away_from`` (the lesion), so that it never hides it."""
    if away_from is None:
        return float(np.arctan2(-y0, -x0) + rng.uniform(-spread, spread))
    lx, ly = away_from[0] - x0, away_from[1] - y0
    side = np.sign(-x0 * ly + y0 * lx) or 1.0  # > 0: the point lies at a larger angle than the centre
    return float(np.arctan2(-y0, -x0) - side * rng.uniform(0.6, 1.0) * spread)


def _tool_layer(rng, tool: str, x: np.ndarray, y: np.ndarray, away_from: tuple[float, float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """A tool out of the working channel at the lower right, fixed on screen: colour and alpha."""
    x0, y0 = 1.05 + rng.uniform(-0.05, 0.05), 1.05 + rng.uniform(-0.05, 0.05)
    angle = _aim(rng, x0, y0, 0.3, away_from)
    ux, uy = np.cos(angle), np.sin(angle)
    colour = np.zeros(x.shape + (3,), np.float32)
    if tool == "catheter":  # a blue plastic tube
        length = rng.uniform(0.85, 1.1)
        d, _ = _segment_distance(x, y, x0, y0, x0 + length * ux, y0 + length * uy)
        alpha = np.clip((0.05 - d) / 0.012, 0, 1)
        colour[:] = _rgb(0.15, 0.4, 0.88) * np.clip(1.05 - 0.5 * (d / 0.05) ** 2, 0, 1)[..., None]
    elif tool == "forceps":  # a metal coil sheath with two open cups
        length = rng.uniform(0.6, 0.8)
        tx, ty = x0 + length * ux, y0 + length * uy
        d, t = _segment_distance(x, y, x0, y0, tx, ty)
        alpha = np.clip((0.065 - d) / 0.012, 0, 1)
        colour[:] = (0.55 + 0.2 * (np.cos(2 * np.pi * t * length / 0.03) > 0))[..., None] * _rgb(0.78, 0.78, 0.8)
        for side in (-0.45, 0.45):
            jaw = angle + side
            dj, tj = _segment_distance(x, y, tx, ty, tx + 0.2 * np.cos(jaw), ty + 0.2 * np.sin(jaw))
            jaw_mask = np.clip((0.045 * (1 - 0.4 * tj) - dj) / 0.01, 0, 1)
            colour += jaw_mask[..., None] * (_rgb(0.88, 0.88, 0.9) - colour)
            alpha = np.maximum(alpha, jaw_mask)
    elif tool == "snare":  # a white sheath and a thin wire loop ahead of it
        length = rng.uniform(0.45, 0.6)
        tx, ty = x0 + length * ux, y0 + length * uy
        d, _ = _segment_distance(x, y, x0, y0, tx, ty)
        alpha = np.clip((0.045 - d) / 0.01, 0, 1)
        colour[:] = _rgb(0.93, 0.93, 0.9)
        a, b = 0.26, 0.16
        along = (x - tx) * ux + (y - ty) * uy - a
        across = -(x - tx) * uy + (y - ty) * ux
        wire = np.clip((0.014 - np.abs(np.sqrt((along / a) ** 2 + (across / b) ** 2) - 1) * b) / 0.006, 0, 1)
        colour += wire[..., None] * (_rgb(0.3, 0.3, 0.33) - colour)
        alpha = np.maximum(alpha, wire)
    else:
        raise ValueError(f"unknown tool {tool!r}; tools: {TOOLS[1:]}")
    return colour, alpha.astype(np.float32)


def _jets(rng, x: np.ndarray, y: np.ndarray, frames: int, away_from: tuple[float, float] | None = None
          ) -> np.ndarray:
    """Water jets from the nozzle at the lower left, changing length and angle from frame to frame."""
    x0, y0 = -1.0 + rng.uniform(-0.08, 0.08), 1.0 + rng.uniform(-0.08, 0.08)
    angles = _aim(rng, x0, y0, 0.4, away_from) + rng.normal(0, 0.08, frames)
    lengths = rng.uniform(0.7, 1.5, frames)
    widths = rng.uniform(0.05, 0.09, frames)
    alpha = np.empty((frames,) + x.shape, np.float32)
    for f in range(frames):
        d, t = _segment_distance(x, y, x0, y0, x0 + lengths[f] * np.cos(angles[f]),
                                 y0 + lengths[f] * np.sin(angles[f]))
        w = widths[f] * (0.6 + 0.8 * t)
        alpha[f] = 0.75 * np.clip((w - d) / (0.5 * w), 0, 1)
    return alpha


def render_phantom_clip(state: ClipState, size: int = 224, seed: int = 0) -> np.ndarray:
    """The 8 frames of a clip state as uint8 (8, size, size, 3), the same for the same (state, size, seed).

    The scene is drawn once on a canvas larger than the frame; each frame is a view of it (zoom for
    advancing/withdrawing, a pan for drift, camera jitter) cut out and resized in one step. Screen-fixed
    parts (tool, jets, vignetting, exposure flicker, sensor noise) are then added to every frame.
    """
    if size < 16:
        raise ValueError(f"frame size {size} is too small to draw a clip (minimum 16)")
    def stream(part: str) -> np.random.Generator:
        # one random stream per part, so that changing one attribute leaves every other part unchanged
        return np.random.default_rng(stable_seed("render", state.clip, seed, part))

    rng = stream("view")
    n = int(round(size * CANVAS_EXTENT))
    c = _Canvas(n, CANVAS_EXTENT)
    ox, oy = stream("texture").integers(0, n, 2)
    texture = _noise_bank(n)[oy:oy + n, ox:ox + n]

    # The view of every frame: zoom, and the scene point at the screen centre.
    t = np.linspace(0, 1, FRAMES_PER_CLIP)
    zoom = np.full(FRAMES_PER_CLIP, rng.uniform(1.05, 1.2))
    if state.moving:  # geometric about the middle frame, which then looks like a still clip's frame
        zoom *= (1 + ZOOM_RANGE) ** ((t - 0.5) * (1 if state.direction == "advancing" else -1))
    step = {"stable": (0, 0), "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[state.drift]
    # the scene moves on screen by +drift, so the view centre moves the other way
    centre = -np.outer(t - 0.5, step) * DRIFT_DISTANCE * rng.uniform(0.9, 1.1) / zoom[:, None]
    centre += rng.normal(0, JITTER, (FRAMES_PER_CLIP, 2))

    lesion_on_screen = None  # where the lesion is in the middle frame, in frame half-widths
    if state.outside:
        _outside(stream("room"), c, texture)
    elif state.closeup:
        _closeup(stream("closeup"), c, texture)
    else:
        lumen = _colon(stream("colon"), state, c, texture)
        if state.blue_dye:  # stains the mucosa in patches; its shading stays, so the folds show through
            c.paint(0.55 * np.clip(0.4 + texture, 0, 1),
                    _rgb(0.2, 0.25, 0.7) * c.rgb.mean(-1, keepdims=True) / 0.6)
        if not state.mucosa_clean:
            debris = stream("debris")
            for _ in range(debris.integers(18, 30)):  # stool residue: brown clumps with a yellow core, which
                # stay darker than the mucosa under NBI too
                bx, by, br = *debris.uniform(-1.25, 1.25, 2), debris.uniform(0.05, 0.11)
                c.disc(bx, by, br, _rgb(0.42, 0.27, 0.06) + debris.normal(0, 0.03, 3).astype(np.float32), soft=0.3)
                c.disc(bx, by, 0.5 * br, _rgb(0.8, 0.62, 0.16) + debris.normal(0, 0.04, 3).astype(np.float32),
                       soft=0.5)
        lesion_on_canvas = None
        if state.lesion:  # the quadrant is where the lesion sits in the middle of the clip
            lesion = stream("lesion")
            # off the quadrant's diagonal, where the tool (lower right) and the jets (lower left) point
            near, far = lesion.uniform(0.25, 0.36), lesion.uniform(0.48, 0.62)
            near = max(near, lesion_radius(state.size_mm))  # a large polyp stays clear of the next quadrant
            qx, qy = (near, far) if lesion.random() < 0.5 else (far, near)
            qx *= 1 if state.quadrant.endswith("right") else -1
            qy *= -1 if state.quadrant.startswith("upper") else 1
            lesion_on_screen = (qx, qy)
            mid = FRAMES_PER_CLIP // 2
            lesion_on_canvas = (centre[mid, 0] + qx / zoom[mid], centre[mid, 1] + qy / zoom[mid])
        if state.endoscope_body:
            _endoscope_body(stream("body"), c, lumen, lesion_on_canvas)
        if state.lesion:
            _lesion(lesion, state, c, *lesion_on_canvas)
        glints = stream("specular")
        for _ in range(glints.integers(3, 9)):  # specular highlights on the wet mucosa
            c.disc(*glints.uniform(-1.2, 1.2, 2), glints.uniform(0.01, 0.03), _rgb(1, 1, 1), soft=1.0)
        if state.fluid:
            fluid = stream("fluid")
            murk = _rgb(0.55, 0.5, 0.22) + fluid.normal(0, 0.04, 3).astype(np.float32)
            c.paint(np.full(c.x.shape, 0.88, np.float32), murk * (0.8 + 0.4 * texture)[..., None])
            for _ in range(fluid.integers(6, 14)):  # bubbles
                bx, by, br = *fluid.uniform(-1.2, 1.2, 2), fluid.uniform(0.03, 0.08)
                where = c.window(bx, by, br + 0.02)
                ring = np.abs(np.sqrt((c.x[where] - bx) ** 2 + (c.y[where] - by) ** 2) - br)
                c.paint(0.7 * np.clip(1 - ring / 0.012, 0, 1), _rgb(0.95, 0.95, 0.95), where)
    scene = c.rgb @ NBI_MATRIX.T if state.nbi else c.rgb
    canvas = Image.fromarray((np.clip(scene, 0, 1) * 255).astype(np.uint8))

    # Screen-fixed layers, then per frame (kept in cache): the view of the canvas (the box of canvas
    # pixels the frame sees, resized), tool, jets, exposure x flicker x vignetting, sensor noise.
    sx, sy = _grid(size, 1.0)
    tool_alpha = tool_paint = jets = None
    if state.tool != "none":
        colour, tool_alpha = _tool_layer(stream("tool"), state.tool, sx, sy, lesion_on_screen)
        tool_paint = tool_alpha[..., None] * 255 * (colour @ NBI_MATRIX.T if state.nbi else colour)
        tool_alpha = 1 - tool_alpha[..., None]
    if state.flushing:
        jets = _jets(stream("jets"), sx, sy, FRAMES_PER_CLIP, lesion_on_screen)[..., None]
        water = 255 * _rgb(0.85, 0.93, 1.0)
        water = water @ NBI_MATRIX.T if state.nbi else water
    camera = stream("camera")
    vignette = (1 - camera.uniform(0.2, 0.45) * (sx ** 2 + sy ** 2) / 2)[..., None]
    gain = camera.uniform(0.8, 1.15) * (1 + camera.normal(0, 0.05, FRAMES_PER_CLIP))
    noise = _sensor_noise(size)
    shifts = camera.integers(0, 16, (FRAMES_PER_CLIP, 2))
    px_per_unit = n / (2 * CANVAS_EXTENT)
    out = np.empty((FRAMES_PER_CLIP, size, size, 3), np.uint8)
    for f in range(FRAMES_PER_CLIP):
        span = 2 / zoom[f] * px_per_unit
        # the widest view (withdrawn, drifted, shaken) fits the canvas; the clip keeps a far jitter tail in
        x0, y0 = np.clip((centre[f] - 1 / zoom[f] + CANVAS_EXTENT) * px_per_unit, 0, n - span)
        frame = np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR,
                                         box=(x0, y0, x0 + span, y0 + span)), np.float32)
        if tool_alpha is not None:
            frame *= tool_alpha
            frame += tool_paint
        if jets is not None:
            frame *= 1 - jets[f]
            frame += jets[f] * water
        frame *= vignette * gain[f]
        frame += noise[shifts[f, 0]:shifts[f, 0] + size, shifts[f, 1]:shifts[f, 1] + size]
        np.clip(frame, 0, 255, out=frame)
        out[f] = frame
    return out


# --- one entry point for the dataset -------------------------------------------------------------

def _cache_path(cfg: Config, state: ClipState) -> Path:
    key = stable_seed(RENDERER_VERSION, repr(state), cfg.frame_size, cfg.phantom_seed)
    return cfg.path(cfg.phantom_cache_dir) / f"v{RENDERER_VERSION}" / f"{key:016x}.npy"


def load_clip(sample: Sample, cfg: Config | None = None) -> np.ndarray:
    """The 8 frames of a sample, uint8 (8, size, size, 3): real JPEGs or the phantom, per the config.

    Phantom clips are rendered from the state of the sample's clip; with ``phantom_cache_dir`` set they
    are read from (or written to) an on-disk cache keyed by the state, size, seed and renderer version.
    """
    cfg = cfg or get_config()
    if cfg.frames_source == "real":
        return load_real_clip(sample, cfg)
    state = clip_state_of(sample, cfg)
    if not cfg.phantom_cache_dir:
        return render_phantom_clip(state, cfg.frame_size, cfg.phantom_seed)
    path = _cache_path(cfg, state)
    if path.exists():
        frames = np.load(path)
        if frames.shape == (FRAMES_PER_CLIP, cfg.frame_size, cfg.frame_size, 3) and frames.dtype == np.uint8:
            return frames
        log.warning("phantom cache %s holds %s %s; rendering again", path, frames.dtype, frames.shape)
    frames = render_phantom_clip(state, cfg.frame_size, cfg.phantom_seed)
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


# --- learnability probe --------------------------------------------------------------------------

MOTION_SIZE = 32  # motion is estimated on frames shrunk to this size, where a drift is ~1 pixel a frame


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """Fraction of pixels in each bin of 8x8 rg-chromaticity (colour without shading) and of 8 levels of
    brightness, square-rooted so that small objects count. Near-black pixels have no reliable colour
    and only count for brightness."""
    p = pixels.reshape(-1, 3).astype(np.float32)
    total = p.sum(1)
    lit = total > 60
    r = np.minimum(p[lit, 0] / total[lit] * 8, 7.999).astype(np.int64)
    g = np.minimum(p[lit, 1] / total[lit] * 8, 7.999).astype(np.int64)
    chroma = np.bincount(r * 8 + g, minlength=64)
    bright = np.bincount(np.minimum(total / 96, 7.999).astype(np.int64), minlength=8)
    return np.sqrt(np.concatenate([chroma, bright]) / max(1, len(p)))


def _spectrum(gray: np.ndarray) -> np.ndarray:
    """Share of luminance energy in 8 radial frequency bands x 4 orientations (texture, fold spacing)."""
    size = gray.shape[-1]
    power = np.abs(np.fft.fft2(gray - gray.mean(axis=(-2, -1), keepdims=True))) ** 2
    power = power.mean(axis=0)
    f = np.fft.fftfreq(size)
    fx, fy = np.meshgrid(f, f)
    radius = np.sqrt(fx ** 2 + fy ** 2)
    band = np.clip((np.log2(radius + 1e-9) + 7) / 6 * 8, 0, 7.999).astype(int)  # 1/128 .. 1/2 cycles/px
    orientation = ((np.arctan2(fy, fx) % np.pi) / np.pi * 4).astype(int) % 4
    keep = radius > 0
    energy = np.bincount((band * 4 + orientation)[keep], weights=power[keep], minlength=32)
    return np.log(energy / energy.sum() + 1e-6)


POLAR_LEVELS = 4  # pyramid levels of the polar gradient features: the frame, then halved each time


def _polar_gradients(gray: np.ndarray) -> np.ndarray:
    """Per pyramid level, inside and outside a disc about the frame centre: log energy of the luminance
    gradients, and log ratio of their energy along to across the direction from the centre. Rings around
    the view (folds) push the ratio up, blobs and speckle (debris, noise) leave it near 0, at their scale."""
    out = []
    level = gray
    for _ in range(POLAR_LEVELS):
        size = level.shape[-1]
        c = (np.arange(size) - (size - 1) / 2) / (size / 2)
        x, y = np.meshgrid(c, c)
        radius = np.sqrt(x ** 2 + y ** 2) + 1e-6
        gy, gx = np.gradient(level, axis=(1, 2))
        along = ((gx * x + gy * y) / radius) ** 2
        across = ((gx * y - gy * x) / radius) ** 2
        for region in (radius < 0.6, radius >= 0.6):
            a, b = along[:, region].mean() + 1e-6, across[:, region].mean() + 1e-6
            out += [np.log(a + b), np.log(a / b)]
        level = np.stack([np.asarray(Image.fromarray(g).resize((size // 2,) * 2, Image.Resampling.BOX))
                          for g in level])
    return np.array(out, np.float32)


def _affine_steps(gray: np.ndarray) -> np.ndarray:
    """Affine motion from each frame to the next (Lucas-Kanade, least squares over the frame), one row per
    step: translation (u, v), divergence (zoom), curl and the two shears, in pixels of a MOTION_SIZE frame."""
    size = gray.shape[-1]
    c = (np.arange(size) - (size - 1) / 2) / size
    x, y = np.meshgrid(c, c)
    steps = []
    for a, b in zip(gray[:-1], gray[1:]):
        iy, ix = np.gradient((a + b) / 2)
        basis = np.stack([ix, iy, ix * x, iy * y, ix * y, iy * x], -1).reshape(-1, 6)
        (u, v, xx, yy, xy, yx), *_ = np.linalg.lstsq(basis, -(b - a).reshape(-1), rcond=None)
        steps.append([u, v, xx + yy, yx - xy, xx - yy, xy + yx])
    return np.array(steps)


def _affine_flow(gray: np.ndarray) -> np.ndarray:
    """Mean affine motion between consecutive frames (see ``_affine_steps``)."""
    return _affine_steps(gray).mean(0)


GRID = 4  # the layout features split a frame into GRID x GRID cells (a quadrant is 2 x 2 cells)
# Candidate scale changes between two frames of a clip: a moving scope zooms by ZOOM_RANGE over the clip.
ZOOM_SCALES = np.geomspace(0.72, 1 / 0.72, 13)


def _cell_statistics(frame: np.ndarray) -> np.ndarray:
    """Per cell of a GRID x GRID layout of one frame: mean and spread of each channel, and the strongest
    bright and dark local contrast per channel (a pixel against its blurred surroundings, which picks out
    small blobs and thin shapes: a polyp, debris, a wire). The frame is first divided by its mean
    brightness, so that exposure does not move every cell at once."""
    size = frame.shape[0] - frame.shape[0] % GRID
    f = frame[:size, :size].astype(np.float32)
    f /= f.mean() + 1e-6
    surroundings = np.stack([np.asarray(Image.fromarray(f[..., k], mode="F").resize(
        (max(2, size // 8),) * 2, Image.Resampling.BOX).resize((size, size), Image.Resampling.BILINEAR))
        for k in range(3)], -1)
    contrast = f - surroundings
    cell = size // GRID
    cells = lambda a: a.reshape(GRID, cell, GRID, cell, 3).transpose(0, 2, 1, 3, 4).reshape(GRID * GRID, -1, 3)
    pixels, local = cells(f), cells(contrast)
    return np.concatenate([pixels.mean(1), pixels.std(1), local.max(1), local.min(1)], 1).ravel()


# Blob scales of the difference-of-Gaussians features, in frame widths: a polyp is about 0.1 to 0.2 wide.
BLOB_SIGMAS = (0.05, 0.1)


def _blob_responses(frame: np.ndarray) -> np.ndarray:
    """Per screen quadrant of one frame: the strongest bright and dark difference-of-Gaussians response
    per channel (frame divided by its mean brightness). A compact blob of about the blob scale (a polyp)
    answers more strongly than a bar as wide (the endoscope's shaft) and far more than edges, thin lines or
    specks (folds, wires, glints); a 4x4 grid of local contrast cannot tell them apart."""
    size = frame.shape[0] - frame.shape[0] % 2
    f = frame[:size, :size].astype(np.float32)
    f /= f.mean() + 1e-6
    inner, outer = (gaussian_filter(f, (sigma * size, sigma * size, 0)) for sigma in BLOB_SIGMAS)
    half = size // 2
    quadrants = (inner - outer).reshape(2, half, 2, half, 3).transpose(0, 2, 1, 3, 4).reshape(4, -1, 3)
    return np.concatenate([quadrants.max(1), quadrants.min(1)], 1).ravel()


def _zoom_about_centre(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` magnified by ``scale`` about its centre (a scale below 1 shrinks it); outside is the mean."""
    size = image.shape[0]
    offset = size / 2 * (1 - 1 / scale)
    out = Image.fromarray(image, mode="F").transform(
        (size, size), Image.Transform.AFFINE, (1 / scale, 0, offset, 0, 1 / scale, offset),
        Image.Resampling.BILINEAR, fillcolor=float(image.mean()))
    return np.asarray(out)


@lru_cache(maxsize=4)
def _hann(size: int) -> np.ndarray:
    w = np.hanning(size).astype(np.float32)
    return np.outer(w, w)


def _similarity_motion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How the scene moved from gray frame ``a`` to ``b``: phase correlation of ``a`` with ``b`` brought back
    by each candidate scale of ZOOM_SCALES. Returns the peak height per scale (how well that zoom explains
    the change), the best scale's log, and the shift (right, down) at the best scale in frame widths."""
    size = a.shape[0]
    window = _hann(size)
    spectrum_a = np.fft.fft2((a - a.mean()) * window)
    peaks, shifts = [], []
    for scale in ZOOM_SCALES:
        back = _zoom_about_centre(b, 1 / scale)
        cross = np.conj(spectrum_a) * np.fft.fft2((back - back.mean()) * window)
        surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-6)))
        peak = np.unravel_index(int(np.argmax(surface)), surface.shape)
        peaks.append(surface[peak])
        shifts.append([((p + size // 2) % size - size // 2) / size for p in (peak[1], peak[0])])
    best = int(np.argmax(peaks))
    return np.array([*peaks, np.log(ZOOM_SCALES[best]), *shifts[best]], np.float32)


def clip_features(frames: np.ndarray) -> np.ndarray:
    """Generic features of a clip (uint8 (T, S, S, 3)): colour histograms of the clip and of each screen
    quadrant, a texture spectrum and polar gradient energies, a GRID x GRID layout of colour and
    local-contrast statistics and blob responses per quadrant of the first, middle and last frames, global
    affine motion and how consistent its direction is from frame to frame, zoom-and-shift estimates between
    the first, middle and last frames, and temporal-change energy per quadrant.

    Nothing here knows about labels: they are the statistics any image probe would start from."""
    frames = np.asarray(frames)
    t, size = frames.shape[0], frames.shape[1]
    h = size // 2
    quadrants = [frames[:, :h, :h], frames[:, :h, h:], frames[:, h:, :h], frames[:, h:, h:]]
    key = (0, t // 2, t - 1)
    gray = frames.astype(np.float32).mean(-1)
    gray /= gray.mean(axis=(1, 2), keepdims=True) + 1e-6  # exposure flicker is not motion
    small = np.stack([np.asarray(Image.fromarray(g).resize((MOTION_SIZE, MOTION_SIZE), Image.Resampling.BOX))
                      for g in gray])
    steps = _affine_steps(small)
    flow = steps.mean(0)
    # the share of steps that move each way: a scope that zooms in at every step advances, however
    # little texture the scene has to show it (the size of the estimates shrinks with the texture)
    consistency = np.sign(steps).mean(0)
    zoom_shift = [_similarity_motion(small[i], small[j]) for i, j in ((key[0], key[2]), (key[0], key[1]),
                                                                      (key[1], key[2]))]
    change = np.abs(np.diff(small, axis=0)).mean(0) if t > 1 else np.zeros_like(small[0])
    m = MOTION_SIZE // 2
    change_energy = [change[:m, :m].mean(), change[:m, m:].mean(), change[m:, :m].mean(), change[m:, m:].mean()]
    return np.concatenate([_colour_histogram(frames), *[_colour_histogram(q) for q in quadrants],
                           _spectrum(gray), _polar_gradients(gray), *[_cell_statistics(frames[k]) for k in key],
                           *[_blob_responses(frames[k]) for k in key], flow, np.abs(flow), consistency,
                           *zoom_shift, *[np.abs(z[-2:]) for z in zoom_shift], change_energy]).astype(np.float32)


def global_statistics(frames: np.ndarray) -> np.ndarray:
    """Mean and spread of each colour channel over the clip: the shortcut a label must not hide in."""
    pixels = np.asarray(frames, np.float32).reshape(-1, 3)
    return np.concatenate([pixels.mean(0), pixels.std(0)])


def _probe_views_of_clip(job: tuple[Sample, Config]) -> dict[str, np.ndarray]:
    sample, cfg = job
    frames = load_clip(sample, cfg)
    still = np.repeat(frames[FRAMES_PER_CLIP // 2][None], FRAMES_PER_CLIP, axis=0)
    return {"clip": clip_features(frames), "frame": clip_features(still), "global": global_statistics(frames)}


def probe_views(samples: Sequence[Sample], cfg: Config | None = None, size: int = 64, workers: int | None = None
                ) -> dict[str, np.ndarray]:
    """Per sample, features of the phantom clip (``clip``), of its middle frame alone repeated
    (``frame``: no motion can be seen) and global colour statistics (``global``). Each distinct clip is
    rendered once, in ``workers`` processes (default: one per CPU core); the features do not depend on it."""
    import concurrent.futures
    import multiprocessing
    import os

    from .progress import progress_bar

    cfg = (cfg or get_config()).replace(frames_source="phantom", frame_size=size)
    by_clip: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_clip[s.clip_key].append(i)
    jobs = [(samples[rows[0]], cfg) for rows in by_clip.values()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = dict(total=len(jobs), desc=f"probe features ({size} px)", unit="clip", mininterval=2.0)
    if workers == 1:
        per_clip = list(progress_bar(map(_probe_views_of_clip, jobs), **bar))
    else:
        # spawned, not forked: the caller may hold threads (a notebook kernel, torch) that fork would copy
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_clip = list(progress_bar(pool.map(_probe_views_of_clip, jobs, chunksize=16), **bar))
    views = {"clip": [None] * len(samples), "frame": [None] * len(samples), "global": [None] * len(samples)}
    for rows, feats in zip(by_clip.values(), per_clip):
        for i in rows:
            for name in views:
                views[name][i] = feats[name]
    return {name: np.stack(v) for name, v in views.items()}


def fit_probe(features: np.ndarray, labels: Sequence[str]):
    """A standardised multinomial logistic regression; a single-class training set gives a constant."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(labels)) < 2:
        return DummyClassifier(strategy="most_frequent").fit(features, labels)
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000)).fit(features, labels)


def probe_table(train: Sequence[Sample], test: Sequence[Sample], cfg: Config | None = None, size: int = 64,
                probe_clips: int = 0):
    """Per question type: test accuracy of probes trained on the phantom renderings of ``train`` and
    tested on those of ``test``, on the whole clip, on one frame, and on global colour statistics;
    with the chance level (1 / labels of the type) and the blind prior (train-majority answer).

    ``probe_clips`` adds that many new random clips (``random_clip_samples``, every question each clip
    answers) to the training rows: the annotated train rows alone give some types a few dozen examples.
    The test rows are always the given ones."""
    import pandas as pd

    from .data import blind_prior, label_sets

    cfg = cfg or get_config()
    extra = [s for _, samples in random_clip_samples(probe_clips, cfg.template, seed=cfg.phantom_seed, cfg=cfg)
             for s in samples] if probe_clips else []
    prior = blind_prior(train)  # of the annotated rows: the prior a model without pixels would learn
    train = [*train, *extra]
    views_train, views_test = probe_views(train, cfg, size), probe_views(test, cfg, size)
    n_labels = {t: len(v) for t, v in label_sets(cfg).items()}
    rows = []
    for qtype in QUESTION_TYPES:
        tr = [i for i, s in enumerate(train) if s.question_type == qtype]
        te = [i for i, s in enumerate(test) if s.question_type == qtype]
        if not tr or not te:
            continue
        y_train = [train[i].short_answer for i in tr]
        y_test = np.array([test[i].short_answer for i in te])
        row = {"question_type": qtype, "n_train": len(tr), "n_test": len(te),
               "test_labels": len(set(y_test)), "chance": 1 / n_labels[qtype],
               "blind_prior": float(np.mean(y_test == prior[qtype]))}
        for view in ("clip", "frame", "global"):
            model = fit_probe(views_train[view][tr], y_train)
            row[view] = float(np.mean(model.predict(views_test[view][te]) == y_test))
        rows.append(row)
    return pd.DataFrame(rows).set_index("question_type")
