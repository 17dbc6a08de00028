"""Evaluation: accuracy with n, a 95 % interval, chance and the blind prior, overall and per type."""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from .data import Sample, blind_prior, candidate_labels, prior_predictions


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sound at 0 % and 100 %, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_table(samples: Sequence[Sample], predicted: Sequence[str],
                   train: Sequence[Sample]) -> pd.DataFrame:
    """Per-type and overall accuracy of ``predicted`` labels with n, 95 % CI, chance and blind prior.

    Chance is 1/|label set| of the type; the overall chance is the mean over rows. The blind prior is
    the train-majority answer per type scored on the same rows. ``single_class`` flags types whose
    rows here all carry one label.
    """
    if len(samples) != len(predicted):
        raise ValueError(f"{len(samples)} samples but {len(predicted)} predictions")
    prior = prior_predictions(blind_prior(train), samples)
    rows = []
    frame = pd.DataFrame({
        "question_type": [s.question_type for s in samples],
        "truth": [s.short_answer for s in samples],
        "correct": [p == s.short_answer for p, s in zip(predicted, samples)],
        "prior_correct": [p == s.short_answer for p, s in zip(prior, samples)],
        "chance": [1 / len(candidate_labels(s.question_type)) for s in samples],
    })
    groups = [(t, g) for t, g in frame.groupby("question_type", sort=True)] + [("overall", frame)]
    for name, g in groups:
        n, k = len(g), int(g["correct"].sum())
        lo, hi = wilson_interval(k, n)
        rows.append({
            "question_type": name, "n": n, "accuracy": k / n, "ci_low": lo, "ci_high": hi,
            "chance": float(g["chance"].mean()), "blind_prior": float(g["prior_correct"].mean()),
            "single_class": g["truth"].nunique() == 1 if name != "overall" else False,
        })
    return pd.DataFrame(rows).set_index("question_type")


def format_accuracy(acc: float, lo: float, hi: float, n: int) -> str:
    return f"{100 * acc:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"
