"""The project's graft at real Qwen2-VL-7B + Whisper-large-v3-turbo shapes against the original study's
stock layout, in one run on one GPU: query latency, evaluation throughput, LoRA training, one lever at a time.

    python benchmarks/gpu.py --out DIR            # full run, one H200, ~6-8 minutes
    python benchmarks/gpu.py --quick --out DIR    # fewer batch sizes and repeats
    python benchmarks/gpu.py --smoke              # tiny shapes on the CPU: the same code paths, for tests

Weights are random at the real shapes (docs/design.md, performance anchors; nothing is downloaded): timings depend on the
shapes, not on the values. Prompts come from the project's Collator (chat template, placeholder expansion)
with the task tokenizer, so the token counts are the study's: 1 video of 8 frames at 392 px + a 4 s question
(50 audio tokens at the 7B preset's pool 4; 100 at --audio-pool 2) = ~865 tokens, against the original
8 images + 1500 audio tokens = ~3113.

Levers, each measured as its own row so the table shows its effect:
  audio      the question encoded at its real length and pooled, instead of Whisper's 30 s window
  video      the 8 frames as one video (temporal patches: half the vision tokens) instead of 8 images
  clips      vision attention as one batched call over equal-size clips (a registered attention function)
             instead of one call per image/frame with a host sync per layer
  static     decoding over a preallocated KV cache, each step captured once as a CUDA graph and replayed
  scoring    candidate answers scored over the shared prompt prefix instead of free generation
  logits     logits only at the positions that are scored or trained, not over the whole sequence
  batch      evaluation at several batch sizes
  kernels    the language model's attention through eager / SDPA / flash-attention (when installed)
  graphs     host reads (M-RoPE and vision positions, segment bounds) done once ahead; Whisper + projector,
             the vision tower and the candidates' continuation replayed as CUDA graphs
  autocast   training under bf16 autocast (as accelerate runs it) and peft's fp32 input casts switched off

The fast paths are the project's own (surgvqa.fastpath) and, for the graphed prompt, this folder's
graphed.py; this script builds the model, times them against stock transformers and checks they compute the
same answers.

Results: a table on stdout and JSON under --out (rewritten after every section, so a cut run keeps what
it measured).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import transformers
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a plain checkout too, not only after `pip install -e .`
sys.path.insert(0, str(REPO / "benchmarks"))  # the graphed paths only this benchmark times

from graphed import FastQuery, GraphedScorer, model_inputs, set_text_attention  # noqa: E402
from surgvqa import data, scoring  # noqa: E402
from surgvqa.backbones import TINY  # noqa: E402
from surgvqa.collate import SAMPLE_RATE, Collator  # noqa: E402
from surgvqa.config import get_config  # noqa: E402
from surgvqa.fastpath import CandidateScorer  # noqa: E402
from surgvqa.fastpath import answer_and_score as fastpath_answer_and_score  # noqa: E402
from surgvqa.inference import MAX_NEW_TOKENS, adapter_inputs_uncast, answer_and_score, score_candidates  # noqa: E402
from surgvqa.model import (PACKED_ATTENTION, AudioGraftedVLM, _apply_training_setup,  # noqa: E402
                           build_tiny_tokenizer, parameter_groups, register_packed_attention, set_packed_attention)

# --- shapes ----------------------------------------------------------------------------------------------

# docs/design.md, performance anchors. The real Qwen tokenizer is not available offline: the task tokenizer (same special
# tokens and chat template, ~1k ids) builds the prompts; the model keeps Qwen's 152,064-row vocabulary, so
# embedding and lm_head cost what they cost in the real model.
QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                            "mrope_section": [16, 24, 24]})
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
WHISPER_LARGE_V3_TURBO_ENCODER = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                      encoder_ffn_dim=5120, num_mel_bins=128, decoder_layers=4,
                                      decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866,
                                      max_source_positions=1500)
WHISPER_TINY_ENCODER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                            num_mel_bins=80, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                            vocab_size=51865, max_source_positions=1500)

QUESTION_S = 4.0  # the spoken question
ANSWER_TOKENS = 10  # tokens decoded per query
STOCK_AUDIO_WINDOW_S = 30.0  # the original study padded every question to Whisper's window: 1500 tokens

TARGETS = {"query_ms": 80.0, "eval_samples_per_s": 25.0, "train_ms_per_sample": 120.0}
STOCK_ANCHORS = {"query_ms": 431.0, "train_ms_per_sample": 768.0}  # docs/design.md, performance anchors (transformers 5.17)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- timing ----------------------------------------------------------------------------------------------

class Timer:
    """Median milliseconds of a callable: CUDA events on the GPU, the host clock (after the work) on the CPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], Any]) -> dict[str, float]:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                "repeats": len(times)}


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_ceilings(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and matrix-product rate on random data: the floors' divisors."""
    timer = Timer(device, warmup=2, repeats=5)
    n = 1 << (20 if smoke else 29)  # 1 GiB of bf16 on the GPU: far past the 60 MB L2
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))["median_ms"]
    side = 256 if smoke else 8192
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    mm_ms = timer(lambda: a @ b)["median_ms"]
    return {"copy_bandwidth_gb_s": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
            "matmul_tflop_s": 2 * side ** 3 / mm_ms / 1e9}


# --- the model at real shapes ----------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_graft(smoke: bool, device: torch.device, dtype: torch.dtype, audio_pool: int) -> AudioGraftedVLM:
    """The project's graft, random weights, built in place on the device (no host-side init of 8 B params)."""
    cfg = get_config("smoke" if smoke else "qwen2vl-7b", audio_pool=audio_pool, lora=True,
                     dtype="float32" if dtype == torch.float32 else "bfloat16")
    tokenizer = build_tiny_tokenizer(cfg)
    if smoke:
        vlm_config, whisper_config = TINY.tiny_config(tokenizer), WhisperConfig(**WHISPER_TINY_ENCODER)
    else:
        ids = tokenizer.get_vocab()
        text = dict(QWEN2_VL_7B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"])
        vlm_config = TINY.config(text, QWEN2_VL_7B_VISION, ids=ids, tie_word_embeddings=False)
        whisper_config = WhisperConfig(**WHISPER_LARGE_V3_TURBO_ENCODER)
    vlm_config._attn_implementation = "sdpa"
    feature_extractor = WhisperFeatureExtractor(feature_size=whisper_config.num_mel_bins)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        vlm = TINY.model_class(vlm_config)
        whisper = WhisperEncoder(whisper_config)
        model = AudioGraftedVLM(vlm, whisper, tokenizer, feature_extractor, cfg, whisper_from_cfg=False)
    return model.eval()


def with_adapter(model: AudioGraftedVLM) -> None:
    """The project's LoRA (every LM linear layer, r=64) on the model, once."""
    if not hasattr(model.vlm, "peft_config"):
        model.vlm = _apply_training_setup(model.vlm, model.cfg)


class Layout:
    """How a query is laid out: frames as video or images, the audio window and pooling."""

    def __init__(self, name: str, frames_as: str, audio_pool: int, audio_window_s: float | None):
        self.name, self.frames_as, self.audio_pool, self.audio_window_s = name, frames_as, audio_pool, audio_window_s

    def collator(self, model: AudioGraftedVLM, frame_size: int) -> Collator:
        vision = model.base_vlm.config.vision_config
        return Collator(model.tokenizer, model.feature_extractor, question_mode="audio", frames_as=self.frames_as,
                        frame_size=frame_size, audio_pool=self.audio_pool, max_audio_s=STOCK_AUDIO_WINDOW_S,
                        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                        merge_size=vision.spatial_merge_size)

    @contextlib.contextmanager
    def applied(self, model: AudioGraftedVLM):
        """The projector pools as this layout says (pooling has no weights: one projector serves all)."""
        pool = model.projector.pool
        model.projector.pool = self.audio_pool
        try:
            yield
        finally:
            model.projector.pool = pool


class Workload:
    """Collated batches of real annotation rows with random frames and question audio, on the device."""

    def __init__(self, model: AudioGraftedVLM, frame_size: int, device: torch.device):
        self.model, self.frame_size, self.device = model, frame_size, device
        samples = data.load_template("out", model.cfg)
        by_type: dict[str, data.Sample] = {}
        for s in samples:
            by_type.setdefault(s.question_type, s)
        self.samples = list(by_type.values())  # one row per question type, cycled: every label set is scored
        self.rng = np.random.default_rng(0)
        self.collate_ms_per_sample: dict[str, float] = {}

    def items(self, n: int, audio_window_s: float | None, lengths_s: Sequence[float] | None = None) -> list[tuple]:
        out = []
        for i in range(n):
            frames = self.rng.integers(0, 256, (data.FRAMES_PER_CLIP, self.frame_size, self.frame_size, 3),
                                       dtype=np.uint8)
            seconds = QUESTION_S if lengths_s is None else lengths_s[i]
            wave = (0.1 * self.rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
            if audio_window_s:
                wave = np.pad(wave, (0, int(audio_window_s * SAMPLE_RATE) - len(wave)))
            out.append((self.samples[i % len(self.samples)], frames, wave))
        return out

    def batch(self, layout: Layout, n: int, for_generation: bool, lengths_s: Sequence[float] | None = None
              ) -> dict[str, Any]:
        collate = layout.collator(self.model, self.frame_size)
        items = self.items(n, layout.audio_window_s, lengths_s)
        t0 = time.perf_counter()
        batch = collate(items, for_generation=for_generation)
        self.collate_ms_per_sample[layout.name] = (time.perf_counter() - t0) * 1e3 / n
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}


# --- the measured operations -----------------------------------------------------------------------------

@torch.no_grad()
def hf_generate(model: AudioGraftedVLM, batch: dict[str, Any], n_tokens: int) -> torch.Tensor:
    """surgvqa.inference.generate's call into transformers' generate, held to exactly n_tokens (random weights
    may otherwise emit end-of-turn early and time a shorter answer)."""
    out = model.base_vlm.generate(**model_inputs(model, batch), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                  do_sample=False, eos_token_id=model.im_end_id,
                                  pad_token_id=model.tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]


def train_step_fn(model: AudioGraftedVLM, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                  logits_everywhere: bool, autocast: bool = False, uncast_adapters: bool = False
                  ) -> Callable[[], None]:
    """One LoRA step. ``logits_everywhere``: the stock path (transformers' own loss over logits at every
    position, fp32-upcast 152k columns per token); otherwise the project's forward (logits at labels only).
    ``autocast``: under bf16 autocast, as accelerate's and Trainer's bf16 mixed precision run it (peft keeps
    the adapters in fp32; without autocast their matmuls run in fp32). ``uncast_adapters``: peft's own cast
    of every adapter input to the adapter's fp32 switched off (surgvqa.inference.adapter_inputs_uncast)."""
    base = model.base_vlm
    inputs = {k: v for k, v in batch.items() if k != "samples"}
    device_type = next(base.parameters()).device.type

    def step() -> None:
        precision = (torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext())
        with precision, adapter_inputs_uncast(model, uncast_adapters):
            if logits_everywhere:
                loss = base(**model_inputs(model, batch), labels=batch["labels"]).loss
            else:
                loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# --- the run ---------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.frame_size = 28 if args.smoke else 392
        warmup, repeats = (0, 1) if args.smoke else (2, 3 if args.quick else 5)
        # The smoke run keeps the stock path (a padded window, pool 1) at a window CPU tests can afford.
        stock_window_s = 8.0 if args.smoke else STOCK_AUDIO_WINDOW_S
        self.timer = Timer(self.device, warmup, repeats)
        if args.smoke:
            self.eval_batches, self.train_batches = [2], [2]
        elif args.quick:
            self.eval_batches, self.train_batches = [1, 16], [4]
        else:
            self.eval_batches, self.train_batches = [1, 8, 32, 64], [1, 4, 8]
        self.layouts = {
            "stock": Layout(f"stock: 8 images + audio padded to {stock_window_s:.0f} s",
                            "images", 1, stock_window_s),
            "images": Layout("8 images + trimmed, pooled audio", "images", args.audio_pool, None),
            "video": Layout("1 video + trimmed, pooled audio", "video", args.audio_pool, None),
        }
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / ("gpu-smoke.json" if args.smoke else "gpu.json")
        self.results: dict[str, Any] = {"meta": {}, "checks": {}, "query": [], "eval": [], "train": [],
                                        "summary": {}, "errors": []}

    def save(self) -> None:
        self.json_path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def guarded(self, section: str, label: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure (an OOM, an API that differs in this transformers) is recorded
        and the run goes on to the next row."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported in the JSON and the table
            message = f"{section} / {label}: {type(e).__name__}: {str(e)[:300]}"
            log(f"FAILED {message}")
            self.results["errors"].append(message)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def row(self, section: str, **values: Any) -> None:
        self.results[section].append(values)
        log(f"{section}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in values.items()))
        self.save()

    # --- sections ---

    def meta(self) -> None:
        r = self.results["meta"]
        r.update(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                 smoke=self.smoke, quick=self.args.quick, dtype=str(self.dtype), audio_pool=self.args.audio_pool,
                 frame_size=self.frame_size, answer_tokens=ANSWER_TOKENS, question_s=QUESTION_S,
                 flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
                 targets=TARGETS, stock_anchors_design_md=STOCK_ANCHORS)
        if self.device.type == "cuda":
            r["device"] = torch.cuda.get_device_name(self.device)
        r.update(measure_ceilings(self.device, self.dtype, self.smoke))
        self.save()

    def build(self) -> None:
        t0 = time.perf_counter()
        self.model = build_graft(self.smoke, self.device, self.dtype, self.args.audio_pool)
        self.clip_attention = register_packed_attention()
        # the stock path (one attention call a frame) is each lever's baseline here; the project's models run packed
        set_packed_attention(self.model.base_vlm, "sdpa")
        self.workload = Workload(self.model, self.frame_size, self.device)
        base = self.model.base_vlm
        lm_params = sum(p.numel() for p in base.model.language_model.parameters()) + base.lm_head.weight.numel()
        r = self.results["meta"]
        r.update(build_s=time.perf_counter() - t0, lm_parameters=lm_params,
                 vision_parameters=sum(p.numel() for p in base.model.visual.parameters()),
                 whisper_parameters=sum(p.numel() for p in self.model.whisper.parameters()))
        # Floors: decoding reads every language-model weight once per token; prefill is 2 FLOPs per weight
        # per token at the measured matrix rate.
        weight_bytes = lm_params * torch.finfo(self.dtype).bits // 8
        r["decode_floor_ms_per_token"] = weight_bytes / (r["copy_bandwidth_gb_s"] * 1e6)
        r["prefill_floor_ms_per_1k_tokens"] = 2 * lm_params * 1000 / (r["matmul_tflop_s"] * 1e9)
        log(f"built in {r['build_s']:.1f} s: LM {lm_params / 1e9:.2f} B, vision {r['vision_parameters'] / 1e9:.2f} B, "
            f"whisper {r['whisper_parameters'] / 1e9:.2f} B parameters")
        self.save()

    def checks(self) -> None:
        """The fast paths compute the project's function: same greedy tokens as transformers' generate, same
        candidate log-likelihoods as surgvqa.inference.score_candidates (within the dtype's rounding)."""
        layout = self.layouts["video"]
        batch = self.workload.batch(layout, 2, for_generation=True)
        with layout.applied(self.model):
            reference = hf_generate(self.model, batch, ANSWER_TOKENS)
            fast = FastQuery(self.model, batch, ANSWER_TOKENS, use_graph=self.device.type == "cuda")()
            # the reference never ends (min_new_tokens keeps end-of-turn out): compare up to where fast ends
            before_end = (fast == self.model.im_end_id).int().cumsum(dim=1) == 0
            self.results["checks"]["static_decode_token_agreement"] = float(
                (reference == fast)[before_end].float().mean())
            stock_logp = scoring.prefill(self.model, batch).first
            set_packed_attention(self.model.base_vlm, PACKED_ATTENTION)
            try:
                clip_logp = scoring.prefill(self.model, batch).first
            finally:
                set_packed_attention(self.model.base_vlm, "sdpa")
            self.results["checks"]["clip_attention_logprob_rel_diff"] = float(
                (clip_logp - stock_logp).norm() / stock_logp.norm())
            scorer = CandidateScorer(self.model, batch)
            scorer()
            set_packed_attention(self.model.base_vlm, PACKED_ATTENTION)
            try:
                graphed = self.guarded("checks", "GraphedScorer", lambda: GraphedScorer(
                    self.model, batch, use_graph=self.device.type == "cuda"))
                if graphed is not None and self.guarded("checks", "GraphedScorer run", graphed) is not None:
                    self.results["checks"]["graphed_scoring_max_abs_diff"] = float(
                        (graphed.scorer.totals - scorer.totals).abs().max())
            finally:
                set_packed_attention(self.model.base_vlm, "sdpa")
            self.guarded("checks", "inference path", lambda: self.check_inference_path(batch))
            project = self.guarded("checks", "surgvqa.score_candidates", lambda: score_candidates(self.model, batch))
            if project is not None:
                expected = torch.tensor([ll for c in project for ll in c.log_likelihoods.values()])
                got = scorer.totals.cpu().double()
                self.results["checks"]["scoring_max_abs_diff"] = float((got - expected).abs().max())
                self.results["checks"]["scoring_reference_scale"] = float(expected.abs().max())
        log(f"checks: {self.results['checks']}")
        self.save()

    def check_inference_path(self, batch: dict[str, Any]) -> None:
        """The path notebooks 05 and 07 and training-time evaluation take (surgvqa.inference.answer_and_score,
        on CUDA the fast path with graphs) answers and scores as the plain path."""
        m, cuda = self.model, self.device.type == "cuda"
        plain_cfg, m.cfg = m.cfg, m.cfg.replace(fast_inference=False)
        try:
            plain_answers, plain_scores = answer_and_score(m, batch, ANSWER_TOKENS)
        finally:
            m.cfg = plain_cfg
        with torch.no_grad():
            fast_answers, fast_scores = fastpath_answer_and_score(m, batch, ANSWER_TOKENS, use_graph=cuda)
        plain = torch.tensor([v for c in plain_scores for v in c.log_likelihoods.values()])
        fast = torch.tensor([v for c in fast_scores for v in c.log_likelihoods.values()])
        self.results["checks"].update(
            inference_path_answer_agreement=float(np.mean([a == b for a, b in zip(plain_answers, fast_answers)])),
            inference_path_label_agreement=float(np.mean([a.label == b.label
                                                          for a, b in zip(plain_scores, fast_scores)])),
            inference_path_scoring_max_abs_diff=float((plain - fast).abs().max()))

    def query(self) -> None:
        m, n = self.model, ANSWER_TOKENS
        base = m.base_vlm

        def add(lever: str, layout_key: str, method: str, fn_factory: Callable[[dict], Callable[[], Any]],
                vision_attention: str = "sdpa", text_attention: str = "sdpa") -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, 1, for_generation=True)
                set_packed_attention(base, vision_attention)
                set_text_attention(base, text_attention)
                packed_before = self.clip_attention.packed_calls
                try:
                    with layout.applied(m):
                        fn = fn_factory(batch)
                        prefill_ms = self.timer(lambda: scoring.prefill(m, batch))["median_ms"]
                        t = self.timer(fn)
                finally:
                    set_packed_attention(base, "sdpa")
                    set_text_attention(base, "sdpa")
                packed = self.clip_attention.packed_calls > packed_before
                self.row("query", lever=lever, clip_attention_packed=packed, layout=layout.name, method=method, tokens=batch["input_ids"].shape[1],
                         prefill_ms=prefill_ms, query_ms=t["median_ms"], min_ms=t["min_ms"])
            self.guarded("query", lever, measure)

        generate = lambda b: lambda: hf_generate(m, b, n)  # noqa: E731
        add("stock (original layout)", "stock", "HF generate", generate)
        add("+ trimmed, pooled audio", "images", "HF generate", generate)
        add("+ video pathway", "video", "HF generate", generate)
        add("+ batched clip attention", "video", "HF generate", generate, vision_attention=PACKED_ATTENTION)
        add("+ static KV cache + CUDA graph decode", "video", "prefill + graph decode",
            lambda b: FastQuery(m, b, n, use_graph=self.device.type == "cuda"), vision_attention=PACKED_ATTENTION)
        add("candidate scoring (surgvqa.score_candidates)", "video", "score_candidates",
            lambda b: lambda: score_candidates(m, b), vision_attention=PACKED_ATTENTION)
        add("candidate scoring, shared prefix, logits at targets", "video", "CandidateScorer",
            lambda b: CandidateScorer(m, b), vision_attention=PACKED_ATTENTION)
        cuda = self.device.type == "cuda"
        add("+ host reads ahead, encoders and continuation as CUDA graphs", "video", "GraphedScorer",
            lambda b: GraphedScorer(m, b, use_graph=cuda), vision_attention=PACKED_ATTENTION)
        kernels = ["eager", "sdpa"] + (["flash_attention_2"] if self.results["meta"]["flash_attn_installed"] else [])
        for kernel in kernels:
            add(f"kernels: LM attention {kernel}", "video", "CandidateScorer", lambda b: CandidateScorer(m, b),
                vision_attention=PACKED_ATTENTION, text_attention=kernel)

    def evaluation(self) -> None:
        m = self.model
        base = m.base_vlm

        def add(lever: str, layout_key: str, size: int, fn_factory: Callable[[dict], Callable[[], Any]],
                vision_attention: str, lengths_s: Sequence[float] | None = None) -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, size, for_generation=True, lengths_s=lengths_s)
                set_packed_attention(base, vision_attention)
                try:
                    with layout.applied(m):
                        t = self.timer(fn_factory(batch))
                finally:
                    set_packed_attention(base, "sdpa")
                self.row("eval", lever=lever, layout=layout.name, batch=size, batch_ms=t["median_ms"],
                         samples_per_s=size * 1e3 / t["median_ms"],
                         collate_ms_per_sample=self.workload.collate_ms_per_sample[layout.name])
            self.guarded("eval", f"{lever} batch {size}", measure)

        ends = sorted({self.eval_batches[0], self.eval_batches[-1]})  # the other methods at the extremes only
        for size in self.eval_batches[:2]:
            add("stock: HF generate", "stock", size, lambda b: lambda: hf_generate(m, b, ANSWER_TOKENS), "sdpa")
        for size in self.eval_batches:
            add("scoring: graphed prefill and continuation", "video", size,
                lambda b: GraphedScorer(m, b, use_graph=self.device.type == "cuda"), PACKED_ATTENTION)
        for size in self.eval_batches:
            # what notebook 05 runs per batch: candidate scores and the free-text answer, on the fast path, up to
            # 05's answer length (random weights never end an answer early, so all of it)
            add(f"05's path: answer_and_score ({MAX_NEW_TOKENS}-token answer)", "video", size,
                lambda b: lambda: answer_and_score(m, b, MAX_NEW_TOKENS), "sdpa")
        for size in ends:
            add("scoring: shared prefix + clip attention", "video", size, lambda b: CandidateScorer(m, b),
                PACKED_ATTENTION)
        for size in ends:
            add("generate: static KV + graph + clip attention", "video", size,
                lambda b: FastQuery(m, b, ANSWER_TOKENS, use_graph=self.device.type == "cuda"), PACKED_ATTENTION)
        # Test questions differ in length (1.8 to 4.6 s spoken by the dry run's test voices, nearly all
        # different): 05's path encodes a batch of them in one Whisper call.
        size = self.eval_batches[-1]
        lengths_s = np.linspace(QUESTION_S - 2.2, QUESTION_S + 0.5, size).tolist()
        add(f"05's path: {size} question lengths ({lengths_s[0]:.1f}-{lengths_s[-1]:.1f} s)", "video", size,
            lambda b: lambda: answer_and_score(m, b, MAX_NEW_TOKENS), "sdpa", lengths_s)
        # A fine-tuned model answers with its LoRA adapter unmerged (r=64 on every LM linear layer, fp32 adapter
        # weights as peft keeps them). peft alone runs each adapter matmul in fp32; 05's path runs it under
        # bf16 autocast with the inputs left in bf16 (surgvqa.inference.bf16_adapters), as training's step does.
        with_adapter(m)
        add("05's path + LoRA adapter, fp32 adapter matmuls", "video", size,
            lambda b: lambda: fastpath_answer_and_score(m, b, MAX_NEW_TOKENS, use_graph=self.device.type == "cuda"),
            "sdpa", lengths_s)
        add("05's path + LoRA adapter (bf16 autocast)", "video", size,
            lambda b: lambda: answer_and_score(m, b, MAX_NEW_TOKENS), "sdpa", lengths_s)

    def train(self) -> None:
        m = self.model
        with_adapter(m)
        m.projector.requires_grad_(True)
        m.train()
        base = m.base_vlm

        def add(lever: str, layout_key: str, size: int, logits_everywhere: bool, vision_attention: str,
                autocast: bool = True, uncast_adapters: bool = False) -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, size, for_generation=False)
                optimizer = torch.optim.AdamW(parameter_groups(m), fused=self.device.type == "cuda")
                set_packed_attention(base, vision_attention)
                reset_peak_memory(self.device)
                try:
                    with layout.applied(m):
                        t = self.timer(train_step_fn(m, batch, optimizer, logits_everywhere, autocast,
                                                     uncast_adapters))
                finally:
                    set_packed_attention(base, "sdpa")
                    del optimizer
                self.row("train", lever=lever, layout=layout.name, batch=size, tokens=batch["input_ids"].shape[1],
                         step_ms=t["median_ms"], ms_per_sample=t["median_ms"] / size,
                         peak_memory_gb=peak_memory_gb(self.device))
            self.guarded("train", f"{lever} batch {size}", measure)

        # Every row runs under bf16 autocast (accelerate's and Trainer's bf16 mixed precision) except the
        # one that shows what leaving it out costs.
        add("stock: 8 images + 1500 audio, logits everywhere", "stock", 1, True, "sdpa")
        add("+ trimmed audio + video, logits everywhere", "video", 1, True, "sdpa")
        add("+ logits at labels only (project forward)", "video", 1, False, "sdpa")
        big = self.train_batches[-1]
        add("  same without autocast (fp32 adapter matmuls)", "video", big, False, PACKED_ATTENTION, autocast=False)
        for size in self.train_batches:
            add("+ clip attention, batched", "video", size, False, PACKED_ATTENTION)
        for size in self.train_batches[-2:]:
            add("+ adapter inputs not cast to fp32", "video", size, False, PACKED_ATTENTION, uncast_adapters=True)

    def summary(self) -> None:
        r = self.results
        stock_query = next((q["query_ms"] for q in r["query"] if q["layout"].startswith("stock")), None)
        best_query = min((q for q in r["query"] if not q["layout"].startswith("stock")),
                         key=lambda q: q["query_ms"], default=None)
        stock_eval = max((e["samples_per_s"] for e in r["eval"] if e["lever"].startswith("stock")), default=None)
        best_eval = max((e for e in r["eval"] if not e["lever"].startswith("stock")),
                        key=lambda e: e["samples_per_s"], default=None)
        stock_train = next((t["ms_per_sample"] for t in r["train"] if t["lever"].startswith("stock")), None)
        best_train = min((t for t in r["train"] if not t["lever"].startswith("stock")),
                         key=lambda t: t["ms_per_sample"], default=None)
        s = r["summary"]
        if best_query and stock_query:
            s.update(query_ms=best_query["query_ms"], query_by=best_query["lever"], stock_query_ms=stock_query,
                     query_speedup=stock_query / best_query["query_ms"])
        if best_eval and stock_eval:
            s.update(eval_samples_per_s=best_eval["samples_per_s"], eval_by=f"{best_eval['lever']}, batch "
                     f"{best_eval['batch']}", stock_eval_samples_per_s=stock_eval,
                     eval_speedup=best_eval["samples_per_s"] / stock_eval)
        if best_train and stock_train:
            s.update(train_ms_per_sample=best_train["ms_per_sample"], train_by=f"{best_train['lever']}, batch "
                     f"{best_train['batch']}", train_peak_memory_gb=best_train["peak_memory_gb"],
                     stock_train_ms_per_sample=stock_train, train_speedup=stock_train / best_train["ms_per_sample"])
        if not self.smoke:
            s["targets_met"] = {
                "query_ms": s.get("query_ms", float("inf")) <= TARGETS["query_ms"],
                "eval_samples_per_s": s.get("eval_samples_per_s", 0.0) >= TARGETS["eval_samples_per_s"],
                "train_ms_per_sample": s.get("train_ms_per_sample", float("inf")) <= TARGETS["train_ms_per_sample"]}
        self.save()

    def print_table(self) -> None:
        r = self.results
        print("\n== query: 4 s spoken question + 8 frames, batch 1 ==")
        print(f"{'lever':55} {'tokens':>6} {'prefill ms':>10} {'query ms':>9}")
        for q in r["query"]:
            print(f"{q['lever']:55} {q['tokens']:6d} {q['prefill_ms']:10.1f} {q['query_ms']:9.1f}")
        print("\n== evaluation throughput ==")
        print(f"{'lever':50} {'batch':>5} {'batch ms':>9} {'samples/s':>9} {'collate ms/s':>12}")
        for e in r["eval"]:
            print(f"{e['lever']:50} {e['batch']:5d} {e['batch_ms']:9.1f} {e['samples_per_s']:9.2f} "
                  f"{e['collate_ms_per_sample']:12.1f}")
        print("\n== LoRA training (r=64, every LM linear layer; AdamW step included) ==")
        print(f"{'lever':50} {'batch':>5} {'tokens':>6} {'ms/sample':>9} {'peak GB':>8}")
        for t in r["train"]:
            peak = f"{t['peak_memory_gb']:8.1f}" if t["peak_memory_gb"] is not None else f"{'-':>8}"
            print(f"{t['lever']:50} {t['batch']:5d} {t['tokens']:6d} {t['ms_per_sample']:9.1f} {peak}")
        print("\n== summary ==")
        print(json.dumps({"meta": {k: r["meta"].get(k) for k in ("device", "torch", "transformers",
                                                                  "copy_bandwidth_gb_s", "matmul_tflop_s",
                                                                  "decode_floor_ms_per_token",
                                                                  "prefill_floor_ms_per_1k_tokens")},
                          "checks": r["checks"], "summary": r["summary"], "errors": r["errors"]},
                         indent=1, default=str))
        print(f"\nJSON: {self.json_path}", flush=True)


def profile(run: Run) -> None:
    """One scored query (batch 1) and one LoRA step (batch 8) under torch.profiler: the operators by GPU time,
    and the host-device synchronisations, written as text beside the JSON (where the time goes, before
    choosing the next lever)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    m, layout = run.model, run.layouts["video"]
    base, cuda = m.base_vlm, run.device.type == "cuda"
    set_packed_attention(base, PACKED_ATTENTION)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def record(name: str, fn: Callable[[], Any]) -> None:
        for _ in range(2):
            fn()
        sync()
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            wall = time.perf_counter()
            fn()
            sync()
            wall = (time.perf_counter() - wall) * 1e3
        events = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
        syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item"}
        text = (f"{name}: wall {wall:.1f} ms, GPU busy {gpu_ms:.1f} ms, host syncs/copies {syncs}\n\n"
                + events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60)
                + "\n\nby CPU time\n" + events.table(sort_by="self_cpu_time_total", row_limit=20,
                                                       max_name_column_width=60))
        (run.out_dir / f"profile-{name}.txt").write_text(text)
        print(text[:6000], flush=True)

    with layout.applied(m):
        batch = run.workload.batch(layout, 1, for_generation=True)
        record("query-scoring", CandidateScorer(m, batch))
        m.vlm = _apply_training_setup(m.vlm, m.cfg)
        m.projector.requires_grad_(True)
        m.train()
        batch = run.workload.batch(layout, 8, for_generation=False)
        optimizer = torch.optim.AdamW(parameter_groups(m), fused=cuda)
        record("train-batch8", train_step_fn(m, batch, optimizer, logits_everywhere=False))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests)")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON")
    parser.add_argument("--audio-pool", type=int, default=get_config("qwen2vl-7b").audio_pool, choices=(1, 2, 4),
                        help="Whisper frames per audio token (default: the qwen2vl-7b preset's, 4: 50 tokens "
                             "for a 4 s question; 2 gives the 100 tokens of docs/design.md's anchors)")
    parser.add_argument("--profile", action="store_true", help="profile one query and one training step only")
    parser.add_argument("--sections", default="checks,query,evaluation,train",
                        help="comma-separated subset of checks, query, evaluation, train")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for the CPU")
    run = Run(args)
    t0 = time.perf_counter()
    if args.profile:
        run.meta()
        run.build()
        profile(run)
        return run.results
    chosen = set(args.sections.split(","))
    if not chosen <= {"checks", "query", "evaluation", "train"}:
        parser.error(f"--sections {args.sections}: choose among checks, query, evaluation, train")
    for name in ("meta", "build", *[s for s in ("checks", "query", "evaluation", "train") if s in chosen], "summary"):
        log(f"section {name} ({time.perf_counter() - t0:.0f} s in)")
        getattr(run, name)()
    run.print_table()
    return run.results


if __name__ == "__main__":
    main()
