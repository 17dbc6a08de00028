"""The phantom colonoscopy world: clip states and the renderer whose pixels carry every label.

Every annotated clip gets a ``ClipState``: every visual attribute of the clip, fixed by the annotation rows that
share the clip and by the video's lesion facts (lesion_info.csv), completed by consistency rules and, for what
nothing fixes, by a prior drawn deterministically from (clip, seed). ``render_phantom_clip`` draws 8 frames in
which each attribute has the visual cue a clinician would look for (white light vs NBI palette, dye, tool shapes,
water jets, fluid, red-out, debris, the endoscope body, the room outside the patient, zoom for advancing and
withdrawing, a lateral drift of the scene for lesion motion, the lesion's quadrant, size, colour and surface
pattern, the fold pattern of the colon segment), with nuisance variation (exposure, flicker, vignetting, camera
jitter, specular highlights, texture and sensor noise) so that no single pixel or global statistic carries a
label and one frame alone cannot tell a motion direction. Random clip states make pretraining's clips.
"""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .config import Config, get_config
from .data import FRAMES_PER_CLIP, Sample, answer_sentences, data_dir, load_template, question_wordings

# Bump whenever the renderer's output changes: it is part of every on-disk cache key.
RENDERER_VERSION = 3
PHANTOM_VIDEO = "phantom"  # video_id of the extra random clips made by ``random_clip_samples``
_PHANTOM_FRAME = re.compile(r"^phantom_(\d+)_(\d+)_\d+$")


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


def render_phantom_clip(state: ClipState, size: int = 224, seed: int = 0,
                        frames: int = FRAMES_PER_CLIP) -> np.ndarray:
    """The frames of a clip state as uint8 (frames, size, size, 3), the same for the same (state, size, seed,
    frames); more frames sample the same motion more densely.

    The scene is drawn once on a canvas larger than the frame; each frame is a view of it (zoom for
    advancing/withdrawing, a pan for drift, camera jitter) cut out and resized in one step. Screen-fixed
    parts (tool, jets, vignetting, exposure flicker, sensor noise) are then added to every frame.
    It stays one function because the drawing order is the rendering: each layer paints over the one before.
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
    t = np.linspace(0, 1, frames)
    zoom = np.full(frames, rng.uniform(1.05, 1.2))
    if state.moving:  # geometric about the middle frame, which then looks like a still clip's frame
        zoom *= (1 + ZOOM_RANGE) ** ((t - 0.5) * (1 if state.direction == "advancing" else -1))
    step = {"stable": (0, 0), "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[state.drift]
    # the scene moves on screen by +drift, so the view centre moves the other way
    centre = -np.outer(t - 0.5, step) * DRIFT_DISTANCE * rng.uniform(0.9, 1.1) / zoom[:, None]
    centre += rng.normal(0, JITTER, (frames, 2))

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
            mid = frames // 2
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
        jets = _jets(stream("jets"), sx, sy, frames, lesion_on_screen)[..., None]
        water = 255 * _rgb(0.85, 0.93, 1.0)
        water = water @ NBI_MATRIX.T if state.nbi else water
    camera = stream("camera")
    vignette = (1 - camera.uniform(0.2, 0.45) * (sx ** 2 + sy ** 2) / 2)[..., None]
    gain = camera.uniform(0.8, 1.15) * (1 + camera.normal(0, 0.05, frames))
    noise = _sensor_noise(size)
    shifts = camera.integers(0, 16, (frames, 2))
    px_per_unit = n / (2 * CANVAS_EXTENT)
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
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
