"""Frames: real loader errors, clip states from annotations, the phantom's cues, cache, random clips, probe."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from surgvqa import data, frames as F, phantom as P, probe as Q
from surgvqa.config import get_config

SIZE = 64


@pytest.fixture(scope="module")
def cfg():
    return get_config(frame_size=SIZE)


@pytest.fixture(scope="module")
def annotations():
    return data.load_template("out")


@pytest.fixture(scope="module")
def states(annotations, cfg):
    return P.clip_states_from_annotations(annotations, cfg)


def base_state(**changes) -> P.ClipState:
    """An inside view with a lesion and nothing else going on; tests flip one attribute at a time."""
    state = P.ClipState(clip="test:clip", outside=False, nbi=False, blue_dye=False, tool="none",
                        endoscope_body=False, mucosa_clean=True, fluid=False, closeup=False, flushing=False,
                        moving=False, direction="advancing", drift="stable", site="descending", lesion=True,
                        histology="adenoma", size_mm=3, quadrant="upper-left")
    return dataclasses.replace(state, **changes)


def render(**changes) -> np.ndarray:
    return P.render_phantom_clip(base_state(**changes), size=SIZE).astype(np.float32)


def chroma(frames: np.ndarray) -> np.ndarray:
    """Mean r, g, b chromaticity (each channel's share of the brightness)."""
    p = frames.reshape(-1, 3)
    return (p / (p.sum(1, keepdims=True) + 1)).mean(0)


QUADRANT_SLICES = {"upper-left": (slice(0, SIZE // 2), slice(0, SIZE // 2)),
                   "upper-right": (slice(0, SIZE // 2), slice(SIZE // 2, None)),
                   "lower-left": (slice(SIZE // 2, None), slice(0, SIZE // 2)),
                   "lower-right": (slice(SIZE // 2, None), slice(SIZE // 2, None))}


def quadrant_change(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    diff = np.abs(a - b).mean(axis=(0, 3))
    return {q: float(diff[s].mean()) for q, s in QUADRANT_SLICES.items()}


# --- real frames ---------------------------------------------------------------------------------

def _sample(video="002-004", start=100) -> data.Sample:
    numbers = tuple(start + 4 * k for k in range(8))
    return data.Sample(id="qa_1", video_id=video, frames=tuple(f"{video}_{n}" for n in numbers),
                       frame_numbers=numbers, question="q", question_type="nbi_status", answer="a",
                       short_answer="yes", source="test:1")


def _write_jpeg(path, value, size=(124, 108)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_real_clip_reads_every_layout_and_keeps_the_aspect_ratio(tmp_path):
    sample = _sample()
    layouts = [lambda name, n: f"002-004_frames/{name}.jpg", lambda name, n: f"002-004/{name}.jpg",
               lambda name, n: f"002-004/{n}.jpg"]  # REAL-Colon's own folders, then the flat ones
    for k, name in enumerate(sample.frames):
        _write_jpeg(tmp_path / layouts[k % 3](name, name.rsplit("_", 1)[1]), 20 * k)
    clip = F.load_real_clip(sample, get_config(frames_dir=str(tmp_path), frame_size=112))
    # 124x108 (REAL-Colon's 1240x1080 shrunk): the width to 112, the height 97.5 rounded to 3 x 28
    assert clip.shape == (8, 84, 112, 3) and clip.dtype == np.uint8
    assert [int(round(clip[k].mean())) for k in range(8)] == pytest.approx([20 * k for k in range(8)], abs=2)
    # sized for the backbone that sees them: Qwen3-VL's 16-pixel patches merged 2 x 2, sides multiples of 32
    from surgvqa.backbones import QWEN3_VL

    clip = F.load_real_clip(sample, get_config(frames_dir=str(tmp_path), frame_size=112), QWEN3_VL)
    assert clip.shape == (8, 96, 128, 3)  # 112 / 32 = 3.5 rounds to 4 units wide, 97.5 / 32 to 3 high


@pytest.mark.parametrize("height, width, size, expected", [
    (1080, 1240, 392, (336, 392)),  # REAL-Colon at the real presets' 392 px
    (1080, 1240, 224, (196, 224)),
    (1240, 1080, 392, (392, 336)),
    (100, 100, 20, (56, 56)),  # Qwen2-VL's minimum of 56 x 56 pixels
    (1000, 1000, 1400, (980, 980)),  # shrunk under its maximum of 28 x 28 x 1280 pixels
])
def test_resized_frame_shape_follows_qwen2_vl(height, width, size, expected):
    assert F.resized_frame_shape(height, width, size) == expected
    h, w = expected
    assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 28 * 28 * 1280


def test_vision_tokens_of_a_real_colon_clip():
    assert F.vision_tokens(336, 392, 8, "video") == 12 * 14 * 4  # (4, 24, 28) patches, merged 2 x 2
    assert F.vision_tokens(336, 392, 8, "images") == 12 * 14 * 8


def test_phantom_clips_written_in_the_real_colon_layout_load_as_real_frames(tmp_path, annotations):
    rows = [s for s in annotations if s.video_id == "002-004"][:2]
    written = F.write_real_colon_frames(rows, tmp_path, get_config(), render_size=56)
    assert written and all(p.parent.name == "002-004_frames" and p.suffix == ".jpg" for p in written)
    with Image.open(written[0]) as image:
        assert image.size == (1240, 1080)
    cfg = get_config(frames_source="real", frames_dir=str(tmp_path), frame_size=224)
    clip = F.load_clip(rows[0], cfg)
    assert clip.shape == (8, 196, 224, 3)
    rendered = P.render_phantom_clip(P.clip_state_of(rows[0], get_config()), 56, 0).astype(float)
    shrunk = np.stack([np.asarray(Image.fromarray(f).resize((56, 56), Image.Resampling.BILINEAR)) for f in clip])
    assert np.abs(shrunk.astype(float) - rendered).mean() < 12  # the same picture back, through JPEG and resizing


def test_sixteen_frames_add_the_frame_halfway_after_each_annotated_one(tmp_path):
    sample = _sample(start=100)
    names, numbers = sample.clip_frames(16)
    assert numbers == tuple(range(100, 132, 2)) and names[:3] == ("002-004_100", "002-004_102", "002-004_104")
    assert sample.clip_frames(8) == (sample.frames, sample.frame_numbers)
    with pytest.raises(ValueError, match="its 8 frames or twice as many"):
        sample.clip_frames(12)
    odd = dataclasses.replace(sample, frame_numbers=(1, 4, 8, 12, 16, 20, 24, 28))
    with pytest.raises(ValueError, match="qa_1.*do not step by one even number"):
        odd.clip_frames(16)
    # written and read back through REAL-Colon's layout: 16 files, a clip of 16 frames; a missing one is named
    cfg = get_config(frames_source="real", frames_dir=str(tmp_path), frame_size=224, clip_frames=16)
    written = F.write_real_colon_frames([sample], tmp_path, cfg, render_size=56)
    assert sorted(p.stem for p in written) == sorted(names)
    assert F.load_clip(sample, cfg).shape == (16, 196, 224, 3)
    (tmp_path / "002-004_frames" / "002-004_102.jpg").unlink()
    with pytest.raises(F.FrameError, match="(?s)1 of 16 frames.*002-004_102.jpg"):
        F.load_clip(sample, cfg)
    # the phantom world renders 16 too, for clips rendered on the fly
    phantom = get_config(frame_size=32, clip_frames=16)
    assert F.load_clip(sample, phantom).shape == (16, 32, 32, 3)


def test_a_frame_of_another_size_in_a_clip_is_named(tmp_path):
    sample = _sample()
    for k, name in enumerate(sample.frames):
        _write_jpeg(tmp_path / "002-004_frames" / f"{name}.jpg", 50, size=(124, 108) if k != 3 else (108, 124))
    with pytest.raises(F.FrameError, match=f"wrong size: .*{sample.frames[3]}.jpg is 108x124"):
        F.load_real_clip(sample, get_config(frames_dir=str(tmp_path), frame_size=112))


def test_missing_and_corrupt_real_frames_raise_one_error_naming_every_file(tmp_path):
    sample = _sample()
    for name in sample.frames[:5]:
        _write_jpeg(tmp_path / "002-004" / f"{name}.jpg", 128)
    (tmp_path / "002-004" / f"{sample.frames[5]}.jpg").write_bytes(b"not a jpeg")
    cfg = get_config(frames_dir=str(tmp_path), frames_source="real")
    with pytest.raises(F.FrameError) as err:
        F.load_clip(sample, cfg)
    message = str(err.value)
    assert sample.uid in message and "3 of 8 frames" in message
    assert f"unreadable: {tmp_path / '002-004' / sample.frames[5]}.jpg" in message
    for name in sample.frames[6:]:
        assert f"{tmp_path / '002-004' / name}.jpg or {tmp_path / '002-004' / name.split('_')[1]}.jpg" in message
    for name in sample.frames[:5]:
        assert f"{name}.jpg" not in message


# --- clip states ---------------------------------------------------------------------------------

def test_states_answer_every_annotation_row(annotations, states):
    assert len(states) == len({s.clip_key for s in annotations})
    wrong = [s.uid for s in annotations if states[s.clip_key].labels()[s.question_type] != s.short_answer]
    assert wrong == []


def test_states_obey_the_consistency_rules(states):
    for state in states.values():
        if state.outside:
            assert not (state.lesion or state.fluid or state.closeup or state.flushing or state.endoscope_body)
            assert state.tool == "none" and not state.blue_dye
        if state.lesion or state.tool != "none" or state.endoscope_body:
            assert not (state.fluid or state.closeup or state.outside)
        assert not (state.fluid and state.closeup)
        if state.drift != "stable":
            assert state.moving


def test_lesion_facts_of_the_video_are_used(annotations, states):
    # 002-004 has only 1 mm hyperplastic lesions (sigma, rectum) in lesion_info.csv
    lesion_clips = [states[s.clip_key] for s in annotations
                    if s.video_id == "002-004" and s.question_type.startswith("lesion_")]
    assert lesion_clips and all(st.lesion and st.size_mm == 1 and st.histology == "hyperplastic"
                                and st.site in ("sigma", "rectum") for st in lesion_clips)


def test_unfixed_attributes_follow_the_priors(states):
    values = list(states.values())
    # most clips have one row, so nbi is mostly drawn from its prior (0.4), plus the NBI rows
    assert 0.3 < np.mean([s.nbi for s in values]) < 0.6
    assert {s.site for s in values} == set(P.SITES)


def test_states_are_deterministic_and_depend_on_the_seed(annotations, cfg):
    rows = [s for s in annotations if s.video_id == "002-001"][:200]
    a = P.clip_states_from_annotations(rows, cfg)
    b = P.clip_states_from_annotations(rows, cfg)
    c = P.clip_states_from_annotations(rows, cfg.replace(phantom_seed=1))
    assert a == b and a != c


def test_contradicting_rows_raise_naming_them():
    rows = [("a.jsonl:1 nbi_status=yes", P.row_constraints("nbi_status", "yes")),
            ("a.jsonl:2 nbi_status=no", P.row_constraints("nbi_status", "no"))]
    with pytest.raises(P.ClipStateConflict, match="a.jsonl:1.*a.jsonl:2"):
        P.solve_clip_state("v:clip", rows)
    with pytest.raises(P.ClipStateConflict, match="outside"):
        P.solve_clip_state("v:clip", [("r1", P.row_constraints("scope_outside", "yes")),
                                      ("r2", P.row_constraints("lesion_site", "sigma"))])


def test_rows_imply_what_the_answer_sentence_says():
    state = P.solve_clip_state("v:c", [("r", P.row_constraints("scope_forward_motion", "no"))])
    assert state.moving and state.direction == "withdrawing"
    state = P.solve_clip_state("v:c", [("r", P.row_constraints("tool_catheter_check", "no"))])
    assert state.tool in ("forceps", "snare")
    state = P.solve_clip_state("v:c", [("r", P.row_constraints("mucosa_visibility", "yes"))])
    assert state.mucosa_clean and not (state.fluid or state.closeup or state.outside)
    with pytest.raises(ValueError, match="no phantom rendering"):
        P.row_constraints("lesion_site", "moon")


# --- rendering -----------------------------------------------------------------------------------

def test_render_is_deterministic_per_clip_and_seed():
    state = base_state(moving=True, drift="left", tool="snare", flushing=True)
    a = P.render_phantom_clip(state, SIZE, seed=0)
    assert a.shape == (8, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, P.render_phantom_clip(state, SIZE, seed=0))
    assert not np.array_equal(a, P.render_phantom_clip(state, SIZE, seed=1))
    assert not np.array_equal(a, P.render_phantom_clip(dataclasses.replace(state, clip="other"), SIZE))
    assert a.std() > 20  # never a flat or black image


def test_lighting_dye_fluid_redout_and_room_change_the_palette():
    base = chroma(render())
    nbi, dye, fluid = chroma(render(nbi=True)), chroma(render(blue_dye=True)), chroma(render(fluid=True, lesion=False))
    closeup, outside = chroma(render(closeup=True, lesion=False)), chroma(render(outside=True, lesion=False))
    assert nbi[0] < base[0] - 0.1 and nbi[1] > base[1] + 0.05  # teal instead of pink
    assert dye[2] > base[2] + 0.05  # blue on the mucosa
    assert fluid[1] > base[1] + 0.08  # yellow-green murk
    assert closeup[0] > base[0] + 0.1  # red-out
    assert outside[0] < base[0] - 0.1 and abs(outside[0] - outside[2]) < 0.1  # grey room, no pink


@pytest.mark.parametrize("tool", ["catheter", "forceps", "snare"])
def test_tools_appear_at_the_working_channel_in_their_colours(tool):
    base, with_tool = render(), render(tool=tool)
    change = quadrant_change(base, with_tool)
    assert change["lower-right"] > 2 and change["upper-left"] < 0.5
    changed = np.abs(with_tool - base).max(-1) > 40
    share = chroma(with_tool[changed])
    if tool == "catheter":  # blue plastic
        assert share[2] > 0.4
    else:  # metal and white plastic: grey, unlike the pink mucosa
        assert share[0] < 0.4 and abs(share[1] - share[2]) < 0.05


def test_tools_differ_from_each_other():
    shots = {t: render(tool=t)[:, SIZE // 2:, SIZE // 2:] for t in ("catheter", "forceps", "snare")}
    assert np.abs(shots["catheter"] - shots["forceps"]).mean() > 3
    assert np.abs(shots["forceps"] - shots["snare"]).mean() > 3


@pytest.mark.parametrize("quadrant", P.QUADRANTS)
def test_tools_jets_and_the_endoscope_leave_the_lesion_in_view(quadrant):
    without = render(lesion=False, quadrant=quadrant)
    lesion = np.abs(render(quadrant=quadrant) - without).max(-1)[F.FRAMES_PER_CLIP // 2] > 40
    assert lesion.sum() > 20
    for extra in ({"tool": "catheter"}, {"tool": "forceps"}, {"tool": "snare"}, {"flushing": True},
                  {"endoscope_body": True}):
        covered = np.abs(render(quadrant=quadrant, **extra) - render(quadrant=quadrant)).max(-1)
        assert np.mean(covered[F.FRAMES_PER_CLIP // 2][lesion] > 40) < 0.05, extra


def test_endoscope_body_debris_and_jets_change_their_pixels():
    base = render()
    body = render(endoscope_body=True)
    dark_neutral = lambda f: np.mean((f.max(-1) < 60) & (f.max(-1) - f.min(-1) < 15))
    assert dark_neutral(body) > dark_neutral(base) + 0.03
    dirty = render(mucosa_clean=False)
    yellowish = lambda f: np.mean(f[..., 1] / (f[..., 0] + 1) > 0.7)
    assert yellowish(dirty) > yellowish(base) + 0.015
    # under NBI the palette hides the colour, but the clumps stay darker than the mucosa around them
    dirty_nbi, clean_nbi = render(mucosa_clean=False, nbi=True).mean(-1), render(nbi=True).mean(-1)
    clumps = np.abs(dirty_nbi - clean_nbi) > 15
    assert clumps.mean() > 0.03 and (dirty_nbi - clean_nbi)[clumps].mean() < -15
    jets = render(flushing=True)
    jet_change = quadrant_change(base, jets)
    assert jet_change["lower-left"] > 5 and jet_change["lower-left"] > 2 * jet_change["upper-right"]
    # jets change from frame to frame: more change between frames than the still base clip
    assert np.abs(np.diff(jets, axis=0)).mean() > np.abs(np.diff(base, axis=0)).mean() + 1


def test_lesion_quadrant_histology_and_size():
    without = render(lesion=False)
    for quadrant in P.QUADRANTS:
        change = quadrant_change(without, render(quadrant=quadrant))
        assert max(change, key=change.get) == quadrant
    adenoma, hyperplastic = render(histology="adenoma"), render(histology="hyperplastic")
    region = QUADRANT_SLICES["upper-left"]
    assert hyperplastic[:, region[0], region[1]].mean() > adenoma[:, region[0], region[1]].mean() + 5
    assert chroma(adenoma[:, region[0], region[1]])[0] > chroma(hyperplastic[:, region[0], region[1]])[0]
    changed = lambda mm: np.mean(np.abs(render(size_mm=mm) - without).max(-1) > 30)
    assert changed(4) > 1.3 * changed(1)


@pytest.mark.parametrize("changes", [{}, {"nbi": True}, {"histology": "hyperplastic", "size_mm": 1},
                                     {"size_mm": 20}, {"moving": True, "drift": "right"},
                                     {"mucosa_clean": False, "site": "sigma"}])
def test_the_lesion_lies_in_its_quadrant_in_the_middle_frame(changes):
    middle = F.FRAMES_PER_CLIP // 2
    for k in range(3):  # every clip name places the lesion anew within its quadrant
        for quadrant in P.QUADRANTS:
            state = {**changes, "clip": f"quadrant:{k}", "quadrant": quadrant}
            lesion = np.abs(render(**state) - render(**state, lesion=False)).max(-1)[middle] > 40
            assert lesion.sum() > 60, state  # a 1 mm polyp too: it is drawn as seen up close
            assert lesion[QUADRANT_SLICES[quadrant]].sum() > 0.9 * lesion.sum(), state


def fold_spectrum(frames: np.ndarray) -> tuple[float, float]:
    """Share of the luminance energy at fold frequencies (0.03 to 0.3 cycles a pixel: above the lumen and the
    vignetting) and the mean frequency there."""
    gray = frames.mean(-1)
    gray = gray / gray.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(gray - gray.mean(axis=(1, 2), keepdims=True))) ** 2).mean(0)
    f = np.fft.fftfreq(SIZE)
    radius = np.sqrt(f[None, :] ** 2 + f[:, None] ** 2)
    band = (radius > 0.03) & (radius < 0.3)
    return power[band].sum() / power.sum(), (radius[band] * power[band]).sum() / power[band].sum()


@pytest.mark.parametrize("blue_dye", [False, True])
def test_sites_differ_in_fold_spacing_and_depth(blue_dye):
    # every clip name places the lumen and the folds anew; dye stains the mucosa but keeps its relief
    spectra = {site: np.array([fold_spectrum(render(clip=f"site:{k}", site=site, lesion=False, blue_dye=blue_dye))
                               for k in range(4)]) for site in P.SITES}
    energy = {site: v[:, 0] for site, v in spectra.items()}
    frequency = {site: v[:, 1] for site, v in spectra.items()}
    # the descending colon is a smooth tube; the others have deep folds
    assert energy["descending"].max() < min(energy[s].min() for s in ("ascending", "sigma", "rectum"))
    # tight folds in the sigma, wider in the ascending colon, a few broad valves in the rectum
    assert frequency["sigma"].min() > 1.15 * frequency["ascending"].max()
    assert frequency["ascending"].min() > 1.15 * frequency["rectum"].max()


def ring_harmonics(site: str, seed: int) -> np.ndarray:
    """Amplitude of the angular harmonics 1..5 of the colon's brightness on circles about its lumen (radii
    0.5, 0.7, 0.9), relative to the mean brightness, summed over the circles."""
    n = 128
    canvas = P._Canvas(n, P.CANVAS_EXTENT)
    lx, ly = P._colon(np.random.default_rng(seed), base_state(site=site), canvas, np.zeros((n, n), np.float32))
    gray = canvas.rgb.mean(-1)
    angles = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    total = np.zeros(5)
    for radius in (0.5, 0.7, 0.9):
        cols, rows = ((np.array([lx, ly])[:, None] + radius * np.stack([np.cos(angles), np.sin(angles)])
                       + canvas.extent) / (2 * canvas.extent) * n).astype(int)
        ring = gray[rows, cols]
        total += np.abs(np.fft.rfft(ring - ring.mean()))[1:6] / len(ring) / ring.mean()
    return total


@pytest.mark.parametrize("seed", range(3))
def test_sites_differ_in_fold_shape(seed):
    harmonics = {site: ring_harmonics(site, seed) for site in P.SITES}
    assert harmonics["descending"].max() < 0.02  # round folds: the same all around the lumen
    ascending = harmonics["ascending"]  # triangular folds
    assert ascending[2] > 0.1 and ascending[2] > 5 * np.delete(ascending, 2).max()
    rectum = harmonics["rectum"]  # valves over half the circumference, on one side
    assert rectum[0] > 0.1 and rectum[0] > 3 * rectum[1:].max()
    # tortuous folds: bends at every angular scale, where the other sites have none
    assert harmonics["sigma"][3:].min() > 0.03
    assert max(harmonics[s][3:].max() for s in ("ascending", "descending", "rectum")) < 0.02


@pytest.mark.parametrize("drift,sign", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))])
def test_drift_moves_the_scene_that_way(drift, sign):
    gray = render(moving=True, drift=drift, direction="advancing").mean(-1)
    flow = Q._affine_flow(_shrink(gray))
    u, v = flow[0], flow[1]
    assert np.sign(u) == sign[0] or sign[0] == 0
    assert np.sign(v) == sign[1] or sign[1] == 0
    assert max(abs(u), abs(v)) > 0.4 and min(abs(u), abs(v)) < max(abs(u), abs(v)) / 2


def _shrink(gray):
    gray = gray / gray.mean(axis=(1, 2), keepdims=True)
    return np.stack([np.asarray(Image.fromarray(g.astype(np.float32)).resize((Q.MOTION_SIZE,) * 2,
                                                                           Image.Resampling.BOX)) for g in gray])


def test_advancing_zooms_in_withdrawing_zooms_out_still_does_neither():
    divergence = {d: Q._affine_flow(_shrink(render(moving=True, direction=d).mean(-1)))[2]
                  for d in ("advancing", "withdrawing")}
    still = Q._affine_flow(_shrink(render(moving=False).mean(-1)))[2]
    assert divergence["advancing"] > 0.02 and divergence["withdrawing"] < -0.02
    assert abs(still) < min(abs(v) for v in divergence.values()) / 2
    # one frame cannot tell: the middle frames of the two directions have the same zoom on average
    mid = F.FRAMES_PER_CLIP // 2
    a, w = render(moving=True, direction="advancing")[mid], render(moving=True, direction="withdrawing")[mid]
    assert np.abs(a - w).mean() < 15


@pytest.mark.parametrize("scene", [{}, {"closeup": True, "lesion": False}, {"fluid": True, "lesion": False},
                                   {"outside": True, "lesion": False}, {"flushing": True}])
def test_every_step_of_a_moving_clip_zooms_the_same_way(scene):
    # even where little texture shows the motion (red-out, fluid, the room) or jets cross it, each of the
    # 7 steps zooms the way the scope moves: what the probe's direction-consistency features count
    for direction, sign in (("advancing", 1), ("withdrawing", -1)):
        steps = Q._affine_steps(_shrink(render(moving=True, direction=direction, **scene).mean(-1)))
        assert steps.shape == (F.FRAMES_PER_CLIP - 1, 6)
        assert np.all(np.sign(steps[:, 2]) == sign), (direction, steps[:, 2])


@pytest.mark.parametrize("drift,direction", [("left", "advancing"), ("down", "withdrawing"), ("stable", "advancing")])
def test_similarity_motion_finds_the_zoom_and_the_shift(drift, direction):
    small = _shrink(render(moving=True, drift=drift, direction=direction).mean(-1))
    *peaks, log_scale, right, down = Q._similarity_motion(small[0], small[-1])
    assert np.sign(log_scale) == (1 if direction == "advancing" else -1)
    assert abs(log_scale) > 0.1  # the clip zooms by 25 %
    expected = {"left": (-1, 0), "down": (0, 1), "stable": (0, 0)}[drift]
    for moved, sign in zip((right, down), expected):
        assert (moved * sign > 0.08) if sign else abs(moved) < 0.05
    *_, still_scale, still_right, still_down = Q._similarity_motion(small[0], small[0])
    assert abs(still_scale) < 1e-6 and still_right == 0 and still_down == 0


def test_render_rejects_tiny_frames():
    with pytest.raises(ValueError, match="too small"):
        P.render_phantom_clip(base_state(), size=8)


# --- dataset entry point, cache, random clips ----------------------------------------------------

def test_load_clip_renders_the_state_of_the_clip_and_caches_it(annotations, tmp_path):
    sample = next(s for s in annotations if s.question_type == "tool_identification")
    cfg = get_config(frame_size=SIZE)
    clip = F.load_clip(sample, cfg)
    assert np.array_equal(clip, P.render_phantom_clip(P.clip_state_of(sample, cfg), SIZE, cfg.phantom_seed))
    cached_cfg = cfg.replace(phantom_cache_dir=str(tmp_path))
    assert np.array_equal(F.load_clip(sample, cached_cfg), clip)
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), clip)
    np.save(files[0], np.zeros((8, SIZE, SIZE, 3), np.uint8))  # a cache file is trusted by its key
    assert F.load_clip(sample, cached_cfg).max() == 0


def test_random_clips_carry_their_answers_in_the_template_wording():
    pairs = P.random_clip_samples(30, template="in", seed=3)
    again = P.random_clip_samples(30, template="in", seed=3)
    assert [p[0] for p in pairs] == [p[0] for p in again]
    wordings, sentences = data.question_wordings("in"), data.answer_sentences()
    seen = set()
    for state, samples in pairs:
        labels = state.labels()
        assert samples and len({s.question_type for s in samples}) == len(samples)
        for s in samples:
            assert s.short_answer == labels[s.question_type]
            assert s.question == wordings[s.question_type]
            assert s.answer == sentences[(s.question_type, s.short_answer)]
            assert P.clip_state_of(s) == state  # the dataset finds the clip again from the sample
            seen.add(s.question_type)
    assert len(seen) >= 15


# --- probe ---------------------------------------------------------------------------------------

def test_blob_responses_find_a_compact_blob_in_its_quadrant_before_a_bar():
    frame = np.full((SIZE, SIZE, 3), 100, np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    frame[(xx - 45) ** 2 + (yy - 18) ** 2 < 5 ** 2] = 200  # a bright disc in the upper right
    frame[40:50] = 200  # a bright bar as wide as the disc across the lower half
    brightest = Q._blob_responses(frame).reshape(4, 2, 3)[:, 0].mean(-1)  # quadrant x (max, min) x channel
    assert P.QUADRANTS[int(np.argmax(brightest))] == "upper-right"
    assert brightest[1] > 1.2 * brightest[2:].max() and brightest[0] < 0.2 * brightest[1]


def test_polar_gradients_tell_rings_about_the_centre_from_blobs():
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    rings = 1 + 0.3 * np.cos(np.hypot(xx, yy) / 2)
    blobs = 1 + 0.3 * np.cos(xx / 2.5) * np.cos(yy / 2.5)
    ratio = lambda image: Q._polar_gradients(np.repeat(image[None].astype(np.float32), 2, 0))[1::2]
    # along the direction from the centre over across it: far above 1 for rings, near 1 for blobs
    assert ratio(rings)[:2].min() > np.log(10) and np.abs(ratio(blobs)[:2]).max() < np.log(2)


def test_probe_views_are_the_same_from_worker_processes():
    samples = [s for _, clip in P.random_clip_samples(6, seed=11) for s in clip]
    serial = Q.probe_views(samples, size=32, workers=1)
    parallel = Q.probe_views(samples, size=32, workers=2)
    assert set(serial) == {"clip", "frame", "global"}
    for name, features in serial.items():
        assert features.shape[0] == len(samples) and np.array_equal(features, parallel[name]), name
    # the rows of one clip share its features; different clips differ
    first = [i for i, s in enumerate(samples) if s.clip_key == samples[0].clip_key]
    assert len(first) > 1 and all(np.array_equal(serial["clip"][i], serial["clip"][first[0]]) for i in first)
    assert not np.array_equal(serial["clip"][0], serial["clip"][len(first)])


def _find(vector: np.ndarray, part: np.ndarray) -> list[int]:
    return [i for i in range(len(vector) - len(part) + 1) if np.array_equal(vector[i:i + len(part)], part)]


def test_a_still_clips_key_frames_share_their_features(monkeypatch):
    """A clip whose key frames are equal (the probe's one-frame view) computes each key frame's features and each
    motion estimate once, with the numbers of computing them for every key frame; a moving clip computes all."""
    state, _ = P.random_clip_samples(1, seed=3)[0]
    clip = P.render_phantom_clip(state, 32, 0, 8)
    still = np.repeat(clip[4][None], 8, axis=0)
    calls = {"cells": 0, "motion": 0}
    cells, motion = Q._cell_statistics, Q._similarity_motion
    monkeypatch.setattr(Q, "_cell_statistics", lambda f: calls.__setitem__("cells", calls["cells"] + 1) or cells(f))
    monkeypatch.setattr(Q, "_similarity_motion",
                        lambda a, b: calls.__setitem__("motion", calls["motion"] + 1) or motion(a, b))
    features = Q.clip_features(still)
    assert calls == {"cells": 1, "motion": 1}
    Q.clip_features(clip)
    assert calls == {"cells": 4, "motion": 4}
    # the shared key frame's statistics stand three times in the features, as each frame's own would
    assert len(_find(features, np.tile(cells(still[4]), 3))) == 1


def test_the_one_frame_view_is_the_middle_frame_held_still():
    """The probe's frame view is computed on two copies of the clip's middle frame: the features of that frame
    held for a whole clip, up to float32 rounding."""
    from surgvqa import get_config

    cfg = get_config().replace(frames_source="phantom", frame_size=32)
    samples = [clip[0] for _, clip in P.random_clip_samples(3, seed=5)]
    views = Q.probe_views(samples, cfg, size=32, workers=1)
    for sample, frame_view in zip(samples, views["frame"]):
        middle = F.load_clip(sample, cfg)[len(F.load_clip(sample, cfg)) // 2]
        held = Q.clip_features(np.repeat(middle[None], 8, axis=0))
        assert np.allclose(frame_view, held, rtol=1e-5, atol=1e-5)


def test_probe_learns_easy_types_and_cannot_see_motion_in_one_frame():
    pairs = P.random_clip_samples(160, seed=7)
    train = [s for _, samples in pairs[:40] for s in samples]
    test = [s for _, samples in pairs[40:] for s in samples]
    table = Q.probe_table(train, test, size=32, probe_clips=120)
    for qtype in ("nbi_status", "scope_outside", "scope_motion", "scope_motion_type"):
        assert table.loc[qtype, "clip"] >= 0.85, table.loc[qtype]
    assert table.loc["scope_motion_type", "frame"] <= 0.75
    assert table.loc["scope_motion_type", "global"] <= 0.75
    assert set(table.columns) >= {"n_train", "n_test", "chance", "blind_prior", "clip", "frame", "global"}
    # the extra random clips add training rows; the test rows are the given ones
    n_given = {t: sum(s.question_type == t for s in train) for t in table.index}
    extra = {t: sum(s.question_type == t for _, samples in P.random_clip_samples(120) for s in samples)
             for t in table.index}
    assert all(table.loc[t, "n_train"] == n_given[t] + extra[t] for t in table.index)
    assert all(table.loc[t, "n_test"] == sum(s.question_type == t for s in test) for t in table.index)


def test_figure_titles_stay_clear_of_the_first_row():
    from surgvqa import data, frames as F

    rows = data.published_split()["train"]  # every type: the tall figure where a title used to cover a row
    for fig in (F.question_type_gallery(rows, size=32),
                F.frame_grid_figure(np.zeros((8, 16, 16, 3), np.uint8), title="a clip")):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        title_bottom = fig._suptitle.get_window_extent(renderer).y0
        first_row_top = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes if ax.title.get_text())
        assert title_bottom >= first_row_top, (title_bottom, first_row_top)


def test_a_frame_too_large_to_be_a_video_frame_is_named_before_it_is_decoded(tmp_path, monkeypatch):
    sample = _sample()
    for name in sample.frames:
        _write_jpeg(tmp_path / "002-004_frames" / f"{name}.jpg", 50, size=(124, 108))
    monkeypatch.setattr(F, "_MAX_FRAME_PIXELS", 124 * 108 - 1)  # stands in for the 50 MP bound
    with pytest.raises(F.FrameError, match=r"124x108 pixels is not a video frame"):
        F.load_real_clip(sample, get_config(frames_dir=str(tmp_path), frame_size=112))


def test_phantom_clips_are_drawn_once_per_process_read_only_and_within_a_memory_budget(monkeypatch):
    from surgvqa import frames as F

    drawn = []
    real = F.render_phantom_clip
    monkeypatch.setattr(F, "render_phantom_clip", lambda *key: drawn.append(key) or real(*key))
    cfg = get_config("smoke", frame_size=32)
    rows = list({P.clip_state_of(s, cfg): s for s in data.load_split(cfg)["test"][:20]}.values())[:3]  # 3 clips
    one_clip = 8 * 32 * 32 * 3
    monkeypatch.setattr(F, "_RENDERED", F.RenderedClips(2 * one_clip))  # room for two clips
    first = F.load_clip(rows[0], cfg)
    assert F.load_clip(rows[0], cfg) is first and len(drawn) == 1
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0, 0, 0] = 1
    F.load_clip(rows[1], cfg), F.load_clip(rows[2], cfg)  # the third evicts the least recently used, the first
    assert len(drawn) == 3 and F._RENDERED.used == 2 * one_clip
    np.testing.assert_array_equal(F.load_clip(rows[0], cfg), first)
    assert len(drawn) == 4
