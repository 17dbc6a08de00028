"""The project's graft at real Qwen2-VL-7B + Whisper-large-v3-turbo shapes against the original study's
stock layout, in one run on one GPU: query latency, evaluation throughput, LoRA training, one lever at a time.

    python benchmarks/gpu.py --out DIR            # full run, one H200, ~6-8 minutes
    python benchmarks/gpu.py --quick --out DIR    # fewer batch sizes and repeats
    python benchmarks/gpu.py --smoke              # tiny shapes on the CPU: the same code paths, for tests

Weights are random at the real shapes (DESIGN.md section 5; nothing is downloaded): timings depend on the
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

Results: a table on stdout and JSON under --out (rewritten after every section, so a cut run keeps what
it measured).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, WhisperConfig, WhisperFeatureExtractor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.whisper.modeling_whisper import WhisperEncoder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a plain checkout too, not only after `pip install -e .`

from surgvqa import data  # noqa: E402
from surgvqa.collate import IGNORE_INDEX, SAMPLE_RATE, Collator  # noqa: E402
from surgvqa.config import get_config  # noqa: E402
from surgvqa.train import adapter_inputs_uncast  # noqa: E402
from surgvqa.model import (AudioGraftedQwen2VL, _apply_training_setup, build_tiny_tokenizer, candidate_token_rows,  # noqa: E402
                           parameter_groups, score_candidates, tiny_vlm_config)

# --- shapes ----------------------------------------------------------------------------------------------

# DESIGN.md section 5. The real Qwen tokenizer is not available offline: the task tokenizer (same special
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

# Vision attention routed to a registered function. transformers passes the packed sequence with its
# cu_seqlens only to implementations whose name contains "flash" (is_flash_attention_requested); any other
# name gets one call per image/frame after a `lengths.tolist()` host sync in every vision layer.
CLIP_ATTENTION = "flash_api_equal_clips_sdpa"
TARGETS = {"query_ms": 80.0, "eval_samples_per_s": 25.0, "train_ms_per_sample": 120.0}
STOCK_ANCHORS = {"query_ms": 431.0, "train_ms_per_sample": 768.0}  # DESIGN.md section 5, transformers 5.17


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


# --- version tolerance -----------------------------------------------------------------------------------

def accepted_kwargs(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """kwargs that ``fn`` names explicitly (mm_token_type_ids exists in 5.24's Qwen2-VL, not necessarily before)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def output_cache(out: Any) -> Any:
    """The KV cache of a model output: ``cache`` in transformers 5.24, ``past_key_values`` before."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AttributeError("the model output carries no KV cache")


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, kv_heads, length, head_dim), for either Cache layout."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def set_text_attention(base: Qwen2VLForConditionalGeneration, name: str) -> None:
    # Read at every forward by the decoder layers; set on the config object they hold, no re-validation.
    base.model.language_model.config._attn_implementation = name


def set_vision_attention(base: Qwen2VLForConditionalGeneration, name: str) -> None:
    base.model.visual.config._attn_implementation = name


# --- batched vision attention over equal-size clips ------------------------------------------------------

class ClipAttention:
    """Vision attention for a packed sequence of clips: one SDPA call over (clips, heads, length, dim).

    Qwen2-VL attends within each image / temporal slice only. When every slice has the same number of
    patches (the study's clips always do) the packed sequence is a reshape away from a batch, so the whole
    layer is one kernel and nothing waits for the host. Unequal slices fall back to one call per slice.
    """

    def __init__(self) -> None:
        # How transformers called it: packed (one call a layer, cu_seqlens given) or already split per
        # segment (a version whose vision tower routes only "flash_attention_2" itself to the packed call).
        self.packed_calls = 0
        self.segment_calls = 0

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
        heads, total, dim = query.shape[1:]  # (1, heads, patches, dim)
        if cu_seq_lens_q is None:  # one segment, split by the caller
            self.segment_calls += 1
            out = F.scaled_dot_product_attention(query, key, value, scale=scaling, dropout_p=dropout)[0]
            return out.transpose(0, 1).unsqueeze(0), None
        self.packed_calls += 1
        clips = cu_seq_lens_q.numel() - 1
        if max_length_q * clips == total:  # lengths sum to total and none exceeds the max: all equal
            q, k, v = (t[0].view(heads, clips, max_length_q, dim).transpose(0, 1) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling, dropout_p=dropout)
            out = out.transpose(0, 1).reshape(heads, total, dim)
        else:
            bounds = cu_seq_lens_q.tolist()
            out = torch.cat([F.scaled_dot_product_attention(query[0, :, a:b], key[0, :, a:b], value[0, :, a:b],
                                                            scale=scaling, dropout_p=dropout)
                             for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
        return out.transpose(0, 1).unsqueeze(0), None


def register_clip_attention() -> ClipAttention:
    from transformers import AttentionInterface

    fn = ClipAttention()
    AttentionInterface.register(CLIP_ATTENTION, fn)
    return fn


# --- decoding and scoring over a preallocated KV cache ---------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticKVDecoder:
    """Qwen2-VL's language model continuing a prompt over a preallocated KV cache, with fixed shapes.

    The prompt (vision, audio, M-RoPE) runs through stock transformers once; its cache is copied into
    buffers of a fixed length, and the tokens after it run through the same decoder layers here. After the
    prompt every position is text, where M-RoPE's three position streams are equal, so the rotation is the
    ordinary 1-D one from the same inv_freq. Every shape is fixed and nothing reads back to the host, so a
    decoding step can be captured as a CUDA graph: one replay per token instead of ~600 kernel launches.
    """

    def __init__(self, base: Qwen2VLForConditionalGeneration, batch: int, max_length: int):
        lm = base.model.language_model
        cfg = lm.config
        self.layers, self.norm, self.lm_head, self.embed = lm.layers, lm.norm, base.lm_head, lm.embed_tokens
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = lm.rotary_emb.inv_freq
        self.rope_scale = getattr(lm.rotary_emb, "attention_scaling", 1.0)
        weight = base.lm_head.weight
        shape = (len(self.layers), batch, self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.filled = torch.zeros(batch, max_length, dtype=torch.bool, device=weight.device)
        self.slots = torch.arange(max_length, device=weight.device)
        # Decoding state, updated in place so that a captured graph reads and advances it.
        self.next_slot = torch.zeros((), dtype=torch.long, device=weight.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load_prompt(self, cache: Any, attention_mask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Copy a prompt's cache in (``rows`` repeats prompts, e.g. once per candidate answer)."""
        length = attention_mask.shape[1]
        for layer, (k, v) in enumerate(cache_layers(cache)):
            self.keys[layer, :, :, :length] = k if rows is None else k[rows]
            self.values[layer, :, :, :length] = v if rows is None else v[rows]
        self.filled.zero_()
        self.filled[:, :length] = (attention_mask if rows is None else attention_mask[rows]).bool()
        self.next_slot.fill_(length)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, T, hidden) of T new tokens written at slots next_slot.., causal among them."""
        steps = tokens.shape[1]
        new_slots = self.next_slot + torch.arange(steps, device=tokens.device)
        self.filled.index_fill_(1, new_slots, True)
        visible = self.filled[:, None, :] & (self.slots[None, None, :] <= new_slots[None, :, None])
        angles = positions[..., None].float() * self.inv_freq  # (batch, T, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        x = self.embed(tokens)
        cos = (angles.cos() * self.rope_scale).to(x.dtype)[:, None]
        sin = (angles.sin() * self.rope_scale).to(x.dtype)[:, None]
        batch = tokens.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.keys[i].index_copy_(2, new_slots, k)
            self.values[i].index_copy_(2, new_slots, v)
            out = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=visible[:, None],
                                                 enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.next_slot += steps
        return self.norm(x)

    def _greedy_step(self) -> None:
        hidden = self.forward(self.tokens, self.positions)
        self.tokens.copy_(self.lm_head(hidden[:, -1]).argmax(-1, keepdim=True))
        self.positions += 1

    def capture(self) -> None:
        """Record one greedy step as a CUDA graph (warmed up on a side stream first, as capture requires)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._greedy_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._greedy_step()

    def greedy(self, first_tokens: torch.Tensor, first_positions: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` greedy tokens after the first (which the prompt's last position predicted)."""
        self.tokens.copy_(first_tokens)
        self.positions.copy_(first_positions)
        out = [first_tokens.clone()]
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._greedy_step()
            out.append(self.tokens.clone())
        return torch.cat(out, dim=1)


# --- the model at real shapes ----------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_graft(smoke: bool, device: torch.device, dtype: torch.dtype, audio_pool: int) -> AudioGraftedQwen2VL:
    """The project's graft, random weights, built in place on the device (no host-side init of 8 B params)."""
    cfg = get_config("smoke" if smoke else "qwen2vl-7b", audio_pool=audio_pool, lora=True,
                     dtype="float32" if dtype == torch.float32 else "bfloat16")
    tokenizer = build_tiny_tokenizer(cfg)
    if smoke:
        vlm_config, whisper_config = tiny_vlm_config(tokenizer), WhisperConfig(**WHISPER_TINY_ENCODER)
    else:
        ids = tokenizer.get_vocab()
        text = dict(QWEN2_VL_7B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"])
        vlm_config = Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_7B_VISION,
                                   image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                   vision_start_token_id=ids["<|vision_start|>"],
                                   vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        whisper_config = WhisperConfig(**WHISPER_LARGE_V3_TURBO_ENCODER)
    vlm_config._attn_implementation = "sdpa"
    feature_extractor = WhisperFeatureExtractor(feature_size=whisper_config.num_mel_bins)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        vlm = Qwen2VLForConditionalGeneration(vlm_config)
        whisper = WhisperEncoder(whisper_config)
        model = AudioGraftedQwen2VL(vlm, whisper, tokenizer, feature_extractor, cfg, whisper_from_cfg=False)
    return model.eval()


class Layout:
    """How a query is laid out: frames as video or images, the audio window and pooling."""

    def __init__(self, name: str, frames_as: str, audio_pool: int, audio_window_s: float | None):
        self.name, self.frames_as, self.audio_pool, self.audio_window_s = name, frames_as, audio_pool, audio_window_s

    def collator(self, model: AudioGraftedQwen2VL, frame_size: int) -> Collator:
        vision = model.base_vlm.config.vision_config
        return Collator(model.tokenizer, model.feature_extractor, question_mode="audio", frames_as=self.frames_as,
                        frame_size=frame_size, audio_pool=self.audio_pool, max_audio_s=STOCK_AUDIO_WINDOW_S,
                        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                        merge_size=vision.spatial_merge_size)

    @contextlib.contextmanager
    def applied(self, model: AudioGraftedQwen2VL):
        """The projector pools as this layout says (pooling has no weights: one projector serves all)."""
        pool = model.projector.pool
        model.projector.pool = self.audio_pool
        try:
            yield
        finally:
            model.projector.pool = pool


class Workload:
    """Collated batches of real annotation rows with random frames and question audio, on the device."""

    def __init__(self, model: AudioGraftedQwen2VL, frame_size: int, device: torch.device):
        self.model, self.frame_size, self.device = model, frame_size, device
        samples = data.load_template("out", model.cfg)
        by_type: dict[str, data.Sample] = {}
        for s in samples:
            by_type.setdefault(s.question_type, s)
        self.samples = list(by_type.values())  # one row per question type, cycled: every label set is scored
        self.rng = np.random.default_rng(0)
        self.collate_ms_per_sample: dict[str, float] = {}

    def items(self, n: int, audio_window_s: float | None) -> list[tuple]:
        out = []
        for i in range(n):
            frames = self.rng.integers(0, 256, (data.FRAMES_PER_CLIP, self.frame_size, self.frame_size, 3),
                                       dtype=np.uint8)
            wave = (0.1 * self.rng.standard_normal(int(QUESTION_S * SAMPLE_RATE))).astype(np.float32)
            if audio_window_s:
                wave = np.pad(wave, (0, int(audio_window_s * SAMPLE_RATE) - len(wave)))
            out.append((self.samples[i % len(self.samples)], frames, wave))
        return out

    def batch(self, layout: Layout, n: int, for_generation: bool) -> dict[str, Any]:
        collate = layout.collator(self.model, self.frame_size)
        items = self.items(n, layout.audio_window_s)
        t0 = time.perf_counter()
        batch = collate(items, for_generation=for_generation)
        self.collate_ms_per_sample[layout.name] = (time.perf_counter() - t0) * 1e3 / n
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}


def vision_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    return {k: batch[k] for k in keys if k in batch}


def model_inputs(model: AudioGraftedQwen2VL, batch: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-VL's forward takes from a batch, with the audio rows in the embeddings."""
    base = model.base_vlm
    embeds = model.embed(batch["input_ids"], batch.get("audio_features"), batch.get("audio_lengths"))
    extra = accepted_kwargs(base.model.forward, mm_token_type_ids=batch["mm_token_type_ids"])
    return dict(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                **extra, **vision_inputs(batch))


# --- the measured operations -----------------------------------------------------------------------------

@torch.no_grad()
def hf_generate(model: AudioGraftedQwen2VL, batch: dict[str, Any], n_tokens: int) -> torch.Tensor:
    """surgvqa.model.generate's call into transformers' generate, held to exactly n_tokens (random weights
    may otherwise emit end-of-turn early and time a shorter answer)."""
    out = model.base_vlm.generate(**model_inputs(model, batch), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                  do_sample=False, eos_token_id=model.im_end_id,
                                  pad_token_id=model.tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def prefill(model: AudioGraftedQwen2VL, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prompt through stock Qwen2-VL: (log-probs of the next token, KV cache, first text position)."""
    base = model.base_vlm
    out = base.model(**model_inputs(model, batch), use_cache=True)
    logp = torch.log_softmax(base.lm_head(out.last_hidden_state[:, -1]).float(), dim=-1)
    # Positions continue after the prompt's last M-RoPE position (rope_deltas shift past the vision grid).
    next_position = batch["attention_mask"].sum(dim=1, keepdim=True) + base.model.rope_deltas
    return logp, output_cache(out), next_position


class GraphedPrefill:
    """The prompt with its host reads done once ahead and its launch-bound parts replayed as CUDA graphs.

    Stock Qwen2-VL derives the M-RoPE positions, the vision rotary positions and the vision segment bounds
    from the batch with host reads (Python loops, ``tolist``, ``nonzero``) at every call, and at batch 1
    the vision tower (32 blocks over 3,136 patches) and Whisper (32 layers over 200 frames) are too small
    to hide their ~1,000 kernel launches. Here, for a batch of fixed shapes: the positions come from
    ``get_rope_index`` on the host copies of the batch, the vision bounds from transformers' own
    precomputable helpers (passed back through the vision tower's kwargs, which 5.24 accepts); Whisper +
    projector + the scatter into the prompt's embeddings, and the vision tower, are each captured once as
    a CUDA graph and replayed. The language model then runs through stock ``Qwen2VLModel.forward`` with
    ``position_ids`` and ``mm_encoder_outputs`` given, so it computes neither again.
    """

    def __init__(self, model: AudioGraftedQwen2VL, batch: dict[str, Any], use_graph: bool):
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        self.model, self.batch = model, batch
        base = model.base_vlm
        visual = base.model.visual
        host = {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        positions, deltas = base.model.get_rope_index(
            host["input_ids"], video_grid_thw=host.get("video_grid_thw"), image_grid_thw=host.get("image_grid_thw"),
            attention_mask=host["attention_mask"], mm_token_type_ids=host["mm_token_type_ids"])
        device = batch["input_ids"].device
        self.positions, self.rope_deltas = positions.to(device), deltas.to(device)
        self.pixels_key = "pixel_values_videos" if "pixel_values_videos" in batch else "pixel_values"
        self.grid = batch["video_grid_thw" if self.pixels_key == "pixel_values_videos" else "image_grid_thw"]
        grid_host = self.grid.cpu()
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_host, visual.config)
        self.vision_kwargs = dict(position_ids=get_vision_position_ids(grid_host, visual.spatial_merge_size).to(device),
                                  cu_seqlens=cu_seqlens.to(device), max_seqlen=max_seqlen)
        # Audio rows go to fixed token slots: indices once, then an index_put (no masked_scatter count read).
        audio = host["input_ids"] == model.audio_token_id
        self.audio_slots = tuple(i.to(device) for i in audio.nonzero(as_tuple=True))
        lengths = host["audio_lengths"]
        if len(set(lengths.tolist())) != 1:
            raise ValueError("the graphed prefill takes questions of one length (one Whisper graph)")
        self.mel = batch["audio_features"][:, :, : int(lengths[0])].contiguous()
        self.embeds = self.video = None
        self.audio_graph = self.vision_graph = None
        if use_graph:
            self.audio_graph = capture_graph(self._embed)
            self.vision_graph = capture_graph(self._vision)

    def _embed(self) -> None:
        m = self.model
        embeds = m.base_vlm.get_input_embeddings()(self.batch["input_ids"])
        rows = m.projector(m.whisper_frames(self.mel).to(m.projector.linear.weight.dtype))
        embeds[self.audio_slots] = rows.reshape(-1, rows.shape[-1]).to(embeds.dtype)
        self.embeds = embeds

    def _vision(self) -> None:
        visual = self.model.base_vlm.model.visual
        self.video = visual(self.batch[self.pixels_key], grid_thw=self.grid, **dict(self.vision_kwargs)).pooler_output

    def __call__(self) -> Any:
        """The stock language model's output over the prompt (last hidden state, KV cache)."""
        for graph, eager in ((self.audio_graph, self._embed), (self.vision_graph, self._vision)):
            if graph is not None:
                graph.replay()
            else:
                eager()
        key = "video" if self.pixels_key == "pixel_values_videos" else "image"
        outputs = {key: BaseModelOutputWithPooling(pooler_output=(self.video,))}
        base = self.model.base_vlm
        return base.model(input_ids=self.batch["input_ids"], inputs_embeds=self.embeds, position_ids=self.positions,
                          attention_mask=self.batch["attention_mask"], mm_token_type_ids=self.batch["mm_token_type_ids"],
                          mm_encoder_outputs=outputs, use_cache=True)

    def next_position(self) -> torch.Tensor:
        return self.batch["attention_mask"].sum(dim=1, keepdim=True) + self.rope_deltas


def capture_graph(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``fn`` (which reads and writes only tensors it keeps) recorded as a CUDA graph after a warm-up on a
    side stream, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph


class GraphedScorer:
    """Candidate scoring with the graphed prefill and the candidates' continuation replayed as a graph."""

    def __init__(self, model: AudioGraftedQwen2VL, batch: dict[str, Any], use_graph: bool):
        self.prefill = GraphedPrefill(model, batch, use_graph)
        self.scorer = CandidateScorer(model, batch)
        self.feed_positions = torch.zeros_like(self.scorer.feed)
        self.hidden = None
        self.graph = None
        if use_graph:
            self._load_prompt()
            self.graph = capture_graph(self._continue)

    def _load_prompt(self) -> torch.Tensor:
        s = self.scorer
        with torch.no_grad():
            out = self.prefill()
        logp_first = torch.log_softmax(s.model.base_vlm.lm_head(out.last_hidden_state[:, -1]).float(), dim=-1)
        s.decoder.load_prompt(output_cache(out), self.prefill.batch["attention_mask"], rows=s.owner)
        self.feed_positions.copy_(self.prefill.next_position()[s.owner]
                                  + torch.arange(s.feed.shape[1], device=s.feed.device))
        return logp_first

    def _continue(self) -> None:
        s = self.scorer
        # back to the prompt's end on every call: capture's warm-up calls must not run past the buffers
        s.decoder.next_slot.fill_(self.prefill.batch["input_ids"].shape[1])
        self.hidden = s.decoder.forward(s.feed, self.feed_positions)

    @torch.no_grad()
    def __call__(self) -> list[str]:
        logp_first = self._load_prompt()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._continue()
        return self.scorer.pick(logp_first, self.hidden)


class FastQuery:
    """Prefill through transformers, then greedy decoding over a static KV cache replayed as a CUDA graph."""

    def __init__(self, model: AudioGraftedQwen2VL, batch: dict[str, Any], n_tokens: int, use_graph: bool):
        self.model, self.batch, self.n_tokens = model, batch, n_tokens
        length = batch["input_ids"].shape[1] + n_tokens
        self.decoder = StaticKVDecoder(model.base_vlm, batch["input_ids"].shape[0], length)
        if use_graph:
            # A real prompt in the buffers, so that the capture's warm-up steps run on real values.
            logp, cache, position = prefill(model, batch)
            self.decoder.load_prompt(cache, batch["attention_mask"])
            self.decoder.tokens.copy_(logp.argmax(-1, keepdim=True))
            self.decoder.positions.copy_(position)
            self.decoder.capture()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        logp, cache, position = prefill(self.model, self.batch)
        self.decoder.load_prompt(cache, self.batch["attention_mask"])
        return self.decoder.greedy(logp.argmax(-1, keepdim=True), position, self.n_tokens - 1)


class CandidateScorer:
    """Each label's answer sentence scored over the shared prompt: one prefill, then all candidates of the
    batch in one forward over the static KV cache, with logits only at the scored positions and one
    host read at the end (surgvqa.model.score_candidates reads each candidate's total separately)."""

    def __init__(self, model: AudioGraftedQwen2VL, batch: dict[str, Any]):
        self.model, self.batch = model, batch
        owners, labels, rows = candidate_token_rows(model, batch["samples"])
        device = batch["input_ids"].device
        self.labels = labels
        self.owner = torch.tensor(owners, device=device)
        length = max(len(r) for r in rows)
        # Row r feeds its tokens but the last; target[r, j] is the token that position j must predict.
        self.feed = torch.full((len(rows), max(length - 1, 1)), model.tokenizer.pad_token_id, device=device)
        self.target = torch.full((len(rows), length), IGNORE_INDEX, device=device)
        for r, row in enumerate(rows):
            self.feed[r, : len(row) - 1] = torch.tensor(row[:-1])
            self.target[r, : len(row)] = torch.tensor(row)
        self.decoder = StaticKVDecoder(model.base_vlm, len(rows), batch["input_ids"].shape[1] + self.feed.shape[1])

    @torch.no_grad()
    def __call__(self) -> list[str]:
        logp_first, cache, position = prefill(self.model, self.batch)
        self.decoder.load_prompt(cache, self.batch["attention_mask"], rows=self.owner)
        positions = position[self.owner] + torch.arange(self.feed.shape[1], device=self.feed.device)
        return self.pick(logp_first, self.decoder.forward(self.feed, positions))

    def pick(self, logp_first: torch.Tensor, hidden: torch.Tensor) -> list[str]:
        """The most likely label of each sample from the prompt's next-token log-probs and the hidden
        states of the candidates' continuation."""
        first = logp_first[self.owner].gather(1, self.target[:, :1]).squeeze(1)
        rest_targets = self.target[:, 1:]
        keep = rest_targets != IGNORE_INDEX
        token_logp = torch.log_softmax(self.model.base_vlm.lm_head(hidden[:, : rest_targets.shape[1]][keep]).float(),
                                       dim=-1).gather(1, rest_targets[keep][:, None]).squeeze(1)
        totals = first + torch.zeros_like(first).index_put_((keep.nonzero()[:, 0],), token_logp, accumulate=True)
        best = torch.full((len(self.batch["samples"]),), -float("inf"), device=totals.device)
        best = best.scatter_reduce(0, self.owner, totals, reduce="amax")
        winners = (totals == best[self.owner]).cpu().tolist()  # the one host read
        chosen: dict[int, str] = {}
        for r, win in enumerate(winners):
            if win:
                chosen.setdefault(int(self.owner[r]), self.labels[r])
        self.totals = totals
        return [chosen[i] for i in range(len(self.batch["samples"]))]


def train_step_fn(model: AudioGraftedQwen2VL, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                  logits_everywhere: bool, autocast: bool = False, uncast_adapters: bool = False
                  ) -> Callable[[], None]:
    """One LoRA step. ``logits_everywhere``: the stock path (transformers' own loss over logits at every
    position, fp32-upcast 152k columns per token); otherwise the project's forward (logits at labels only).
    ``autocast``: under bf16 autocast, as accelerate's and Trainer's bf16 mixed precision run it (peft keeps
    the adapters in fp32; without autocast their matmuls run in fp32). ``uncast_adapters``: peft's own cast
    of every adapter input to the adapter's fp32 switched off (surgvqa.train.adapter_inputs_uncast)."""
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
        self.clip_attention = register_clip_attention()
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
        candidate log-likelihoods as surgvqa.model.score_candidates (within the dtype's rounding)."""
        layout = self.layouts["video"]
        batch = self.workload.batch(layout, 2, for_generation=True)
        with layout.applied(self.model):
            reference = hf_generate(self.model, batch, ANSWER_TOKENS)
            fast = FastQuery(self.model, batch, ANSWER_TOKENS, use_graph=self.device.type == "cuda")()
            self.results["checks"]["static_decode_token_agreement"] = float((reference == fast).float().mean())
            stock_logp = prefill(self.model, batch)[0]
            set_vision_attention(self.model.base_vlm, CLIP_ATTENTION)
            try:
                clip_logp = prefill(self.model, batch)[0]
            finally:
                set_vision_attention(self.model.base_vlm, "sdpa")
            self.results["checks"]["clip_attention_logprob_rel_diff"] = float(
                (clip_logp - stock_logp).norm() / stock_logp.norm())
            scorer = CandidateScorer(self.model, batch)
            scorer()
            set_vision_attention(self.model.base_vlm, CLIP_ATTENTION)
            try:
                graphed = self.guarded("checks", "GraphedScorer", lambda: GraphedScorer(
                    self.model, batch, use_graph=self.device.type == "cuda"))
                if graphed is not None and self.guarded("checks", "GraphedScorer run", graphed) is not None:
                    self.results["checks"]["graphed_scoring_max_abs_diff"] = float(
                        (graphed.scorer.totals - scorer.totals).abs().max())
            finally:
                set_vision_attention(self.model.base_vlm, "sdpa")
            project = self.guarded("checks", "surgvqa.score_candidates", lambda: score_candidates(self.model, batch))
            if project is not None:
                expected = torch.tensor([ll for c in project for ll in c.log_likelihoods.values()])
                got = scorer.totals.cpu().double()
                self.results["checks"]["scoring_max_abs_diff"] = float((got - expected).abs().max())
                self.results["checks"]["scoring_reference_scale"] = float(expected.abs().max())
        log(f"checks: {self.results['checks']}")
        self.save()

    def query(self) -> None:
        m, n = self.model, ANSWER_TOKENS
        base = m.base_vlm

        def add(lever: str, layout_key: str, method: str, fn_factory: Callable[[dict], Callable[[], Any]],
                vision_attention: str = "sdpa", text_attention: str = "sdpa") -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, 1, for_generation=True)
                set_vision_attention(base, vision_attention)
                set_text_attention(base, text_attention)
                packed_before = self.clip_attention.packed_calls
                try:
                    with layout.applied(m):
                        fn = fn_factory(batch)
                        prefill_ms = self.timer(lambda: prefill(m, batch))["median_ms"]
                        t = self.timer(fn)
                finally:
                    set_vision_attention(base, "sdpa")
                    set_text_attention(base, "sdpa")
                packed = self.clip_attention.packed_calls > packed_before
                self.row("query", lever=lever, clip_attention_packed=packed, layout=layout.name, method=method, tokens=batch["input_ids"].shape[1],
                         prefill_ms=prefill_ms, query_ms=t["median_ms"], min_ms=t["min_ms"])
            self.guarded("query", lever, measure)

        generate = lambda b: lambda: hf_generate(m, b, n)  # noqa: E731
        add("stock (original layout)", "stock", "HF generate", generate)
        add("+ trimmed, pooled audio", "images", "HF generate", generate)
        add("+ video pathway", "video", "HF generate", generate)
        add("+ batched clip attention", "video", "HF generate", generate, vision_attention=CLIP_ATTENTION)
        add("+ static KV cache + CUDA graph decode", "video", "prefill + graph decode",
            lambda b: FastQuery(m, b, n, use_graph=self.device.type == "cuda"), vision_attention=CLIP_ATTENTION)
        add("candidate scoring (surgvqa.score_candidates)", "video", "score_candidates",
            lambda b: lambda: score_candidates(m, b), vision_attention=CLIP_ATTENTION)
        add("candidate scoring, shared prefix, logits at targets", "video", "CandidateScorer",
            lambda b: CandidateScorer(m, b), vision_attention=CLIP_ATTENTION)
        cuda = self.device.type == "cuda"
        add("+ host reads ahead, encoders and continuation as CUDA graphs", "video", "GraphedScorer",
            lambda b: GraphedScorer(m, b, use_graph=cuda), vision_attention=CLIP_ATTENTION)
        kernels = ["eager", "sdpa"] + (["flash_attention_2"] if self.results["meta"]["flash_attn_installed"] else [])
        for kernel in kernels:
            add(f"kernels: LM attention {kernel}", "video", "CandidateScorer", lambda b: CandidateScorer(m, b),
                vision_attention=CLIP_ATTENTION, text_attention=kernel)

    def evaluation(self) -> None:
        m = self.model
        base = m.base_vlm

        def add(lever: str, layout_key: str, size: int, fn_factory: Callable[[dict], Callable[[], Any]],
                vision_attention: str) -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, size, for_generation=True)
                set_vision_attention(base, vision_attention)
                try:
                    with layout.applied(m):
                        t = self.timer(fn_factory(batch))
                finally:
                    set_vision_attention(base, "sdpa")
                self.row("eval", lever=lever, layout=layout.name, batch=size, batch_ms=t["median_ms"],
                         samples_per_s=size * 1e3 / t["median_ms"],
                         collate_ms_per_sample=self.workload.collate_ms_per_sample[layout.name])
            self.guarded("eval", f"{lever} batch {size}", measure)

        ends = sorted({self.eval_batches[0], self.eval_batches[-1]})  # the other methods at the extremes only
        for size in self.eval_batches[:2]:
            add("stock: HF generate", "stock", size, lambda b: lambda: hf_generate(m, b, ANSWER_TOKENS), "sdpa")
        for size in self.eval_batches:
            add("scoring: graphed prefill and continuation", "video", size,
                lambda b: GraphedScorer(m, b, use_graph=self.device.type == "cuda"), CLIP_ATTENTION)
        for size in ends:
            add("scoring: shared prefix + clip attention", "video", size, lambda b: CandidateScorer(m, b),
                CLIP_ATTENTION)
        for size in ends:
            add("generate: static KV + graph + clip attention", "video", size,
                lambda b: FastQuery(m, b, ANSWER_TOKENS, use_graph=self.device.type == "cuda"), CLIP_ATTENTION)

    def train(self) -> None:
        m = self.model
        m.vlm = _apply_training_setup(m.vlm, m.cfg)  # the project's LoRA: every LM linear layer, r=64
        m.projector.requires_grad_(True)
        m.train()
        base = m.base_vlm

        def add(lever: str, layout_key: str, size: int, logits_everywhere: bool, vision_attention: str,
                autocast: bool = True, uncast_adapters: bool = False) -> None:
            layout = self.layouts[layout_key]

            def measure() -> None:
                batch = self.workload.batch(layout, size, for_generation=False)
                optimizer = torch.optim.AdamW(parameter_groups(m), fused=self.device.type == "cuda")
                set_vision_attention(base, vision_attention)
                reset_peak_memory(self.device)
                try:
                    with layout.applied(m):
                        t = self.timer(train_step_fn(m, batch, optimizer, logits_everywhere, autocast,
                                                     uncast_adapters))
                finally:
                    set_vision_attention(base, "sdpa")
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
        add("  same without autocast (fp32 adapter matmuls)", "video", big, False, CLIP_ATTENTION, autocast=False)
        for size in self.train_batches:
            add("+ clip attention, batched", "video", size, False, CLIP_ATTENTION)
        for size in self.train_batches[-2:]:
            add("+ adapter inputs not cast to fp32", "video", size, False, CLIP_ATTENTION, uncast_adapters=True)

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
    set_vision_attention(base, CLIP_ATTENTION)
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
                             "for a 4 s question; 2 gives the 100 tokens of DESIGN.md's anchors)")
    parser.add_argument("--profile", action="store_true", help="profile one query and one training step only")
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
    for name in ("meta", "build", "checks", "query", "evaluation", "train", "summary"):
        log(f"section {name} ({time.perf_counter() - t0:.0f} s in)")
        getattr(run, name)()
    run.print_table()
    return run.results


if __name__ == "__main__":
    main()
