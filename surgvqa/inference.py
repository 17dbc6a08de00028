"""Running the graft: the inference entry points every notebook, training-time evaluation and the benchmark
call (``generate``, ``score_candidates``, ``answer_and_score``, ``answer_any_question``), ``predict`` over a
split's samples in a question mode, the ASR pipeline a user would build instead of hearing, the check that
training's logged evaluation is what ``predict`` gives, and ``python -m surgvqa merge`` with its parity check.

Each entry point chooses a path: on CUDA ``surgvqa.fastpath`` (graphed decoding over a static KV cache,
switchable with ``fast_inference``), elsewhere the plain path of ``surgvqa.scoring``, over transformers' own
cache. Both compute the same scores and answers (tests/test_model.py; the benchmark checks the CUDA side).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import audio, data, fastpath, features, scoring, whisper
from .collate import EVAL_DRAWS, prefetched_batches
from .config import Config
from .data import Sample, limited, load_split
from .evaluate import data_answer, score_answer
from .features import EncodedAudio, QADataset
from .model import (AudioGraftedVLM, adapter_disabled, build_model, collator, load_checkpoint, merge_for_export,
                    on_device, save_checkpoint)
from .progress import progress_bar
from .scoring import MAX_NEW_TOKENS, CandidateScores
from .whisper import load_whisper, transcribe

# --- inference -----------------------------------------------------------------------------------------

def adapter_inputs_uncast(model: nn.Module, active: bool):
    """Within it, peft does not cast each adapter's input to the adapter's dtype. Under bf16 autocast the
    fp32 adapter weights are cast per matmul anyway, so peft's cast of every activation to fp32 only adds a
    copy per adapted layer (196 in the 7B model); outside autocast the cast is needed, so it is active only
    under bf16 autocast (training's mixed-precision step, ``bf16_adapters``)."""
    if not active:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def bf16_adapters(model: "AudioGraftedVLM") -> contextlib.AbstractContextManager:
    """Inference of a bf16 LoRA model on CUDA, as training's bf16 mixed-precision step runs it: under bf16
    autocast, adapter inputs left in bf16. Otherwise peft runs every adapter matmul in fp32 on activations
    cast to fp32 (at 7B 83 against 63 ms a row with the adapter off, benchmarks/NOTES.md). Elsewhere (CPU,
    fp32 models, no adapter) it changes nothing."""
    if not (model.cfg.lora and model.cfg.dtype == "bfloat16" and model.base_vlm.device.type == "cuda"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    # no autocast weight cache: the fast path captures CUDA graphs inside, which must not keep its casts
    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
    stack.enter_context(adapter_inputs_uncast(model.vlm, True))
    return stack


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), bf16_adapters(model):
            yield
    finally:
        model.train(was_training)


def _check_generation_batch(batch: dict[str, Any]) -> None:
    if "labels" in batch or not bool(batch["attention_mask"][:, -1].all()):
        raise ValueError("expected a generation batch (collate with for_generation=True: left-padded, "
                         "no answer, no labels)")


def generate(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy free-text answers of a left-padded generation batch, one string per sample."""
    _check_generation_batch(batch)
    batch = on_device(batch, model)
    with _evaluating(model):
        if fast_inference(model):
            return fastpath.answer_and_score(model, batch, max_new_tokens, score=False)[0]
        return scoring.greedy_answers(model, scoring.prefill(model, batch), max_new_tokens)[0]


@dataclass
class HeardAnswer:
    question_type: str  # the question the model understood
    label: str
    confidence: float  # the label's probability among its type's answers
    type_confidence: float  # the type's probability among all types (by mean log-likelihood per token)
    text: str  # the free-text answer
    by: str  # "its answer sentence" (the free text is one of the data's answers) or "likelihood"


# Candidate rows scored at once when every question type's answers are (the demo's heard question). Scored all at once,
# a batch of 16 repeats its prompt cache for every row: notebook 07 on Qwen3-VL-2B peaked at 78.4 GiB of an 80 GB card.
ALL_TYPES_GROUP = 64


def answer_any_question(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int = MAX_NEW_TOKENS
                        ) -> list[HeardAnswer]:
    """For prompts whose question type nobody chose (a question asked out loud in the demo). The free-text
    answer decides when it is word for word one of the data's answer sentences (the model was trained to
    say exactly those); otherwise every answer sentence of every question type is scored and the type
    whose best sentence has the highest mean log-likelihood per token is the question understood (a plain
    sum favours short sentences). The label is that type's likeliest answer."""
    _check_generation_batch(batch)
    batch = on_device(batch, model)
    sentences = {" ".join(text.lower().split()): key for key, text in data.answer_sentences(model.cfg).items()}
    with _evaluating(model):
        texts, pre = scoring.answered_prefill(model, batch, max_new_tokens)
        owners, keys, rows = [], [], []
        for i, s in enumerate(batch["samples"]):
            for qtype in data.QUESTION_TYPES:
                asked = dataclasses.replace(s, question_type=qtype)
                _, labels, type_rows = scoring.candidate_token_rows(model, [asked])
                owners += [i] * len(type_rows)
                keys += [(qtype, label) for label in labels]
                rows += type_rows
        # every answer sentence of every type, for every row of the batch: far more rows than the batch, each with
        # its own copy of the prompt's cache and logits over the vocabulary, so they are scored in groups
        totals = []
        for start in range(0, len(rows), ALL_TYPES_GROUP):
            last = start + ALL_TYPES_GROUP >= len(rows)  # the cache is repeated in place: earlier groups get a copy
            group = pre if last else dataclasses.replace(pre, cache=copy.deepcopy(pre.cache))
            totals += scoring.candidate_totals(model, group, owners[start:start + ALL_TYPES_GROUP],
                                               rows[start:start + ALL_TYPES_GROUP])
    answers = []
    for i in range(len(batch["samples"])):
        mine = [r for r, o in enumerate(owners) if o == i]
        per_token = {}
        for r in mine:
            qtype = keys[r][0]
            per_token[qtype] = max(per_token.get(qtype, -float("inf")), totals[r] / len(rows[r]))
        type_probs = dict(zip(per_token, torch.softmax(torch.tensor(list(per_token.values()), dtype=torch.float64),
                                                       dim=0).tolist()))
        said = sentences.get(" ".join(texts[i].lower().split()))
        qtype = said[0] if said else max(per_token, key=per_token.get)
        ll = {keys[r][1]: totals[r] for r in mine if keys[r][0] == qtype}
        probs = dict(zip(ll, torch.softmax(torch.tensor(list(ll.values()), dtype=torch.float64), dim=0).tolist()))
        label = said[1] if said else max(ll, key=ll.get)
        answers.append(HeardAnswer(qtype, label, probs[label], type_probs[qtype], texts[i],
                                   "its answer sentence" if said else "likelihood"))
    return answers


@dataclass
class QuestionConfidenceFloor:
    """How sure a model must be of the question it understood before the demo answers it, measured on heard eval
    questions: ``floor`` is the type confidence that ``share`` of the correctly understood ones reach."""
    floor: float
    share: float
    n: int  # eval questions heard
    understood: float  # the share of them whose question type was understood
    refused_below: float  # the share of all of them the floor would leave unanswered


def question_confidence_floor(model: AudioGraftedVLM, samples: Sequence[Sample], manifest: pd.DataFrame, cfg,
                              share: float = 0.95, batch_size: int = 16) -> QuestionConfidenceFloor:
    """The demo's floor on how sure it must be of the question (``answer_any_question``'s type confidence), from
    ``samples`` heard as ``manifest`` says (the eval voices, never the test ones)."""
    paths = dict(zip(manifest.uid, manifest.path))
    rows = [s for s in samples if s.uid in paths]
    if not rows:
        raise ValueError("no heard questions to measure the floor on: the manifest holds none of the samples")
    collate = dataclasses.replace(collator(model), question_mode="audio", frame_size=cfg.frame_size)
    dataset = QADataset(rows, cfg.replace(question_mode="audio"), paths, backbone=model.backbone)
    heard = []
    with torch.inference_mode():
        for batch in prefetched_batches(dataset, batch_size, functools.partial(collate, for_generation=True)):
            heard += answer_any_question(model, batch)
    right = np.array([h.question_type == s.question_type for h, s in zip(heard, rows)])
    confidence = np.array([h.type_confidence for h in heard])
    floor = float(np.quantile(confidence[right], 1 - share)) if right.any() else 1.0
    return QuestionConfidenceFloor(floor, share, len(rows), float(right.mean()), float((confidence < floor).mean()))


def fast_inference(model: AudioGraftedVLM) -> bool:
    """Whether inference runs on surgvqa.fastpath: on CUDA unless the config's fast_inference is off."""
    return model.cfg.fast_inference and model.base_vlm.device.type == "cuda"


def score_candidates(model: AudioGraftedVLM, batch: dict[str, Any]) -> list[CandidateScores]:
    """Rank the label set of each sample's question type by the likelihood of its answer SENTENCE.

    The candidate text is the answer sentence the model is trained to produce (data.answer_sentences),
    followed by the end-of-turn token, so a candidate is the whole answer, not a prefix of it. The prompt
    of each sample runs once; its key/value cache is then repeated for that sample's candidates and all
    candidates of the batch are scored in one more forward.
    """
    _check_generation_batch(batch)
    batch = on_device(batch, model)
    with _evaluating(model):
        if fast_inference(model):
            return fastpath.answer_and_score(model, batch, 0)[1]
        return scoring.scores(model, scoring.prefill(model, batch), batch["samples"])


def answer_and_score(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int = MAX_NEW_TOKENS
                     ) -> tuple[list[str], list[CandidateScores]]:
    """``generate``'s greedy answers and ``score_candidates``' scores from ONE run of the prompt: the answer
    is decoded on the prompt's cache, which is then cut back to the prompt and scores the candidates."""
    _check_generation_batch(batch)
    batch = on_device(batch, model)
    with _evaluating(model):
        if fast_inference(model):
            return fastpath.answer_and_score(model, batch, max_new_tokens)
        return scoring.answers_and_scores(model, batch, max_new_tokens)


def encode_question_audio(model, samples: Sequence[Sample], audio_paths: dict[str, str], cfg: Config,
                          progress: bool = True) -> EncodedAudio | None:
    """Run the frozen Whisper encoder once over every question file not yet in the cache (``None`` when the
    run hears no audio, ``cache_audio_features`` is off or the model hears through its own encoder); training
    and every heard pass of ``predict`` then read the cached outputs (keyed by the file's bytes and the encoder's
    weights, so 05's heard, both and before-fine-tuning passes encode each question once)."""
    if cfg.question_mode == "text" or not cfg.cache_audio_features or model.backbone.hears_natively:
        return None
    folder = features.encoded_audio_dir(whisper.encoder_fingerprint(model.whisper), cfg.audio_pool, cfg)
    collate, by_uid = collator(model), {s.uid: s for s in samples}
    device = next(model.whisper.parameters()).device
    paths = features.cache_encoded_audio({s.uid: audio_paths[s.uid] for s in samples},
                                      lambda uid, wave: collate.log_mel(by_uid[uid], wave),
                                      lambda mel: model.whisper_states(mel.to(device)), folder, cfg,
                                      progress=progress)
    return EncodedAudio(paths, model.whisper.config.d_model)


# --- running a model --------------------------------------------------------------------------------

def predict(model, samples: Sequence[Sample], cfg, mode: str, audio_manifest: pd.DataFrame | None = None,
            questions: dict[str, str] | None = None, batch_size: int = 16, generate_answers: bool = True,
            progress: bool = True) -> list[dict]:
    """Answer ``samples`` under a question mode; one record per sample in the predictions schema.

    ``mode`` is audio, text or both (the prompt the model gets), whatever the mode it was trained in.
    ``questions`` (uid -> text) replaces the written question, e.g. by an ASR transcript. The free-text
    answer (greedy decoding) is what the strict scorer reads; candidate probabilities come from scoring the
    candidates on the same run of the prompt (``answer_and_score``). ``latency_ms`` is the model time of the
    batch divided by its size.
    """

    if mode not in ("audio", "text", "both"):
        raise ValueError(f"mode {mode!r}: must be audio, text or both")
    rows = list(samples)
    if questions is not None:
        missing = [s.uid for s in rows if s.uid not in questions]
        if missing:
            raise KeyError(f"no replacement question for {len(missing)} sample(s), e.g. {missing[:3]}")
        rows = [dataclasses.replace(s, question=questions[s.uid]) for s in rows]
    audio_info = {}
    if audio_manifest is not None:
        audio_info = audio_manifest.set_index("uid")[["path", "voice", "duration_s"]].to_dict("index")
    mode_cfg = cfg.replace(question_mode=mode)
    collate = dataclasses.replace(collator(model), question_mode=mode, frame_size=cfg.frame_size)
    # Batches of questions of similar length: their prompts pad less, and where Whisper runs inline (no encoder
    # cache, or a model that hears natively) it encodes a batch in one call per distinct length. Records keep the
    # given order.
    if mode != "text" and audio_info:
        order = sorted(range(len(rows)), key=lambda i: (audio_info.get(rows[i].uid, {}).get("duration_s") or 0, i))
    else:
        order = list(range(len(rows)))
    audio_paths = {u: v["path"] for u, v in audio_info.items()} if mode != "text" else None
    encoded = encode_question_audio(model, rows, audio_paths, mode_cfg, progress) if audio_paths else None
    dataset = QADataset([rows[i] for i in order], mode_cfg, audio_paths, encoded, backbone=model.backbone)
    batches = prefetched_batches(dataset, batch_size, functools.partial(collate, for_generation=True), cfg.num_workers)
    records = []
    with torch.inference_mode():
        for batch in progress_bar(batches, desc=f"predict ({mode})", disable=not progress, unit="batch",
                          total=math.ceil(len(dataset) / batch_size)):
            started = time.perf_counter()
            if generate_answers:
                texts, scored = answer_and_score(model, batch, cfg.max_answer_tokens)
            else:
                scored = score_candidates(model, batch)
                texts = [None] * len(scored)
            per_sample_ms = 1000 * (time.perf_counter() - started) / len(scored)
            for s, sc, text in zip(batch["samples"], scored, texts):
                info = audio_info.get(s.uid, {})
                records.append({
                    "id": s.id, "uid": s.uid, "question_type": s.question_type, "short_answer": s.short_answer,
                    # without generation the answer is the sentence of the most likely candidate
                    "prediction": text if text is not None else data_answer(s.question_type, sc.label),
                    "probabilities": sc.probabilities, "candidate_label": sc.label,
                    "latency_ms": per_sample_ms, "mode": mode, "voice": info.get("voice"),
                    "audio_duration_s": info.get("duration_s"), "template": cfg.template,
                })
    given_order = [0] * len(records)
    for position, i in enumerate(order):
        given_order[i] = records[position]
    return given_order


@dataclass
class Pipeline:
    """What a user would build instead of hearing, run on the same audio: Whisper transcribes each question
    (``transcripts``), and ``closest`` replaces each transcript by its closest known question
    (``data.closest_questions``); ``intent_accuracy``: how often that question has the asked type."""
    transcripts: dict[str, str]
    closest: dict[str, str]
    intent_accuracy: float
    transcribe_ms: float  # per question
    match_ms: float


def run_pipeline(samples: Sequence[Sample], manifest: pd.DataFrame, cfg, asr_model, processor,
                 batch_size: int = 16) -> Pipeline:
    """Transcribe the questions of ``manifest`` (one row per sample, by uid) and match each transcript."""
    paths = dict(zip(manifest.uid, manifest.path))
    waves = [audio.load_question_audio(s.uid, paths[s.uid], cfg) for s in samples]
    started = time.perf_counter()
    said = transcribe(waves, asr_model, processor, batch_size=batch_size)
    transcribe_ms = 1000 * (time.perf_counter() - started) / max(1, len(samples))
    started = time.perf_counter()
    matched = data.closest_questions(said, cfg)
    match_ms = 1000 * (time.perf_counter() - started) / max(1, len(samples))
    return Pipeline(transcripts={s.uid: t for s, t in zip(samples, said)},
                    closest={s.uid: wording for s, (_, wording) in zip(samples, matched)},
                    intent_accuracy=sum(t == s.question_type for s, (t, _) in zip(samples, matched)) / max(1, len(samples)),
                    transcribe_ms=transcribe_ms, match_ms=match_ms)


def predict_read(model, samples: Sequence[Sample], cfg, questions: dict[str, str], transcripts: dict[str, str],
                 batch_size: int = 16, progress: bool = True) -> list[dict]:
    """``predict`` in the text mode with ``questions`` read instead of the samples' own, each record also holding
    the ASR transcript it came from (``asr_transcript``) and what was read (``question_read``)."""
    records = predict(model, samples, cfg, "text", questions=questions, batch_size=batch_size, progress=progress)
    for r in records:
        r["asr_transcript"], r["question_read"] = transcripts[r["uid"]], questions[r["uid"]]
    return records


BASELINE_MODES = ("audio", "text", "both", "asr", "asr-intent")


@dataclass
class Baselines:
    """Notebook 05's model baselines over the same rows: each one's prediction records and model time per row
    (transcription and matching included for the pipelines), by name: a question mode, ``asr`` (the transcript
    read), ``asr-intent`` (the closest known question read) and ``before`` (the model before fine-tuning)."""
    records: dict[str, list[dict]]
    ms_per_row: dict[str, float]
    pipeline: Pipeline | None  # the transcription both ASR baselines share
    before_mode: str | None  # how the model before fine-tuning was asked: audio or text

    @staticmethod
    def file_name(name: str) -> str:
        return "test-audio-before-fine-tuning.jsonl" if name == "before" else f"test-{name}.jsonl"


def before_fine_tuning_mode(model) -> str:
    """How the model before fine-tuning is asked: heard when training started from a projector pretrained on
    heard questions (the shipped tiny model), else read, since a base model has never heard a question."""
    return "audio" if model.cfg.pretrained_projector else "text"


def run_baselines(model, rows: Sequence[Sample], manifest: pd.DataFrame, cfg, modes: Sequence[str] = BASELINE_MODES,
                  batch_size: int = 16, before_fine_tuning: bool = True) -> Baselines:
    """Every model baseline of ``modes`` on ``rows`` (the ASR baselines share one transcription), then, with
    ``before_fine_tuning``, the model training started from: a LoRA run's base model with the adapter switched
    off (no second copy in memory) when it reads, else a model built from the checkpoint's own config."""
    unknown = [m for m in modes if m not in BASELINE_MODES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {BASELINE_MODES}")
    records, ms_per_row, pipeline = {}, {}, None
    for mode in modes:
        extra_ms = 0.0
        if mode in ("asr", "asr-intent"):
            if pipeline is None:
                asr_model, processor = load_whisper(cfg.whisper, cfg)
                pipeline = run_pipeline(rows, manifest, cfg, asr_model, processor, batch_size)
            questions = pipeline.transcripts if mode == "asr" else pipeline.closest
            extra_ms = pipeline.transcribe_ms + (pipeline.match_ms if mode == "asr-intent" else 0.0)
            records[mode] = predict_read(model, rows, cfg, questions, pipeline.transcripts, batch_size=batch_size)
        else:
            records[mode] = predict(model, rows, cfg, mode, manifest, batch_size=batch_size)
        ms_per_row[mode] = float(np.mean([r["latency_ms"] for r in records[mode]])) + extra_ms
    before_mode = before_fine_tuning_mode(model) if before_fine_tuning else None
    if before_mode == "text" and model.cfg.lora:
        with adapter_disabled(model):
            records["before"] = predict(model, rows, cfg, before_mode, manifest, batch_size=batch_size)
    elif before_mode:
        records["before"] = predict(build_model(model.cfg), rows, cfg, before_mode, manifest, batch_size=batch_size)
    if before_mode:
        ms_per_row["before"] = float(np.mean([r["latency_ms"] for r in records["before"]]))
    return Baselines(records, ms_per_row, pipeline, before_mode)


def training_eval_parity(checkpoint: str | Path, model, batch_size: int | None = None) -> dict:
    """The eval accuracy training logged for a run's ``best/`` beside ``predict``'s on the same rows and
    checkpoint (training scores cached encoder outputs in its own loop; ``predict`` runs Whisper on the audio,
    as notebook 05 does). In the mixed mode each row is asked the way training's evaluation drew for it."""
    checkpoint = Path(checkpoint)
    summary_file = checkpoint.parent / "summary.json"
    if checkpoint.name != "best" or not summary_file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training run's best/ (no {summary_file})")
    summary = json.loads(summary_file.read_text())
    logged = [h for h in summary["history"] if h["step"] == summary["best_step"]]
    if not logged:
        raise ValueError(f"{summary_file}: no evaluation logged at the best step {summary['best_step']}")
    cfg = model.cfg
    rows = data.limited(data.load_split(cfg)["eval"], cfg.eval_limit, cfg.seed)
    manifest = audio.synthesize_split(rows, "eval", cfg, progress=False)
    draws = collator(model)
    draws.reseed(EVAL_DRAWS)
    by_mode: dict[str, list[Sample]] = {}
    for s in rows:
        by_mode.setdefault(draws.item_mode(s), []).append(s)
    records = [r for mode, asked in by_mode.items()
               for r in predict(model, asked, cfg, mode, manifest if mode != "text" else None,
                                batch_size=batch_size or cfg.batch_size, generate_answers=False, progress=False)]
    predicted = sum(r["candidate_label"] == r["short_answer"] for r in records) / len(records)
    return {"best_step": summary["best_step"], "n": len(records), "modes": {m: len(v) for m, v in by_mode.items()},
            "logged_accuracy": float(logged[0]["eval_accuracy"]), "predicted_accuracy": predicted,
            # training's accuracy went through a float32 all-reduce
            "equal": abs(predicted - float(logged[0]["eval_accuracy"])) < 1e-6}


MERGE_AGREEMENT = 0.99  # the least answer agreement at which a merged export counts as the adapter's model


def merge_parity(adapter_records: Sequence[dict], merged_records: Sequence[dict]) -> dict:
    """How alike two predictions of the same rows are: free-text answers read to the same label, the same
    most likely candidate, and the largest difference of a candidate's log-probability (normalised over its
    question type's candidates)."""
    if [r["uid"] for r in adapter_records] != [r["uid"] for r in merged_records]:
        raise ValueError("the two predictions are not of the same rows in the same order")
    answers = [score_answer(a["prediction"], a["question_type"]) == score_answer(b["prediction"], b["question_type"])
               for a, b in zip(adapter_records, merged_records)]
    labels = [a["candidate_label"] == b["candidate_label"] for a, b in zip(adapter_records, merged_records)]
    gap = max(abs(math.log(max(a["probabilities"][k], 1e-300)) - math.log(max(b["probabilities"][k], 1e-300)))
              for a, b in zip(adapter_records, merged_records) for k in a["probabilities"])
    return {"n": len(answers), "answer_agreement": float(np.mean(answers)),
            "candidate_agreement": float(np.mean(labels)), "max_abs_logprob_diff": gap}


def merge_main(argv: list[str]) -> int:
    """``python -m surgvqa merge CHECKPOINT --out DIR``: the adapter folded into full-precision base weights
    (a QLoRA run's base is reloaded unquantised), written as a checkpoint, and checked against the adapter
    on eval rows; exit 1 when fewer than 99 % of answers agree."""
    parser = argparse.ArgumentParser(prog="python -m surgvqa merge", description=merge_main.__doc__.split(":")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder with a LoRA adapter (best/ of a run)")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint and merge_parity.json")
    parser.add_argument("--rows", type=int, default=200, help="eval rows to compare on (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty: choose a new folder")
    adapter = load_checkpoint(args.checkpoint)
    cfg = adapter.cfg
    # The adapter changes the language model only; written questions reach every adapted layer.
    rows = limited(load_split(cfg)["eval"], args.rows, cfg.seed)
    before = predict(adapter, rows, cfg, "text", batch_size=args.batch_size)
    del adapter
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    merged = merge_for_export(load_checkpoint(args.checkpoint, load_in_4bit=False))
    after = predict(merged, rows, cfg, "text", batch_size=args.batch_size)
    save_checkpoint(merged, out)
    parity = {"checkpoint": str(args.checkpoint), "quantized_adapter": cfg.load_in_4bit,
              **merge_parity(before, after)}
    (out / "merge_parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    print(json.dumps(parity, indent=2))
    if parity["answer_agreement"] < MERGE_AGREEMENT:
        print(f"[merge] only {parity['answer_agreement']:.1%} of answers agree (at least {MERGE_AGREEMENT:.0%} "
              f"expected): the merged model is not the adapter's model", file=sys.stderr)
        return 1
    return 0
