"""How phantom pretraining is measured and reported: per-type accuracy by candidate scoring on held-out random
clips, on the phantom renderings of the published eval split, and the single repeated frame control (frame 0
eight times), which must stay near chance on the motion questions; heard and heard-and-written questions said by
the heard bank's eval voices; the curves and the model card written beside the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from . import data, phantom
from .config import Config, PretrainSettings, format_override
from .data import FRAMES_PER_CLIP, QUESTION_TYPES, Sample
from .inference import score_candidates
from .loop import autocast_for
from .model import AudioGraftedVLM, collator
from .phantom import ClipState
from .pretrain_data import Row, RowBuilder, shared_vision_token_losses
from .scoring import candidate_scores, candidate_token_rows
from .workbook import markdown_table

# Motion questions: one frame cannot answer them, so on a repeated frame a model that reads motion from time
# answers as for a still clip (still_answer_accuracy), or at chance where only moving clips are asked.
MOTION_TYPES = ("lesion_motion_direction", "scope_motion", "scope_motion_type", "scope_forward_motion",
                "scope_backward_motion")
# The evaluation sets whose minimum accuracy is reported: written, then heard (audio), then heard and written.
SET_SUFFIX = {"text": "", "audio": "_heard", "both": "_both"}
SCORED_SETS = tuple(base + suffix for suffix in SET_SUFFIX.values() for base in ("heldout", "eval_split"))


# --- evaluation ----------------------------------------------------------------------------------

@lru_cache(maxsize=2048)
def _rendered(state: ClipState, frame_size: int, phantom_seed: int) -> np.ndarray:
    return phantom.render_phantom_clip(state, frame_size, phantom_seed)


def clip_frames(state: ClipState, frame_size: int, phantom_seed: int, single_frame: bool) -> np.ndarray:
    """The clip's rendering, or its frame 0 repeated over the clip (the single-frame control)."""
    clip = _rendered(state, frame_size, phantom_seed)
    return np.repeat(clip[:1], FRAMES_PER_CLIP, axis=0) if single_frame else clip


def phantom_accuracy(model: AudioGraftedVLM, samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]],
                     frame_size: int, single_frame: bool = False, question_types: Sequence[str] | None = None,
                     batch_size: int = 64, bf16: bool = False) -> pd.DataFrame:
    """Per question type: n, correct, accuracy and chance of candidate scoring in the text question mode
    (the single-turn prompt) on the phantom renderings of the given clip states."""
    text_collator = dataclasses.replace(collator(model), question_mode="text", frame_size=frame_size)
    items = [(s, state) for state, samples in samples_with_states for s in samples
             if question_types is None or s.question_type in question_types]
    device = model.base_vlm.device
    correct: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        batch = text_collator([(s, clip_frames(state, frame_size, model.cfg.phantom_seed, single_frame), None)
                               for s, state in chunk], for_generation=True)
        with autocast_for(device, bf16):
            scores = score_candidates(model, batch)
        for (s, _), score in zip(chunk, scores):
            correct[s.question_type].append(score.label == s.short_answer)
    return type_accuracy_of_answers(correct, model.cfg)


def type_accuracy_of_answers(correct: dict[str, list[bool]], cfg: Config) -> pd.DataFrame:
    """Per question type (in QUESTION_TYPES order, those with answers): n, correct, accuracy and chance."""
    n_labels = {t: len(v) for t, v in data.label_sets(cfg).items()}
    rows = [{"question_type": t, "n": len(correct[t]), "correct": int(sum(correct[t])),
             "accuracy": float(np.mean(correct[t])), "chance": 1 / n_labels[t]}
            for t in QUESTION_TYPES if correct.get(t)]
    return pd.DataFrame(rows, columns=["question_type", "n", "correct", "accuracy", "chance"]).set_index("question_type")


def row_candidate_accuracy(model: AudioGraftedVLM, builder: RowBuilder,
                           samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]], frame_size: int,
                           heard_split: str | None = None, question_types: Sequence[str] | None = None,
                           clips_per_batch: int = 16, bf16: bool = False, seed: int = 0,
                           mode: str = "audio") -> pd.DataFrame:
    """``phantom_accuracy``'s table by candidate scoring on pretraining rows: every candidate answer of every
    question becomes a row after the question's prompt, written, or heard (``heard_split``: said by a
    seeded random voice of that split of the bank; ``mode`` "audio" or "both", heard and written), and the
    label of the most likely candidate wins. Written, it ranks exactly as ``score_candidates`` does (the
    same log-likelihood of answer + end of turn)."""
    if heard_split is not None and builder.bank is None:
        raise ValueError("heard candidate scoring needs a heard bank")
    utterances = builder.bank.index(heard_split) if heard_split is not None else {}
    rng = np.random.default_rng(seed)
    device = model.base_vlm.device
    correct: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(samples_with_states), clips_per_batch):
            rows_per_clip, clips, asked = [], [], []
            for state, samples in samples_with_states[start: start + clips_per_batch]:
                samples = [s for s in samples if question_types is None or s.question_type in question_types]
                if not samples:
                    continue
                owners, labels, candidates = candidate_token_rows(model, samples)
                rows = []
                heard = {i: builder.bank.draw(utterances, s.question, rng, f"sample {s.uid} ({heard_split} voices)")
                         for i, s in enumerate(samples)} if heard_split is not None else {}
                for owner, ids in zip(owners, candidates):
                    s = samples[owner]
                    if heard_split is None:
                        prompt = builder.prompt(s.question)
                        rows.append(Row(prompt + ids, len(prompt), QUESTION_TYPES.index(s.question_type), s.question))
                    else:
                        rows.append(builder.heard_row(heard[owner], ids, s.question_type, s.question, mode))
                rows_per_clip.append(rows)
                clips.append(_rendered(state, frame_size, model.cfg.phantom_seed))
                asked.append((samples, owners, labels))
            if not rows_per_clip:
                continue
            batch = {k: v.to(device) for k, v in builder.collate(rows_per_clip, np.stack(clips)).items()}
            with autocast_for(device, bf16):
                token_loss, _ = shared_vision_token_losses(model, batch)
            n_rows = batch["answer_type"].shape[0]
            nll = torch.zeros(n_rows, device=device, dtype=torch.float64).index_add_(
                0, batch["label_answer"], token_loss.double()).cpu().tolist()
            row = 0
            for samples, owners, labels in asked:
                totals = [-x for x in nll[row: row + len(owners)]]  # log-likelihoods, as scoring reduces them
                row += len(owners)
                for s, scored in zip(samples, candidate_scores(samples, owners, labels, totals)):
                    correct[s.question_type].append(scored.label == s.short_answer)
    return type_accuracy_of_answers(correct, model.cfg)


def still_answer_accuracy(samples_with_states: Sequence[tuple[ClipState, Sequence[Sample]]],
                          question_types: Sequence[str]) -> pd.DataFrame:
    """Per motion type: the accuracy of answering as if the clip were still (no scope motion, no drift),
    i.e. what a model that reads motion from time scores on a repeated frame. Types asked only of moving
    clips (forward/backward, motion type) have no still answer; chance is their reference."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for state, samples in samples_with_states:
        still = dataclasses.replace(state, moving=False, drift="stable").labels()
        for s in samples:
            if s.question_type in question_types and still[s.question_type] is not None:
                hits[s.question_type].append(still[s.question_type] == s.short_answer)
    rows = [{"question_type": t, "n": len(hits[t]), "accuracy": float(np.mean(hits[t]))} for t in question_types
            if hits.get(t)]
    return pd.DataFrame(rows, columns=["question_type", "n", "accuracy"]).set_index("question_type")


def heldout_clips(settings: PretrainSettings, cfg: Config) -> list[tuple[ClipState, list[Sample]]]:
    return phantom.random_clip_samples(settings.heldout_clips, template="out", seed=settings.heldout_seed, cfg=cfg)


def eval_split_clips(settings: PretrainSettings, cfg: Config) -> list[tuple[ClipState, list[Sample]]]:
    """The published eval split's rows grouped by clip, with the clip state their phantom rendering uses
    (``frames.load_clip`` renders exactly ``clip_state_of``)."""
    rows = data.published_split("out", cfg)["eval"]
    rows = rows[: settings.eval_rows] if settings.eval_rows else rows
    by_clip: dict[tuple, list[Sample]] = defaultdict(list)
    for s in rows:
        by_clip[s.clip_key].append(s)
    return [(phantom.clip_state_of(samples[0], cfg), samples) for samples in by_clip.values()]


def evaluate_all(model: AudioGraftedVLM, heldout, eval_split, settings: PretrainSettings,
                 builder: RowBuilder | None = None) -> dict[str, pd.DataFrame]:
    """The trained question types only (all by default); with heard (and heard-and-written) rows in training,
    also their accuracy, said by the bank's eval voices (never heard in training)."""
    size, batch, types = model.cfg.frame_size, settings.eval_batch_size, settings.question_type_list
    motion = [t for t in MOTION_TYPES if types is None or t in types]
    common = dict(batch_size=batch, bf16=settings.bf16)
    tables = {
        "heldout": phantom_accuracy(model, heldout, size, question_types=types, **common),
        "eval_split": phantom_accuracy(model, eval_split, size, question_types=types, **common),
        "heldout_single_frame": phantom_accuracy(model, heldout, size, single_frame=True, question_types=motion,
                                                 **common),
        "heldout_still_answer": still_answer_accuracy(heldout, motion),
    }
    heard = dict(heard_split="eval", question_types=types, bf16=settings.bf16)
    for mode, share in (("audio", settings.heard_share), ("both", settings.both_share)):
        if builder is not None and share:
            suffix = SET_SUFFIX[mode]
            tables["heldout" + suffix] = row_candidate_accuracy(model, builder, heldout, size, mode=mode, **heard)
            tables["eval_split" + suffix] = row_candidate_accuracy(model, builder, eval_split, size, mode=mode,
                                                                   **heard)
    return tables


# --- outputs -------------------------------------------------------------------------------------

def per_type_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    out = pd.DataFrame(index=[t for t in QUESTION_TYPES if t in tables["heldout"].index or t in tables["eval_split"].index])
    for name, table in tables.items():
        out[f"{name}_n"] = table["n"]
        out[f"{name}_accuracy"] = table["accuracy"]
    out = out.drop(columns=["heldout_still_answer_n"], errors="ignore")  # the single-frame rows, again
    out["chance"] = pd.concat([t["chance"] for t in tables.values() if "chance" in t]).groupby(level=0).first()
    return out


def write_curves(directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_log = pd.read_csv(directory / "train_log.csv")
    eval_log = pd.read_csv(directory / "eval_log.csv")
    sets = [name for name in SCORED_SETS if (eval_log["set"] == name).any()]
    exact = {label: train_log[[c for c in train_log.columns if c.startswith(prefix)]]
             for label, prefix in (("read", "answer_exact/"), ("heard", "heard_answer_exact/"),
                                   ("heard and written", "both_answer_exact/"))}
    exact = {label: columns for label, columns in exact.items() if columns.shape[1]}
    panels = 2 + len(sets)
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels, 4.5), squeeze=False)
    axes = axes[0]
    axes[0].plot(train_log["step"], train_log["train_loss"])
    axes[0].set(xlabel="step", ylabel="answer-token loss", yscale="log", title="training loss")
    # the worst type is what held training back; the mean shows the rest
    for label, columns in exact.items():
        line, = axes[1].plot(train_log["step"], columns.min(axis=1), label=f"{label}: worst type")
        axes[1].plot(train_log["step"], columns.mean(axis=1), ls="--", color=line.get_color(),
                     label=f"{label}: mean over types")
    axes[1].set(xlabel="step", ylabel="teacher-forced exact answers", ylim=(0, 1.02),
                title="training rows, per logging interval")
    axes[1].legend(fontsize=8, loc="lower right")
    for ax, name in zip(axes[2:], sets):
        part = eval_log[eval_log["set"] == name]
        for qtype, rows in part.groupby("question_type"):
            ax.plot(rows["step"], rows["accuracy"], marker=".", label=qtype)
        mode = {"heard": "heard, eval voices", "both": "heard + written, eval voices"}.get(name.rsplit("_", 1)[-1],
                                                                                           "text mode")
        base = name.removesuffix("_heard").removesuffix("_both")
        ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title=f"{base} ({mode})")
    if len(axes) > 3 and axes[3].lines:
        axes[3].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    path = directory / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_log_rows(step: int, tables: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """The rows of ``eval_log.csv`` for one evaluation: one per (set, question type)."""
    return [{"step": step, "set": name, "question_type": qtype, "n": int(row["n"]),
             "accuracy": f"{row['accuracy']:.4f}", "chance": f"{row['chance']:.4f}" if "chance" in row else ""}
            for name, table in tables.items() for qtype, row in table.iterrows()]


def pretrain_command(out: str | Path, device: str, overrides: dict[str, Any]) -> str:
    """The command that repeats a run, as the model card quotes it: the config keys and pretraining settings
    it was given over the ``phantom-pretrain`` preset, each as ``-p key=value``."""
    args = ["--device", device, "--out", str(out)]
    for key, value in overrides.items():
        args += ["-p", format_override(key, value)]
    return "python -m surgvqa pretrain " + shlex.join(args)


def write_model_card(directory: Path, metrics: dict[str, Any], table: pd.DataFrame) -> Path:
    s = {**metrics["config"], **metrics["settings"]}
    lines = [
        "# Tiny Qwen2-VL pretrained on phantom colonoscopy clips (surgvqa stage 0)",
        "",
        f"Training command: `{metrics['command']}`",
        "",
        f"- steps: {metrics['steps']} of {s['max_steps']} ({metrics['stopped_by']}), wall time "
        f"{metrics['wall_minutes']:.1f} min on {metrics['device']}, {metrics['clips_seen']} clips, "
        f"{metrics['answers_seen']} answers",
        f"- data: random phantom clip states only, data seed {s['data_seed']}, held-out seed {s['heldout_seed']}; "
        f"frames {s['frame_size']} px as one video; lesion share {s['lesion_share']}",
        f"- model: {metrics['parameters']:,} parameters ({json.dumps(metrics['model_dims'])}); "
        f"batch {s['batch_size']} clips, AdamW lr {s['lr']}, warmup {s['warmup_steps']} + cosine to "
        f"{s['min_lr_ratio']} x lr",
        "- supervision: one single-turn text-mode row per (clip, question), wording drawn from "
        + ("the training wordings (the paraphrase bank's train wordings and both templates')"
           if metrics["config"].get("train_wordings") == "bank" else "both templates") + "; "
        "each clip's video encoded once and shared by its rows; loss on every answer and its end-of-turn"
        + (f"; question types {s['question_types']}" if s.get("question_types") else ""),
        *([f"- heard rows: with probability {s['heard_share']} a question also gets an audio-only row, said by "
           f"a random train voice of the heard bank `{s['heard_bank']}` ({json.dumps(metrics['heard_bank'])}); "
           f"the projector trains on them at lr {s['projector_lr']}; `*_heard` columns are said by the bank's "
           f"eval voices, never heard in training"] if metrics.get("heard_bank") and s.get("heard_share") else []),
        *([f"- heard-and-written rows: with probability {s['both_share']} a question also gets a row where it is "
           f"heard and written (the `both` prompt), same voices; `*_both` columns"]
          if metrics.get("heard_bank") and s.get("both_share") else []),
        *([f"- projector continued from `{s['projector_from']}`"] if s.get("projector_from") else []),
        f"- step time: {json.dumps(metrics['step_time_ms'])} (ms per step)",
        "",
        "Per-type accuracy by candidate scoring with the single-turn text prompt (`heldout`: random clips of the "
        "held-out seed; `eval_split`: phantom renderings of the published eval split; "
        "`heldout_single_frame`: frame 0 repeated 8 times, motion questions only; a model that reads motion "
        "from time answers it as a still clip, so it should score what `heldout_still_answer`, the accuracy of "
        "answering as if nothing moved, scores, or chance where a question is only asked of moving clips):",
        "",
        markdown_table(table),
        "",
        "Curves: `curves.png`. Logs: `train_log.csv`, `eval_log.csv`. Metrics: `metrics.json`.",
        "",
        "Load with `surgvqa.model.load_checkpoint(DIR)`, or as the tiny VLM of any config with `vlm=DIR/vlm`.",
        "",
    ]
    path = directory / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def folder_megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix != ".png") / 2 ** 20
