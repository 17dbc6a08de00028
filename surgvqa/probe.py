"""The learnability probe: generic colour, layout, texture and motion features of a clip plus logistic
regression, to check that each label is readable from a clip's pixels and that motion is not readable from a
single frame (notebook 01)."""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .config import Config, get_config
from .data import FRAMES_PER_CLIP, QUESTION_TYPES, Sample
from .frames import load_clip
from .phantom import random_clip_samples

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
    the change), the best scale's log, and the shift (right, down) at the best scale in frame widths.
    The scales' transforms run as one stack (the same numbers as one at a time, in less than half the time)."""
    size = a.shape[0]
    window = _hann(size)
    spectrum_a = np.fft.fft2((a - a.mean()) * window)
    backs = np.stack([_zoom_about_centre(b, 1 / scale) for scale in ZOOM_SCALES])
    cross = np.conj(spectrum_a) * np.fft.fft2((backs - backs.mean(axis=(1, 2), keepdims=True)) * window)
    surfaces = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-6))).reshape(len(ZOOM_SCALES), -1)
    at = surfaces.argmax(axis=1)
    peaks = surfaces[np.arange(len(ZOOM_SCALES)), at]
    best = int(np.argmax(peaks))
    down, right = divmod(int(at[best]), size)
    shift = [((p + size // 2) % size - size // 2) / size for p in (right, down)]
    return np.array([*peaks, np.log(ZOOM_SCALES[best]), *shift], np.float32)


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
    # a key frame equal to an earlier one (a still clip's) shares its features: the same numbers, computed once
    same = {}
    for k in key:
        same[k] = next((j for j in same.values() if np.array_equal(frames[j], frames[k])), k)
    cells = {k: _cell_statistics(frames[k]) for k in set(same.values())}
    blobs = {k: _blob_responses(frames[k]) for k in set(same.values())}
    motions: dict[tuple[int, int], np.ndarray] = {}
    for i, j in ((key[0], key[2]), (key[0], key[1]), (key[1], key[2])):
        if (same[i], same[j]) not in motions:
            motions[same[i], same[j]] = _similarity_motion(small[same[i]], small[same[j]])
    zoom_shift = [motions[same[i], same[j]] for i, j in ((key[0], key[2]), (key[0], key[1]), (key[1], key[2]))]
    change = np.abs(np.diff(small, axis=0)).mean(0) if t > 1 else np.zeros_like(small[0])
    m = MOTION_SIZE // 2
    change_energy = [change[:m, :m].mean(), change[:m, m:].mean(), change[m:, :m].mean(), change[m:, m:].mean()]
    return np.concatenate([_colour_histogram(frames), *[_colour_histogram(q) for q in quadrants],
                           _spectrum(gray), _polar_gradients(gray), *[cells[same[k]] for k in key],
                           *[blobs[same[k]] for k in key], flow, np.abs(flow), consistency,
                           *zoom_shift, *[np.abs(z[-2:]) for z in zoom_shift], change_energy]).astype(np.float32)


def global_statistics(frames: np.ndarray) -> np.ndarray:
    """Mean and spread of each colour channel over the clip: the shortcut a label must not hide in."""
    pixels = np.asarray(frames, np.float32).reshape(-1, 3)
    return np.concatenate([pixels.mean(0), pixels.std(0)])


def _probe_views_of_clip(job: tuple[Sample, Config]) -> dict[str, np.ndarray]:
    sample, cfg = job
    frames = load_clip(sample, cfg)
    # the middle frame held still: two copies give the features of eight (up to float32 rounding) in half the time
    still = np.repeat(frames[FRAMES_PER_CLIP // 2][None], 2, axis=0)
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
    # one pass (one pool of workers) over the train and test clips together
    views = probe_views([*train, *test], cfg, size)
    views_train = {name: v[:len(train)] for name, v in views.items()}
    views_test = {name: v[len(train):] for name, v in views.items()}
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
