"""Annotations: load and validate SurgViVQA rows, label sets, splits and the blind prior.

Every malformed row is reported with its file and line number. Loading fails on any bad row unless the
caller asks to skip bad rows, and then it says how many were skipped and why.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .config import QUESTION_TYPES, Config, get_config  # QUESTION_TYPES: the task's 20 question types

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

FRAMES_PER_CLIP = 8
YES_NO = frozenset({"yes", "no"})
TEMPLATE_FILES = {"in": "in_template.jsonl", "out": "out_template.jsonl"}
SPLIT_NAMES = ("train", "eval", "test")
_FRAME_NAME = re.compile(r"^(\d{3}-\d{3})_(\d+)$")
_REQUIRED = {
    "id": str, "video_id": str, "frames": list, "frame_numbers": list, "question": str,
    "question_type": str, "answer": str, "short_answer": str,
}


class AnnotationError(ValueError):
    """One or more annotation rows are malformed; the message names every file:line and reason."""


@dataclass(frozen=True)
class Sample:
    id: str
    video_id: str
    frames: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    question: str
    question_type: str
    answer: str
    short_answer: str
    source: str  # "file:line" the row came from, for error messages downstream

    @property
    def uid(self) -> str:
        """Unique across videos (ids repeat between videos in the published split files)."""
        return f"{self.video_id}/{self.id}"

    @property
    def clip_key(self) -> tuple[str, tuple[str, ...]]:
        return (self.video_id, self.frames)

    def clip_frames(self, count: int = FRAMES_PER_CLIP) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Names and numbers of the frames the clip is seen through: its own 8, or with ``count`` 16 the frame
        halfway after each of them too (the annotated frames step by 4 and the recordings keep every frame, so
        the 16 span the clip's own time and one step more)."""
        if count == len(self.frames):
            return self.frames, self.frame_numbers
        if count != 2 * len(self.frames):
            raise ValueError(f"sample {self.uid}: {count} frames: a clip is seen through its {len(self.frames)} "
                             f"frames or twice as many")
        steps = {b - a for a, b in zip(self.frame_numbers, self.frame_numbers[1:])}
        if len(steps) != 1 or next(iter(steps)) % 2:
            raise ValueError(f"sample {self.uid} ({self.source}): frame numbers {list(self.frame_numbers)} do not "
                             f"step by one even number, so no frame lies halfway between them")
        half = next(iter(steps)) // 2
        numbers = tuple(n + k * half for n in self.frame_numbers for k in (0, 1))
        names = tuple(f"{self.frames[i // 2].rsplit('_', 1)[0]}_{n}" for i, n in enumerate(numbers))
        return names, numbers


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def data_dir(cfg: Config | None = None) -> Path:
    cfg = cfg or get_config()
    return cfg.path(cfg.data_dir)


VIDEO_INFO_FILE = "video_info.csv"


def video_frame_rates(cfg: Config | None = None) -> dict[str, float]:
    """Each REAL-Colon recording's frame rate (frames per second), from the data's ``video_info.csv``: a clip's
    frames are ``frame_numbers / fps`` seconds into its recording."""
    return dict(_frame_rates(str(data_dir(cfg) / VIDEO_INFO_FILE)))


@lru_cache(maxsize=4)
def _frame_rates(path: str) -> tuple[tuple[str, float], ...]:
    import csv

    rates = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                fps = float(row["fps"])
            except (KeyError, TypeError, ValueError):
                raise AnnotationError(f"{path}:{line}: no frame rate (fps) for video {row.get('unique_video_name')!r}")
            if not fps > 0:
                raise AnnotationError(f"{path}:{line}: frame rate {fps} of video {row['unique_video_name']} is not positive")
            rates.append((row["unique_video_name"], fps))
    return tuple(rates)


def _parse_row(line: str, labels: dict[str, frozenset[str]] | None) -> tuple[dict | None, str | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg} at column {e.colno})"
    if not isinstance(row, dict):
        return None, "row is not a JSON object"
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        return None, f"missing field(s) {missing}"
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(row[k], t)]
    if wrong:
        return None, f"field(s) of the wrong type {wrong}"
    empty = [k for k in ("id", "video_id", "question", "answer", "short_answer") if not str(row[k]).strip()]
    if empty:
        return None, f"empty field(s) {empty} (id {row['id']!r})"
    qtype = row["question_type"]
    if qtype not in QUESTION_TYPES:
        return None, f"unknown question_type {qtype!r} (id {row['id']})"
    if labels is not None and row["short_answer"] not in labels[qtype]:
        return None, (f"short_answer {row['short_answer']!r} is not a label of {qtype} "
                      f"{sorted(labels[qtype])} (id {row['id']})")
    frames, numbers = row["frames"], row["frame_numbers"]
    if len(frames) != FRAMES_PER_CLIP or len(numbers) != FRAMES_PER_CLIP:
        return None, f"{len(frames)} frames and {len(numbers)} frame_numbers, expected {FRAMES_PER_CLIP} (id {row['id']})"
    for name, number in zip(frames, numbers):
        m = _FRAME_NAME.match(str(name))
        if not m or m.group(1) != row["video_id"]:
            return None, f"frame name {name!r} is not of video {row['video_id']} (id {row['id']})"
        if int(m.group(2)) != number:
            return None, f"frame name {name!r} does not match frame number {number} (id {row['id']})"
    return row, None


def text_lines(path: Path):
    """(line number, text) of every line of a UTF-8 file; the text is None where a line is not UTF-8, so the
    caller can name file:line instead of failing with a bare decoding error."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None


def load_annotations(path: str | Path, skip_bad: bool = False,
                     labels: dict[str, frozenset[str]] | None = None) -> list[Sample]:
    """Load one JSONL annotation file into validated samples.

    ``labels`` (default: the label sets of the shipped templates) checks every short_answer; pass an
    explicit mapping to validate against other label sets. With ``skip_bad`` the bad rows are dropped
    and a warning says how many and why; otherwise any bad row raises an ``AnnotationError``.
    """
    path = Path(path)
    if labels is None:
        labels = label_sets()
    samples, bad, seen = [], [], {}
    for lineno, line in text_lines(path):
        if line is None:
            bad.append(BadRow(str(path), lineno, "not UTF-8 text"))
            continue
        if not line.strip():
            continue
        row, reason = _parse_row(line, labels)
        # ids are numbered per video in the published split files, so (video, id) is the key
        key = (row["video_id"], row["id"]) if row is not None else None
        if key in seen:
            row, reason = None, f"duplicate id {key[1]} of video {key[0]} (first at line {seen[key]})"
        if row is None:
            bad.append(BadRow(str(path), lineno, reason))
            continue
        seen[key] = lineno
        samples.append(Sample(
            id=row["id"], video_id=row["video_id"], frames=tuple(row["frames"]),
            frame_numbers=tuple(int(n) for n in row["frame_numbers"]), question=row["question"],
            question_type=row["question_type"], answer=row["answer"],
            short_answer=row["short_answer"], source=f"{path}:{lineno}"))
    if not samples and not bad:
        raise AnnotationError(f"{path} holds no annotation rows (empty or blank)")
    if bad and not skip_bad:
        shown = "\n".join(map(str, bad[:20])) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise AnnotationError(f"{len(bad)} malformed row(s) in {path}:\n{shown}")
    if bad:
        reasons = Counter(b.reason.split(" (")[0] for b in bad)
        log.warning("skipped %d malformed row(s) in %s: %s", len(bad), path, dict(reasons))
    return samples


@lru_cache(maxsize=4)
def _template_label_sets(directory: str) -> dict[str, frozenset[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for name in TEMPLATE_FILES.values():
        path = Path(directory) / name
        with path.open() as f:
            for lineno, line in enumerate(f, start=1):
                row, reason = _parse_row(line, None)
                if row is None:
                    raise AnnotationError(f"{path}:{lineno}: {reason}")
                found[row["question_type"]].add(row["short_answer"])
    missing = [t for t in QUESTION_TYPES if t not in found]
    if missing:
        raise AnnotationError(f"question types with no rows in {directory}: {missing}")
    # A yes/no question can be answered either way even when the data only ever says one of them
    # (blue_dye_presence is always "no"): its label set is {yes, no}, so chance is 50 %, not 100 %.
    return {t: frozenset(YES_NO if found[t] <= YES_NO else found[t]) for t in QUESTION_TYPES}


def label_sets(cfg: Config | None = None) -> dict[str, frozenset[str]]:
    """Label set of every question type, read from both shipped template files."""
    return _template_label_sets(str(data_dir(cfg)))


def candidate_labels(question_type: str, cfg: Config | None = None) -> list[str]:
    """The answer labels of a question type in a fixed (sorted) order."""
    sets = label_sets(cfg)
    if question_type not in sets:
        raise KeyError(f"unknown question type {question_type!r}; known: {sorted(sets)}")
    return sorted(sets[question_type])


def load_template(template: str, cfg: Config | None = None) -> list[Sample]:
    if template not in TEMPLATE_FILES:
        raise ValueError(f"template must be one of {sorted(TEMPLATE_FILES)}, got {template!r}")
    return list(_load_template(template, str(data_dir(cfg))))


@lru_cache(maxsize=8)
def _load_template(template: str, directory: str) -> tuple[Sample, ...]:
    # Renderers and scorers ask for wordings and sentences per clip; parsing 5,200 rows once is enough.
    return tuple(load_annotations(Path(directory) / TEMPLATE_FILES[template],
                                  labels=_template_label_sets(directory)))


def question_wordings(template: str, cfg: Config | None = None) -> dict[str, str]:
    """The one question wording per type of a template (checked: exactly one)."""
    wordings: dict[str, set[str]] = defaultdict(set)
    for s in load_template(template, cfg):
        wordings[s.question_type].add(s.question)
    several = {t: sorted(w) for t, w in wordings.items() if len(w) != 1}
    if several:
        raise AnnotationError(f"{template} template: expected one wording per type, found {several}")
    return {t: next(iter(wordings[t])) for t in QUESTION_TYPES}


def answer_sentences(cfg: Config | None = None) -> dict[tuple[str, str], str]:
    """The answer sentence of every (question type, label), checked to be unique."""
    sentences: dict[tuple[str, str], set[str]] = defaultdict(set)
    for template in TEMPLATE_FILES:
        for s in load_template(template, cfg):
            sentences[(s.question_type, s.short_answer)].add(s.answer)
    several = {k: sorted(v) for k, v in sentences.items() if len(v) != 1}
    if several:
        raise AnnotationError(f"several answer sentences for one label: {several}")
    return {k: next(iter(v)) for k, v in sentences.items()}


@lru_cache(maxsize=4)
def _candidate_answers(directory: str) -> dict[str, tuple[dict[str, str], bool]]:
    cfg = Config(data_dir=directory)
    sentences, sets = answer_sentences(cfg), label_sets(cfg)
    out = {}
    for qtype in QUESTION_TYPES:
        labels = sorted(sets[qtype])
        if all((qtype, label) in sentences for label in labels):
            out[qtype] = ({label: sentences[(qtype, label)] for label in labels}, True)
            continue
        # Only a yes/no type can lack a sentence for one of its labels (blue_dye_presence is never
        # "yes" in the data). Its candidates are then the leading words every yes/no answer starts with.
        for (t, label), sentence in sentences.items():
            if sets[t] == YES_NO and not sentence.startswith(label.capitalize() + ","):
                raise AnnotationError(f"yes/no answer {sentence!r} ({t}) does not start with {label.capitalize()},")
        if sets[qtype] != YES_NO:
            raise AnnotationError(f"no answer sentence for some label of {qtype} {labels}")
        out[qtype] = ({label: label.capitalize() for label in labels}, False)
    return out


def candidate_answers(question_type: str, cfg: Config | None = None) -> tuple[dict[str, str], bool]:
    """The texts that candidate scoring compares for a type: ``({label: text}, complete)``.

    Normally each label's answer sentence (``complete``: the end-of-turn follows it). For a yes/no type
    whose data lacks one side's sentence, the leading "Yes" / "No" of the answer (not complete).
    """
    table = _candidate_answers(str(data_dir(cfg)))
    if question_type not in table:
        raise KeyError(f"unknown question type {question_type!r}; known: {sorted(table)}")
    return table[question_type]


def _sample_key(s: Sample) -> tuple:
    return (s.video_id, s.frames, s.question_type)


def _reword(samples: Sequence[Sample], template: str, cfg: Config | None) -> list[Sample]:
    """The same rows (clip, type, label) with the question wording of ``template``."""
    by_key = {_sample_key(s): s for s in load_template(template, cfg)}
    out = []
    for s in samples:
        t = by_key.get(_sample_key(s))
        if t is None or t.short_answer != s.short_answer:
            raise AnnotationError(f"{s.source}: no matching row in the {template} template "
                                  f"(video {s.video_id}, frames {s.frames[0]}.., {s.question_type})")
        out.append(Sample(**{**s.__dict__, "question": t.question, "answer": t.answer}))
    return out


def published_split(template: str = "out", cfg: Config | None = None) -> dict[str, list[Sample]]:
    """The split shipped with SurgViVQA (out-template wording), optionally reworded to ``template``."""
    directory = data_dir(cfg) / "published_split"
    splits = {name: load_annotations(directory / f"{name}_multivideo.jsonl", labels=label_sets(cfg))
              for name in SPLIT_NAMES}
    if template != "out":
        splits = {name: _reword(rows, template, cfg) for name, rows in splits.items()}
    return splits


def make_split(samples: Sequence[Sample], trainval_videos: Iterable[str], test_video: str,
               eval_fraction: float = 0.15, seed: int = 42) -> dict[str, list[Sample]]:
    """Held-out-video split: train/eval stratified per question type, one video held out as test.

    Per type, ``floor(n * eval_fraction)`` rows (at least one) go to eval, so every type is in eval.
    Deterministic for a given seed and input order.
    """
    trainval_videos = set(trainval_videos)
    if test_video in trainval_videos:
        raise ValueError(f"test video {test_video} is also a train/eval video")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.video_id in trainval_videos:
            by_type[s.question_type].append(s)
    train, evaluation = [], []
    for qtype in QUESTION_TYPES:
        rows = by_type.get(qtype, [])
        if len(rows) < 2:
            raise ValueError(f"question type {qtype} has {len(rows)} train/eval rows; need at least 2")
        order = rng.permutation(len(rows))
        n_eval = max(1, int(len(rows) * eval_fraction))
        evaluation += [rows[i] for i in order[:n_eval]]
        train += [rows[i] for i in order[n_eval:]]
    test = [s for s in samples if s.video_id == test_video]
    train = [train[i] for i in rng.permutation(len(train))]
    return {"train": train, "eval": evaluation, "test": test}


def load_split(cfg: Config | None = None) -> dict[str, list[Sample]]:
    """The split the config asks for: the published one, or a stratified one made by ``make_split``; with
    ``cfg.train_wordings="bank"`` the train questions in the paraphrase bank's train wordings (``reworded``)."""
    cfg = cfg or get_config()
    if cfg.split == "published":
        splits = published_split(cfg.template, cfg)
    else:
        splits = make_split(load_template(cfg.template, cfg), cfg.trainval_videos, cfg.test_video,
                            cfg.eval_fraction, cfg.split_seed)
    if cfg.train_wordings == "bank":
        splits = {**splits, "train": reworded(splits["train"], "train", cfg)}
    return splits


# --- blind prior ---------------------------------------------------------------------------------

def blind_prior(train: Sequence[Sample]) -> dict[str, str]:
    """Train-majority answer per question type (ties broken by label order): no pixels, no audio."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        counts[s.question_type][s.short_answer] += 1
    return {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in counts.items()}


def prior_predictions(prior: dict[str, str], samples: Sequence[Sample]) -> list[str]:
    missing = sorted({s.question_type for s in samples} - set(prior))
    if missing:
        raise KeyError(f"the prior has no answer for question type(s) {missing} (absent from train)")
    return [prior[s.question_type] for s in samples]


def single_class_types(samples: Sequence[Sample]) -> list[str]:
    """Question types whose rows in ``samples`` all carry one label (accuracy there says little)."""
    labels: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        labels[s.question_type].add(s.short_answer)
    return sorted(t for t, v in labels.items() if len(v) == 1)


def limited(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """A seeded subset of ``limit`` rows spread over question types (all rows when limit is 0)."""
    if not limit or limit >= len(samples):
        return samples
    order = np.random.default_rng(seed).permutation(len(samples))
    by_type: dict[str, list[int]] = {}
    for i in order:
        by_type.setdefault(samples[i].question_type, []).append(int(i))
    picked, rounds = [], max(len(v) for v in by_type.values())
    for r in range(rounds):  # round-robin over types so a small subset still covers them
        picked += [v[r] for v in by_type.values() if r < len(v)]
    return [samples[i] for i in sorted(picked[:limit])]


# --- other wordings of the questions -------------------------------------------------------------

# Natural wordings of every question type beside the templates' (data/raw/paraphrases/README.md says where they
# come from), each in one split: train and eval wordings may be read and heard in (pre)training and its
# evaluations; test wordings only by the robustness checks, never in any training.
PARAPHRASE_FILE = "data/raw/paraphrases/question_wordings.csv"
WORDING_SPLITS = ("train", "eval", "test")
PARAPHRASE_COLUMNS = ("question_type", "split", "style", "wording")


def paraphrase_bank(cfg: Config | None = None, path: str | Path | None = None) -> pd.DataFrame:
    """Every wording of every question type: the bank's (columns question_type, split, style, wording) and
    both templates' (split train, style ``template``), with ``source`` (bank or template). Checked: known
    types and splits, a question sentence, no wording twice (ignoring case and spacing) nor a template's in
    the bank, and every type worded in every split; an error names the file and the line."""
    import pandas as pd

    cfg = cfg or get_config()
    path = Path(path) if path else cfg.path(PARAPHRASE_FILE)
    if not path.is_file():
        raise AnnotationError(f"paraphrase bank {path} does not exist")
    bank = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(bank.columns) != PARAPHRASE_COLUMNS:
        raise AnnotationError(f"{path}: columns {list(bank.columns)}, expected {list(PARAPHRASE_COLUMNS)}")
    templates = {" ".join(w.lower().split()): (t, qtype) for t in TEMPLATE_FILES
                 for qtype, w in question_wordings(t, cfg).items()}
    seen: dict[str, int] = {}
    for line, row in zip(range(2, len(bank) + 2), bank.itertuples(index=False)):
        where = f"{path} line {line}"
        if row.question_type not in QUESTION_TYPES:
            raise AnnotationError(f"{where}: unknown question type {row.question_type!r}")
        if row.split not in WORDING_SPLITS:
            raise AnnotationError(f"{where}: split {row.split!r}, expected one of {WORDING_SPLITS}")
        key = " ".join(row.wording.lower().split())
        if not key or key[-1] not in "?.":
            raise AnnotationError(f"{where}: wording {row.wording!r} is not a question sentence")
        if key in templates:
            raise AnnotationError(f"{where}: {row.wording!r} is the {templates[key][0]} template's wording")
        if key in seen:
            raise AnnotationError(f"{where}: {row.wording!r} is also on line {seen[key]}")
        seen[key] = line
    missing = [(t, s) for t in QUESTION_TYPES for s in WORDING_SPLITS
               if not ((bank.question_type == t) & (bank.split == s)).any()]
    if missing:
        raise AnnotationError(f"{path}: no wording for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    template_rows = pd.DataFrame([{"question_type": qtype, "split": "train", "style": "template", "wording": w}
                                  for t in TEMPLATE_FILES for qtype, w in question_wordings(t, cfg).items()]
                                 ).drop_duplicates(["question_type", "wording"])  # two types share a wording
    return pd.concat([template_rows.assign(source="template"), bank.assign(source="bank")], ignore_index=True)


def closest_questions(texts: Sequence[str], cfg: Config | None = None) -> list[tuple[str, str]]:
    """Closed-set intent matching, the pipeline a user would build instead of a model that hears: each text (an
    ASR transcript, say) goes to the question type of its most similar known wording (TF-IDF over character
    2-4-grams within words, cosine; robust to a transcript's spelling of "NBI" or a dropped word) and is replaced
    by that type's wording in ``cfg.template``, which the model was trained on. Known wordings: both templates'
    and the paraphrase bank's train and eval wordings; its test wordings are never matched against.
    (question type, wording) per text."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not texts:
        return []
    cfg = cfg or get_config()
    bank = paraphrase_bank(cfg)
    known = bank[bank["split"] != "test"]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True).fit(known["wording"])
    similarity = (vectorizer.transform(list(texts)) @ vectorizer.transform(known["wording"]).T).toarray()
    types = known["question_type"].to_numpy()[similarity.argmax(axis=1)]
    wordings = question_wordings(cfg.template, cfg)
    return [(str(t), wordings[t]) for t in types]


def wordings_of(split: str, cfg: Config | None = None) -> dict[str, list[str]]:
    """question type -> the paraphrase bank's wordings of ``split`` (for train, both templates' among them), in
    the file's order."""
    if split not in WORDING_SPLITS:
        raise ValueError(f"wording split {split!r}: one of {WORDING_SPLITS}")
    bank = paraphrase_bank(cfg)
    return bank[bank["split"] == split].groupby("question_type")["wording"].apply(list).to_dict()


# wording_variants: the share of words a dropping variant loses, and the tries per variant before a type stops
VARIANT_WORD_DROP = 0.25
VARIANT_TRIES = 50


def wording_variants(cfg: Config | None = None) -> dict[str, list[str]]:
    """question type -> ``cfg.wording_variants`` new wordings made from its train wordings alone (the bank's and
    both templates'), so that a model learns a type from its words rather than from seven exact sentences: a
    variant drops a quarter of a wording's words, or joins the start of one wording to the end of another, or
    both, and keeps at least one word that only its type's train wordings use. Seeded by the type's name (the
    same variants in every run). A variant that equals any known wording (any type, any split: no eval or test
    wording is ever made) or another type's variant is dropped; a type whose wordings yield fewer distinct
    variants gets fewer."""
    import hashlib

    cfg = cfg or get_config()
    train = wordings_of("train", cfg)
    known = {_wording_key(w) for w in paraphrase_bank(cfg)["wording"]}
    vocab = {t: {w for wording in ws for w in _wording_key(wording).split()} for t, ws in train.items()}
    made: dict[str, list[str]] = {}
    for qtype in QUESTION_TYPES:
        # a variant keeps a word no other type's train wordings use, so it still says which question it is
        distinctive = vocab[qtype] - set().union(*(v for t, v in vocab.items() if t != qtype))
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(qtype.encode()).digest()[:8], "little"))
        sentences = [_sentence_words(w) for w in train[qtype]]
        mine: dict[str, str] = {}
        for _ in range(VARIANT_TRIES * cfg.wording_variants):
            if len(mine) == cfg.wording_variants:
                break
            words = sentences[rng.integers(len(sentences))]
            how = rng.integers(3)  # 0 drop, 1 join, 2 join then drop
            if how:
                other = sentences[rng.integers(len(sentences))]
                words = words[:rng.integers(1, len(words) + 1)] + other[rng.integers(len(other)):]
            if how != 1:
                words = [w for w in words if rng.random() >= VARIANT_WORD_DROP]
            if len(words) < 2:
                continue
            text = " ".join(words)
            text = text[0].upper() + text[1:] + "?"
            if _wording_key(text) not in known and distinctive & set(_wording_key(text).split()):
                mine.setdefault(_wording_key(text), text)
        made[qtype] = list(mine.values())
    shared = Counter(_wording_key(w) for ws in made.values() for w in ws)
    return {t: [w for w in ws if shared[_wording_key(w)] == 1] for t, ws in made.items()}


def _wording_key(wording: str) -> str:
    return " ".join(wording.lower().rstrip("?. ").split())


def _sentence_words(wording: str) -> list[str]:
    """A wording's words without its end mark, its first word in lower case unless it is an acronym (NBI)."""
    words = wording.rstrip("?. ").split()
    if not words[0].isupper():
        words[0] = words[0][0].lower() + words[0][1:]
    return words


def training_wordings(cfg: Config | None = None) -> dict[str, list[str]]:
    """question type -> the wordings training and pretraining may read and hear: the bank's train wordings with
    ``cfg.train_wordings="bank"`` (and ``wording_variants`` of them), otherwise the two templates' (one each,
    fewer where they agree)."""
    cfg = cfg or get_config()
    if cfg.train_wordings == "bank":
        variants = wording_variants(cfg)  # none with wording_variants=0
        return {t: ws + variants[t] for t, ws in wordings_of("train", cfg).items()}
    templates = [question_wordings(t, cfg) for t in TEMPLATE_FILES]
    return {t: list(dict.fromkeys(w[t] for w in templates)) for t in QUESTION_TYPES}


def reworded(samples: Sequence[Sample], split: str, cfg: Config | None = None) -> list[Sample]:
    """The samples asked in the paraphrase bank's ``split`` wordings instead of their template's (for train, both
    templates' wordings among them): each gets one of its question type's wordings, chosen by its uid (the same
    in every run)."""
    import dataclasses
    import hashlib

    cfg = cfg or get_config()
    # train questions: with the config's wording_variants among the wordings, as pretraining reads them
    options = training_wordings(cfg) if split == "train" and cfg.train_wordings == "bank" else wordings_of(split, cfg)
    out = []
    for s in samples:
        pick = int.from_bytes(hashlib.sha256(s.uid.encode()).digest()[:8], "little") % len(options[s.question_type])
        out.append(dataclasses.replace(s, question=options[s.question_type][pick]))
    return out


def longest_answer_tokens(cfg: Config, tokenizer) -> int:
    """The longest answer sentence of every split, in ``tokenizer``'s tokens (end of turn not counted)."""
    answers = {s.answer for rows in load_split(cfg).values() for s in rows}
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
