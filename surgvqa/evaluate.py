"""Evaluation: a strict answer scorer, per-sample prediction files, accuracy with n, a 95 % interval,
chance and the blind prior, and error analysis (confusion, mode collapse, failures by group, calibration).

Scoring rule: a free-text answer maps to exactly one label of its question type, or
to ``"unparseable"``. Matching is by whole words (a hyphenated word counts as one word, so "close-up"
holds no "up"), with the obvious inflections and synonyms; never by substring, so the "no" inside "not",
"know", "normal" or "nothing" never counts. A text that names two different answers is unparseable,
except that a yes/no question's leading "Yes"/"No" decides it ("No, the scope is withdrawing.").

``python -m surgvqa score PREDICTIONS.jsonl [--train published|stratified|ANNOTATIONS.jsonl]`` scores a
predictions file (one JSON object a line, schema in ``PREDICTION_FIELDS``), prints the table and writes
``PREDICTIONS.summary.json`` beside it.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import sys
from functools import lru_cache
from numbers import Real
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .data import (QUESTION_TYPES, YES_NO, AnnotationError, Sample, answer_sentences, blind_prior, candidate_answers,
                   candidate_labels, load_annotations, load_split, published_split, text_lines)

UNPARSEABLE = "unparseable"

# One JSON object per sample. Required: question_type, short_answer (the truth), prediction (the model's
# text). ``parsed`` and ``correct`` are written by ``write_predictions`` and always recomputed on reading,
# so a file can never carry a more lenient score than this scorer gives.
PREDICTION_FIELDS = {
    "id": "sample id (str)", "uid": "video_id/id, unique across videos (str)",
    "question_type": "one of the 20 question types", "short_answer": "the true label",
    "prediction": "the model's answer text",
    "parsed": "label the scorer read from the text, or 'unparseable'",
    "probabilities": "optional {label: probability} over the type's candidate labels",
    "correct": "parsed == short_answer", "latency_ms": "optional, time to answer this sample",
    "voice": "optional, the TTS voice that spoke the question",
    "template": "optional, question wording: 'in' or 'out' template",
    "audio_duration_s": "optional, length of the spoken question",
}
_REQUIRED_FIELDS = ("question_type", "short_answer", "prediction")
_OPTIONAL_STRINGS = ("uid", "voice", "template")
_OPTIONAL_NUMBERS = ("latency_ms", "audio_duration_s")


class PredictionsError(ValueError):
    """One or more prediction rows are malformed; the message names every bad row and why."""


# --- the answer scorer ---------------------------------------------------------------------------

def _words(*alternatives: str) -> str:
    # Hyphens count as word characters on both sides, so "upper-left" holds no "left" and "close-up" no "up".
    return r"(?<![\w-])(?:" + "|".join(alternatives) + r")(?![\w-]|\.\d)"


_YES = _words("yes")
_NO = _words("no")
_ADVANCING = _words(r"advanc(?:e|es|ed|ing|ement)", r"forwards?", r"insert(?:s|ed|ing|ion)?")
_WITHDRAWING = _words(r"withdr(?:aw|aws|awing|awn|awal|ew)", r"retract(?:s|ed|ing|ion)?", r"backwards?",
                      r"pull(?:s|ed|ing)? back")
_NBI = _words(r"nbi", r"narrow[- ]band(?: imaging)?")
_WHITE_LIGHT = _words(r"wl", r"wli", r"white[- ]light")
_CATHETER = _words(r"catheters?")
_FORCEPS = _words(r"forceps?")
_SNARE = _words(r"snares?")
_MM = r"(?:\s*mm)?"

# Per question type: (answer, pattern) cues. An answer outside the type's label set (white light for
# lighting_mode, 5-9 mm for lesion_size_range, ...) is listed so that naming it makes the text
# unparseable instead of letting a stray label word decide.
_CONTENT_CUES: dict[str, list[tuple[str, str]]] = {
    # "clip" alone is the video clip ("the tool in the clip is a snare"), so only a named clip is a tool
    "tool_identification": [("catheter", _CATHETER), ("forceps", _FORCEPS), ("snare", _SNARE),
                            ("other tool", _words(r"ha?emo-?clips?", r"(?:ha?emostatic|metal|endo) clips?",
                                                  r"endoclips?", r"needles?"))],
    "lighting_mode": [("NBI", _NBI), ("white light", _WHITE_LIGHT)],
    "fluid_occlusion_level": [
        ("absent", _words(r"absent", r"none", r"no (?:fluid|occlusion)")),
        ("complete", _words(r"complete(?:ly)?", r"total(?:ly)?")),
        ("partial", _words(r"partial(?:ly)?", r"mild(?:ly)?", r"moderate(?:ly)?", r"slight(?:ly)?")),
    ],
    "scope_motion_type": [("advancing", _ADVANCING), ("withdrawing", _WITHDRAWING)],
    "lesion_histology_extended": [
        ("adenoma", _words(r"adenoma(?:s|tous)?")), ("hyperplastic", _words(r"hyperplastic", r"hyperplasia")),
        ("serrated", _words(r"serrated")), ("carcinoma", _words(r"(?:adeno)?carcinoma", r"cancer")),
    ],
    "lesion_size_range": [
        ("<5", _words(r"<\s*(?:5|five)" + _MM, r"(?:less|smaller) than (?:5|five)" + _MM,
                      r"(?:under|below) (?:5|five)" + _MM)),
        ("5-9", _words(r"(?:5|five)" + _MM + r"\s*(?:-|to)\s*(?:9|nine)" + _MM,
                       r"between (?:5|five)" + _MM + r" and (?:9|nine)" + _MM)),
        (">9", _words(r">\s*(?:9|nine)" + _MM, r"(?:greater|larger|bigger|more) than (?:9|nine)" + _MM,
                      r"(?:over|above) (?:9|nine)" + _MM)),
    ],
    "lesion_site": [
        ("ascending", _words(r"ascending")), ("descending", _words(r"descending")),
        ("rectum", _words(r"rectum", r"rectal")), ("sigma", _words(r"sigma", r"sigmoid")),
        ("transverse", _words(r"transverse")), ("cecum", _words(r"ca?ecum", r"ca?ecal")),
    ],
    "lesion_screen_position": [
        (f"{v}-{h}", _words(rf"{vv}[\s-]*{h}", rf"{h}[\s-]*{vv}"))
        for v, vv in (("upper", r"(?:upper|top)"), ("lower", r"(?:lower|bottom)")) for h in ("left", "right")
    ] + [("centre", _words(r"cent(?:er|re|ral)", r"middle"))],
    "lesion_motion_direction": [
        ("down", _words(r"down(?:wards?)?")), ("up", _words(r"up(?:wards?)?")),
        ("left", _words(r"left(?:wards?)?")), ("right", _words(r"right(?:wards?)?")),
        ("stable", _words(r"stable", r"stationary", r"static", r"motionless",
                          r"(?:does|did|do) ?n[o']t (?:move|shift|drift)",
                          r"not (?:moving|shifting|drifting)",
                          r"no (?:noticeable |visible |apparent )?(?:movement|motion)")),
    ],
    # Yes/no types whose question names a concept: mentioning it (or its opposite) answers the question.
    "nbi_status": [("yes", _NBI), ("no", _WHITE_LIGHT)],
    "scope_forward_motion": [("yes", _ADVANCING), ("no", _WITHDRAWING)],
    "scope_backward_motion": [("yes", _WITHDRAWING), ("no", _ADVANCING)],
    "tool_catheter_check": [("yes", _CATHETER), ("no", _FORCEPS), ("no", _SNARE)],
}
_YES_NO_CUES = [("yes", _YES), ("no", _NO)]
# A leading "Yes"/"No" decides a yes/no question, unless it starts "yes or no" / "yes/no".
_LEADING_YES_NO = re.compile(r"^(yes|no)(?![\w-])(?!\s*(?:/|or\b|and\b))")
_ANSWER_PREFIX = re.compile(r"^(?:the )?answer(?: is)?\s*[:-]?\s*")
_NEGATORS = {"not", "no", "never", "neither", "nor", "without", "cannot"}
_NEGATION_WINDOW = 4  # words before a mention, within its clause, that can negate it ("not in the rectum")
_DASHES = re.compile("[\u2010\u2011\u2012\u2013\u2014\u2015\u2212]")


def _normalise(text: str) -> str:
    text = _DASHES.sub("-", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    return re.sub(r"\s+", " ", text).strip()


_CLAUSE_BREAK = re.compile(r"[,.;:!?()]|\b(?:but|rather|instead)\b")
_WORD = re.compile(r"[\w'-]+")


class _Negations:
    """Whether a negating word stands shortly before a position of ``text``, in the same clause. Clause breaks
    and words are found once per text, so checking every mention stays linear in the text's length."""

    def __init__(self, text: str):
        # "but", "rather" and "instead" start a new clause: "not a catheter but forceps" names forceps.
        self.breaks = [m.end() for m in _CLAUSE_BREAK.finditer(text)]
        words = list(_WORD.finditer(text))
        self.word_starts = [w.start() for w in words]
        self.word_ends = [w.end() for w in words]
        self.negating = [w.group() in _NEGATORS or w.group().endswith("n't") for w in words]

    def before(self, start: int) -> bool:
        clause = self.breaks[bisect.bisect_right(self.breaks, start) - 1] if self.breaks and self.breaks[0] <= start else 0
        last = bisect.bisect_right(self.word_ends, start)  # words that end before the mention
        first = max(bisect.bisect_left(self.word_starts, clause), last - _NEGATION_WINDOW)
        return any(self.negating[first:last])


@lru_cache(maxsize=None)
def _cues(question_type: str) -> tuple[tuple[str, re.Pattern], ...]:
    cues = list(_CONTENT_CUES.get(question_type, []))
    if _is_yes_no(question_type):
        cues += _YES_NO_CUES
    elif question_type not in _CONTENT_CUES:
        raise KeyError(f"no answer cues for question type {question_type!r}")
    return tuple((answer, re.compile(pattern)) for answer, pattern in cues)


def _is_yes_no(question_type: str) -> bool:
    return frozenset(candidate_labels(question_type)) == YES_NO


def score_answer(text: str, question_type: str) -> str:
    """The one label of ``question_type`` that ``text`` gives, or ``"unparseable"``.

    Yes/no types: a leading "Yes"/"No" decides; otherwise the words yes/no and, for some types, the
    concept asked about (NBI vs white light, advancing vs withdrawing, catheter vs other tools) must
    all point to one answer. Other types: exactly one answer must be named. A mention negated within its
    clause ("not in the rectum", "isn't advancing") is ignored. An answer outside the type's label set
    (e.g. "white light" for lighting_mode, whose data hold only "NBI") is unparseable: no truth can match it.
    """
    labels = candidate_labels(question_type)
    # Leading quotes, bullets and markdown go ("**Yes**"), but not the "<" of "<5 mm".
    text = _ANSWER_PREFIX.sub("", re.sub(r"^[^\w<>]+", "", _normalise(text)))
    if _is_yes_no(question_type):
        leading = _LEADING_YES_NO.match(text)
        if leading:
            return leading.group(1)
    negations = _Negations(text)
    named = {answer for answer, pattern in _cues(question_type)
             for m in pattern.finditer(text) if not negations.before(m.start())}
    if len(named) == 1 and next(iter(named)) in labels:
        return next(iter(named))
    return UNPARSEABLE


# --- prediction files ----------------------------------------------------------------------------

def _record_problem(record: Any) -> str | None:
    """Why ``record`` is not a valid prediction row, or None."""
    if not isinstance(record, dict):
        return "row is not a JSON object"
    missing = [k for k in _REQUIRED_FIELDS if k not in record]
    if missing:
        return f"missing field(s) {missing}"
    qtype = record["question_type"]
    if qtype not in QUESTION_TYPES:
        return f"unknown question_type {qtype!r}"
    labels = candidate_labels(qtype)
    if record["short_answer"] not in labels:
        return f"short_answer {record['short_answer']!r} is not a label of {qtype} {labels}"
    if not isinstance(record["prediction"], str):
        return f"prediction must be a string, got {type(record['prediction']).__name__}"
    for key in _OPTIONAL_STRINGS:
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} must be a string, got {type(record[key]).__name__}"
    for key in _OPTIONAL_NUMBERS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
                                  or value < 0):
            return f"{key} must be a finite non-negative number, got {value!r}"
    probs = record.get("probabilities")
    if probs is not None:
        if not isinstance(probs, dict) or not probs:
            return "probabilities must be a non-empty object {label: probability}"
        unknown = sorted(set(probs) - set(labels))
        if unknown:
            return f"probabilities name label(s) {unknown} outside {qtype} {labels}"
        bad = {k: v for k, v in probs.items()
               if isinstance(v, bool) or not isinstance(v, Real) or not 0 <= v <= 1}
        if bad:
            return f"probabilities must lie in [0, 1], got {bad}"
    return None


def _raise_bad(bad: list[str], where: str) -> None:
    shown = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
    raise PredictionsError(f"{len(bad)} malformed prediction row(s) in {where}:\n{shown}")


def read_predictions(path: str | Path) -> list[dict]:
    """Read and check a predictions JSONL; every bad row is reported as ``file:line: reason``."""
    path = Path(path)
    records, bad, uid_line = [], [], {}
    for lineno, line in text_lines(path):
        if line is None:
            bad.append(f"{path}:{lineno}: not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})")
            continue
        problem = _record_problem(record)
        uid = record.get("uid") if isinstance(record, dict) else None
        if not problem and uid is not None and uid in uid_line:
            problem = f"duplicate uid {uid!r} (first at line {uid_line[uid]}): a sample would be scored twice"
        if problem:
            bad.append(f"{path}:{lineno}: {problem}")
        else:
            if uid is not None:
                uid_line[uid] = lineno
            records.append(record)
    if bad:
        _raise_bad(bad, str(path))
    if not records:
        raise PredictionsError(f"{path}: no prediction rows")
    return records


def _checked(records: Iterable[dict]) -> list[dict]:
    records = list(records)
    bad = [f"row {i}: {problem}" for i, r in enumerate(records) if (problem := _record_problem(r))]
    if bad:
        _raise_bad(bad, "the records")
    return records


def write_predictions(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSONL, schema fields first, with ``parsed`` and ``correct`` filled in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in _checked(records):
            parsed = score_answer(record["prediction"], record["question_type"])
            row = {k: record[k] for k in PREDICTION_FIELDS if record.get(k) is not None}
            row.update(parsed=parsed, correct=parsed == record["short_answer"])
            row.update({k: v for k, v in record.items() if k not in PREDICTION_FIELDS})
            f.write(json.dumps(row) + "\n")
    return path


def score_predictions(records: Iterable[dict]) -> pd.DataFrame:
    """One row per prediction: the parsed label and whether it is correct, plus the optional fields.

    Columns: id, uid, question_type, truth, prediction, parsed, correct, probabilities, confidence (the
    highest candidate probability), prob_label (its label, ties to label order), prob_correct,
    latency_ms, voice, template, audio_duration_s. Missing optional values are None / NaN.
    """
    rows = []
    for r in _checked(records):
        parsed = score_answer(r["prediction"], r["question_type"])
        probs = r.get("probabilities")
        prob_label = (max(candidate_labels(r["question_type"]), key=lambda k: probs.get(k, -1.0))
                      if probs else None)
        rows.append({
            "id": None if r.get("id") is None else str(r["id"]), "uid": r.get("uid"),
            "question_type": r["question_type"], "truth": r["short_answer"], "prediction": r["prediction"],
            "parsed": parsed, "correct": parsed == r["short_answer"], "probabilities": probs,
            "confidence": float(probs[prob_label]) if probs else math.nan, "prob_label": prob_label,
            "prob_correct": (prob_label == r["short_answer"]) if probs else None,
            "latency_ms": r.get("latency_ms", math.nan), "voice": r.get("voice"),
            "template": r.get("template"), "audio_duration_s": r.get("audio_duration_s", math.nan),
        })
    frame = pd.DataFrame(rows)
    for column in _OPTIONAL_NUMBERS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


# --- accuracy ------------------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sound at 0 % and 100 %, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 % and 100 % the bound is exactly 0 or 1 in theory; rounding would leave 0.9999999999999999.
    return (0.0 if correct == 0 else max(0.0, centre - half),
            1.0 if correct == n else min(1.0, centre + half))


def _with_baselines(frame: pd.DataFrame, train: Sequence[Sample]) -> pd.DataFrame:
    """Add per-row chance (1/|label set|) and whether the train-majority (blind prior) answer is right."""
    prior = blind_prior(train)
    missing = sorted(set(frame["question_type"]) - set(prior))
    if missing:
        raise KeyError(f"the prior has no answer for question type(s) {missing} (absent from train)")
    chance = {t: 1 / len(candidate_labels(t)) for t in set(frame["question_type"])}
    return frame.assign(chance=frame["question_type"].map(chance),
                        prior_correct=frame["question_type"].map(prior) == frame["truth"])


def _accuracy_row(group: pd.DataFrame) -> dict:
    n, k = len(group), int(group["correct"].sum())
    lo, hi = wilson_interval(k, n)
    return {"n": n, "accuracy": k / n, "ci_low": lo, "ci_high": hi, "chance": float(group["chance"].mean()),
            "blind_prior": float(group["prior_correct"].mean())}


def type_accuracy(frame: pd.DataFrame, train: Sequence[Sample]) -> pd.DataFrame:
    """Per-type and overall accuracy of a frame with question_type, truth and correct columns.

    Columns n, accuracy, ci_low, ci_high (95 % Wilson), chance (1/|label set|; overall: the mean over
    rows), blind_prior (train-majority answer per type scored on the same rows) and single_class (the
    type's rows here all carry one label, so its accuracy says little).
    """
    frame = _with_baselines(frame, train)
    rows = [{"question_type": t, **_accuracy_row(g), "single_class": g["truth"].nunique() == 1}
            for t, g in frame.groupby("question_type", sort=True)]
    rows.append({"question_type": "overall", **_accuracy_row(frame), "single_class": False})
    return pd.DataFrame(rows).set_index("question_type")


def accuracy_table(samples: Sequence[Sample], predicted: Sequence[str],
                   train: Sequence[Sample]) -> pd.DataFrame:
    """``type_accuracy`` of ``predicted`` labels for ``samples`` (see there for the columns)."""
    if len(samples) != len(predicted):
        raise ValueError(f"{len(samples)} samples but {len(predicted)} predictions")
    return type_accuracy(pd.DataFrame({
        "question_type": [s.question_type for s in samples],
        "truth": [s.short_answer for s in samples],
        "correct": [p == s.short_answer for p, s in zip(predicted, samples)],
    }), train)


def accuracy_by(frame: pd.DataFrame, column: str, train: Sequence[Sample]) -> pd.DataFrame:
    """Accuracy with n, 95 % CI, chance and blind prior per value of ``column`` (template, voice, ...).

    Rows where ``column`` is missing are left out; an empty frame comes back when none has it.
    """
    present = frame[frame[column].notna()]
    if present.empty:
        return pd.DataFrame(columns=["n", "accuracy", "ci_low", "ci_high", "chance", "blind_prior"])
    present = _with_baselines(present, train)
    rows = [{column: value, **_accuracy_row(g)} for value, g in present.groupby(column, sort=True)]
    return pd.DataFrame(rows).set_index(column)


def format_accuracy(acc: float, lo: float, hi: float, n: int) -> str:
    return f"{100 * acc:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"


def format_table(table: pd.DataFrame) -> str:
    """A fixed-width text table of an accuracy table (percentages, one decimal)."""
    name = table.index.name or ""
    width = max([len(str(i)) for i in table.index] + [len(name), 8])
    has_flag = "single_class" in table.columns
    lines = [f"{name:<{width}} {'n':>5} {'acc %':>6} {'95 % CI':>13} {'chance %':>8} {'prior %':>7}"
             + (" single-class" if has_flag else "")]
    for key, r in table.iterrows():
        line = (f"{str(key):<{width}} {int(r['n']):>5} {100 * r['accuracy']:>6.1f} "
                f"{f'[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]':>13} {100 * r['chance']:>8.1f} "
                f"{100 * r['blind_prior']:>7.1f}")
        if has_flag and r["single_class"]:
            line += " yes"
        lines.append(line)
    return "\n".join(lines)


# --- error analysis ------------------------------------------------------------------------------

def confusion_matrix(frame: pd.DataFrame, question_type: str) -> pd.DataFrame:
    """Counts of truth (rows) by parsed answer (columns, plus "unparseable") for one question type.

    Every candidate label appears as a row and a column, even with no rows.
    """
    rows = frame[frame["question_type"] == question_type]
    if rows.empty:
        raise ValueError(f"no predictions of question type {question_type!r}")
    labels = candidate_labels(question_type)
    table = pd.crosstab(rows["truth"], rows["parsed"])
    table = table.reindex(index=labels, columns=labels + [UNPARSEABLE], fill_value=0)
    table.index.name, table.columns.name = "truth", "predicted"
    return table


FAILURE_KINDS = ("correct", "its question, wrong answer", "another question's answer", "unparseable")


def heard_or_seen(frame: pd.DataFrame) -> pd.DataFrame:
    """Per question type (and ``overall``): how many answers are correct, answer the question asked but
    wrongly (it was heard; what the clip shows was missed), answer another question (word for word an
    answer sentence of a different type and of none of its own: it was misheard), or cannot be parsed.
    The first kind of error points at seeing, the second at hearing."""
    sentences: dict[str, set[str]] = {}
    for (qtype, _), sentence in answer_sentences().items():
        sentences.setdefault(sentence.strip().lower(), set()).add(qtype)

    def kind(row) -> str:
        if row["correct"]:
            return FAILURE_KINDS[0]
        owners = sentences.get(str(row["prediction"]).strip().lower(), set())
        if owners and row["question_type"] not in owners:
            return FAILURE_KINDS[2]
        return FAILURE_KINDS[1] if row["parsed"] != UNPARSEABLE else FAILURE_KINDS[3]

    kinds = frame.apply(kind, axis=1)
    table = pd.crosstab(frame["question_type"], kinds).reindex(columns=list(FAILURE_KINDS), fill_value=0)
    table.loc["overall"] = table.sum()
    table.index.name, table.columns.name = "question_type", None
    table.insert(0, "n", table.sum(axis=1))
    return table


def mode_collapse(frame: pd.DataFrame, threshold: float = 0.8, min_n: int = 10) -> pd.DataFrame:
    """Per question type: is one predicted answer taking more than ``threshold`` of the rows while the
    truth is balanced?

    The truth counts as balanced when its most common label takes less than ``threshold`` of the rows:
    then answering one thing that often cannot be explained by the data. ``"unparseable"`` counts as one
    predicted answer (a model that always says the same unreadable thing has collapsed too). Types with
    fewer than ``min_n`` rows are never flagged: a handful of rows proves nothing.
    """
    rows = []
    for qtype, g in frame.groupby("question_type", sort=True):
        predicted = g["parsed"].value_counts()
        truth = g["truth"].value_counts()
        top_share, truth_share = predicted.iloc[0] / len(g), truth.iloc[0] / len(g)
        rows.append({
            "question_type": qtype, "n": len(g), "top_prediction": predicted.index[0],
            "top_share": top_share, "top_truth": truth.index[0], "truth_majority_share": truth_share,
            "collapsed": bool(len(g) >= min_n and top_share > threshold and truth_share < threshold),
        })
    return pd.DataFrame(rows).set_index("question_type")


def failures_by(frame: pd.DataFrame, column: str,
                bins: int | Sequence[float] | None = None) -> pd.DataFrame:
    """Failures (parsed != truth) per value of ``column``: n, failures, failure_rate with its 95 % CI,
    and how many of the failures were unparseable.

    ``bins`` groups a numeric column (audio_duration_s, latency_ms): an int makes that many
    equal-count (quantile) bins, a sequence gives the bin edges. Rows missing ``column`` are left out.
    """
    present = frame[frame[column].notna()]
    if present.empty:
        raise ValueError(f"no predictions carry {column!r}")
    key = present[column]
    if isinstance(bins, int):
        key = pd.qcut(key, bins, duplicates="drop")
    elif bins is not None:
        key = pd.cut(key, list(bins), include_lowest=True)
    rows = []
    for value, g in present.groupby(key, sort=True, observed=True):
        failed = ~g["correct"]
        lo, hi = wilson_interval(int(failed.sum()), len(g))
        rows.append({column: value, "n": len(g), "failures": int(failed.sum()),
                     "failure_rate": float(failed.mean()), "ci_low": lo, "ci_high": hi,
                     "unparseable": int((g["parsed"] == UNPARSEABLE).sum())})
    return pd.DataFrame(rows).set_index(column)


def wrong_answers(frame: pd.DataFrame, samples: Sequence[Sample],
                  audio_paths: dict[str, str] | None = None) -> pd.DataFrame:
    """Every wrong answer with what a reader needs to judge it, by uid: question type, the question as
    written, the truth, the model's answer and what the scorer read in it, the voice and the WAV that said
    the question (when the model heard it)."""
    by_uid = {s.uid: s for s in samples}
    wrong = frame[~frame["correct"]]
    missing = [u for u in wrong["uid"] if u not in by_uid]
    if missing:
        raise KeyError(f"{len(missing)} predicted uid(s) are not among the given samples, e.g. {missing[:3]}")
    audio_paths = audio_paths or {}
    return pd.DataFrame({
        "uid": wrong["uid"].to_numpy(), "question_type": wrong["question_type"].to_numpy(),
        "question": [by_uid[u].question for u in wrong["uid"]], "truth": wrong["truth"].to_numpy(),
        "prediction": wrong["prediction"].to_numpy(), "read_as": wrong["parsed"].to_numpy(),
        "voice": wrong["voice"].to_numpy(),
        "audio": [audio_paths.get(u) for u in wrong["uid"]]}).set_index("uid")


def reliability(frame: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Calibration of candidate probabilities: per confidence bin, mean confidence vs accuracy.

    Confidence is the highest candidate probability of a row and accuracy whether that label is the
    truth. Bin i holds confidences in (i/bins, (i+1)/bins] (0 goes to the first). Columns: low, high, n,
    confidence, accuracy, gap (accuracy - confidence); empty bins have n = 0 and NaN means.
    """
    rows = frame[frame["confidence"].notna()]
    if rows.empty:
        raise ValueError("no predictions carry candidate probabilities")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(rows["confidence"].to_numpy(), edges[1:-1], right=True)
    correct = rows["prob_correct"].astype(bool).to_numpy()
    confidence = rows["confidence"].to_numpy()
    table = []
    for i in range(bins):
        members = which == i
        n = int(members.sum())
        conf = float(confidence[members].mean()) if n else math.nan
        acc = float(correct[members].mean()) if n else math.nan
        table.append({"low": edges[i], "high": edges[i + 1], "n": n, "confidence": conf, "accuracy": acc,
                      "gap": acc - conf})
    return pd.DataFrame(table)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE of a ``reliability`` table: the n-weighted mean of |accuracy - confidence| over bins."""
    filled = table[table["n"] > 0]
    return float((filled["n"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / filled["n"].sum())


def reliability_figure(table: pd.DataFrame, ax=None, title: str = "Reliability of candidate probabilities"):
    """Accuracy per confidence bin against the diagonal of perfect calibration, ECE in the title."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    filled = table[table["n"] > 0]
    width = float((table["high"] - table["low"]).iloc[0])
    ax.bar(filled["low"], filled["accuracy"], width=width, align="edge", edgecolor="black",
           alpha=0.7, label="accuracy")
    ax.plot(filled["confidence"], filled["accuracy"], "o", color="black", markersize=3,
            label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for _, r in filled.iterrows():
        ax.annotate(f"n={int(r['n'])}", (r["low"] + width / 2, r["accuracy"]), ha="center",
                    va="bottom", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (highest candidate probability)",
           ylabel="accuracy", title=f"{title}\nECE = {expected_calibration_error(table):.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return ax.figure


def data_answer(question_type: str, label: str) -> str:
    """The answer text the data gives a label (what a model answering that label would say)."""
    texts, _ = candidate_answers(question_type)
    return texts[label]


# --- summary and command line --------------------------------------------------------------------

def baseline_row(name: str, frame: pd.DataFrame, train: Sequence[Sample], ms_per_query: float) -> dict:
    """One line of the baselines table: strict accuracy with CI, candidate accuracy, chance, prior, speed."""
    table = type_accuracy(frame, train)
    overall = table.loc["overall"]
    candidate = float(frame["prob_correct"].astype(float).mean()) if frame["prob_correct"].notna().all() else math.nan
    return {"baseline": name, "n": int(overall["n"]), "accuracy": float(overall["accuracy"]),
            "ci_low": float(overall["ci_low"]), "ci_high": float(overall["ci_high"]),
            "candidate_accuracy": candidate, "chance": float(overall["chance"]),
            "blind_prior": float(overall["blind_prior"]), "ms_per_query": ms_per_query,
            "samples_per_s": 1000 / ms_per_query if ms_per_query else math.nan}


def _table_json(table: pd.DataFrame) -> dict:
    return {str(k): {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}
            for k, row in table.iterrows()}


def report_tables(frame: pd.DataFrame, train: Sequence[Sample]) -> dict[str, pd.DataFrame]:
    """The accuracy tables ``score`` prints: per type and overall, and by template and voice when the
    predictions carry them."""
    tables = {"accuracy": type_accuracy(frame, train)}
    for column in ("template", "voice"):
        by = accuracy_by(frame, column, train)
        if not by.empty:
            tables[f"accuracy_by_{column}"] = by
    return tables


def summarize(frame: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> dict:
    """Everything ``score`` reports, as plain JSON-ready values (``tables`` from ``report_tables``)."""
    summary: dict[str, Any] = {"n": len(frame), "unparseable": int((frame["parsed"] == UNPARSEABLE).sum())}
    summary.update({name: _table_json(table) for name, table in tables.items()})
    collapse = mode_collapse(frame)
    summary["mode_collapse"] = sorted(collapse.index[collapse["collapsed"]])
    if frame["confidence"].notna().any():
        summary["ece"] = expected_calibration_error(reliability(frame))
    if frame["latency_ms"].notna().any():
        summary["latency_ms_mean"] = float(frame["latency_ms"].mean())
    return summary


def load_train(source: str) -> list[Sample]:
    """Train rows for the blind prior: "published", "stratified" (the config's held-out-video split)
    or the path of an annotation JSONL."""
    if source == "published":
        return published_split()["train"]
    if source == "stratified":
        from .config import get_config
        return load_split(get_config(split="stratified"))["train"]
    return load_annotations(source)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa score",
                                     description="Score a predictions JSONL strictly and print accuracy "
                                                 "with n, 95 % CI, chance and the blind prior.")
    parser.add_argument("predictions", help="JSONL with question_type, short_answer and prediction per line")
    parser.add_argument("--train", default="published",
                        help="train rows for the blind prior: published, stratified or an annotation JSONL")
    args = parser.parse_args(argv)
    path = Path(args.predictions)
    try:
        frame = score_predictions(read_predictions(path))
        tables = report_tables(frame, load_train(args.train))
    except (PredictionsError, AnnotationError, FileNotFoundError) as e:
        print(f"[score] {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"[score] {e.args[0]}", file=sys.stderr)
        return 2
    summary = summarize(frame, tables)
    print(f"{path}: {len(frame)} predictions, {summary['unparseable']} unparseable, "
          f"blind prior from the {args.train} train rows")
    print("\n\n".join(format_table(table) for table in tables.values()))
    if summary["mode_collapse"]:
        print(f"\nmode collapse (one answer > 80 % while the truth is balanced): "
              f"{', '.join(summary['mode_collapse'])}")
    if "ece" in summary:
        print(f"\nexpected calibration error of candidate probabilities: {summary['ece']:.3f}")
    out = path.with_suffix(".summary.json")
    out.write_text(json.dumps({"predictions": str(path), "train": args.train, **summary}, indent=2) + "\n")
    print(f"\nsummary written to {out}")
    return 0
