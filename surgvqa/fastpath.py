"""GPU inference fast paths for the graft, built on the stock transformers modules (nothing is patched).

* ``ClipAttention``: the vision tower's attention as one batched SDPA call over clips of equal size, with
  no host read per layer (registered under ``CLIP_ATTENTION`` with transformers' AttentionInterface).
* ``StaticKVDecoder``: the language model continuing a prompt over a preallocated KV cache with fixed
  shapes, so greedy decoding steps (``FastQuery``) and the candidates' continuation can be CUDA graphs.
* ``CandidateScorer``: every label's answer sentence scored over the shared prompt, logits only where
  scored, one host read.
* ``GraphedPrefill`` / ``GraphedScorer``: the prompt's host reads (M-RoPE and vision positions, segment
  bounds) done once ahead; Whisper + projector, the vision tower and the continuation replayed as graphs.

* ``answer_and_score``: what ``surgvqa.inference.answer_and_score`` / ``score_candidates`` / ``generate`` run on
  CUDA (notebooks 05 and 07, training-time evaluation): a stock prefill with clip attention, the candidates
  over a static copy of its cache, the greedy answer over another, replayed as a CUDA graph per token.

Each path computes what ``surgvqa.inference.score_candidates`` / ``generate`` compute on the plain path (checked
by ``benchmarks/gpu.py`` on every run and by its CPU smoke test, and ``answer_and_score`` by tests/test_model.py);
on a CPU the same code runs without graphs.
``benchmarks/NOTES.md`` has what each one gains on an H200 at 7B shapes.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .collate import IGNORE_INDEX
from .inference import CandidateScores, audio_inputs, candidate_scores, candidate_token_rows, vision_inputs
from .model import AudioGraftedQwen2VL

# Vision attention routed to a registered function. transformers passes the packed sequence with its
# cu_seqlens only to implementations whose name contains "flash" (is_flash_attention_requested); any other
# name gets one call per image/frame after a `lengths.tolist()` host sync in every vision layer.
CLIP_ATTENTION = "flash_api_equal_clips_sdpa"

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
        self.packed_calls = 0  # calls over a packed sequence: one a vision layer

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
        heads, total, dim = query.shape[1:]  # (1, heads, patches, dim)
        if cu_seq_lens_q is None:
            raise ValueError(f"{CLIP_ATTENTION} needs the packed sequence's cu_seq_lens (the vision tower passes "
                             f"them to attention functions whose name contains 'flash')")
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


_registered: ClipAttention | None = None


def register_clip_attention() -> ClipAttention:
    """The registered clip attention (registered at the first call; its call counters are shared)."""
    global _registered
    from transformers import AttentionInterface

    if _registered is None:
        _registered = ClipAttention()
        AttentionInterface.register(CLIP_ATTENTION, _registered)
    return _registered


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

    def __init__(self, base: Qwen2VLForConditionalGeneration, batch: int, max_length: int,
                 dtype: torch.dtype | None = None):
        lm = base.model.language_model
        cfg = lm.config
        self.layers, self.norm, self.lm_head, self.embed = lm.layers, lm.norm, base.lm_head, lm.embed_tokens
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = lm.rotary_emb.inv_freq
        self.rope_scale = getattr(lm.rotary_emb, "attention_scaling", 1.0)
        weight = base.lm_head.weight
        shape = (len(self.layers), batch, self.kv_heads, max_length, self.head_dim)
        # the prompt cache's dtype (4-bit preparation keeps hidden states in fp32 where the lm_head is bf16)
        self.keys = torch.zeros(shape, dtype=dtype or weight.dtype, device=weight.device)
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
        for layer, cached in enumerate(cache.layers):
            k, v = cached.keys, cached.values
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
        cos = (angles.cos() * self.rope_scale).to(self.keys.dtype)[:, None]
        sin = (angles.sin() * self.rope_scale).to(self.keys.dtype)[:, None]
        batch = tokens.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k, v = (t.to(self.keys.dtype) for t in (q, k, v))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.keys[i].index_copy_(2, new_slots, k)
            self.values[i].index_copy_(2, new_slots, v)
            out = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=visible[:, None],
                                                 enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, steps, -1).to(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.next_slot += steps
        return self.norm(x)

    def _greedy_step(self) -> None:
        hidden = self.forward(self.tokens, self.positions)
        self.tokens.copy_(self.lm_head(hidden[:, -1]).argmax(-1, keepdim=True))
        self.positions += 1

    def capture(self) -> None:
        """Record one greedy step as a CUDA graph."""
        self.graph = capture_graph(self._greedy_step)

    def greedy(self, first_tokens: torch.Tensor, first_positions: torch.Tensor, steps: int,
               stop_token: int | None = None) -> torch.Tensor:
        """``steps`` greedy tokens after the first (which the prompt's last position predicted); with
        ``stop_token``, fewer once every row has produced it (one host read a step, as the plain path)."""
        self.tokens.copy_(first_tokens)
        self.positions.copy_(first_positions)
        out = [first_tokens.clone()]
        done = first_tokens[:, 0] == stop_token if stop_token is not None else None
        for _ in range(steps):
            if done is not None and bool(done.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self._greedy_step()
            out.append(self.tokens.clone())
            if done is not None:
                done = done | (self.tokens[:, 0] == stop_token)
        return torch.cat(out, dim=1)


# --- the prompt through stock Qwen2-VL, and the fast paths after it ------------------------------------

def model_inputs(model: AudioGraftedQwen2VL, batch: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-VL's forward takes from a batch, with the audio rows in the embeddings."""
    embeds = model.embed(batch["input_ids"], samples=batch.get("samples"), **audio_inputs(batch))
    return dict(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"], **vision_inputs(batch))


@torch.no_grad()
def prefill(model: AudioGraftedQwen2VL, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prompt through stock Qwen2-VL: (log-probs of the next token, KV cache, first text position)."""
    base = model.base_vlm
    out = base.model(**model_inputs(model, batch), use_cache=True)
    logp = torch.log_softmax(base.lm_head(out.last_hidden_state[:, -1]).float(), dim=-1)
    # Positions continue after the prompt's last M-RoPE position (rope_deltas shift past the vision grid).
    next_position = batch["attention_mask"].sum(dim=1, keepdim=True) + base.model.rope_deltas
    return logp, out.cache, next_position


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
        rows = m.projector(m.whisper_states(self.mel).to(m.projector.linear.weight.dtype))
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
        s.decoder.load_prompt(out.cache, self.prefill.batch["attention_mask"], rows=s.owner)
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
    host read at the end (surgvqa.inference.score_candidates reads each candidate's total separately)."""

    def __init__(self, model: AudioGraftedQwen2VL, batch: dict[str, Any], dtype: torch.dtype | None = None):
        self.model, self.batch = model, batch
        owners, labels, rows = candidate_token_rows(model, batch["samples"])
        self.owners = owners
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
        self.decoder = StaticKVDecoder(model.base_vlm, len(rows), batch["input_ids"].shape[1] + self.feed.shape[1],
                                       dtype)

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


# --- the project's inference on the fast path ----------------------------------------------------------

# Greedy decoders kept per model and shape, so that a batch of a shape seen before replays its captured
# graph: KV buffers are rounded up to this many tokens (prompts of one study differ by a few tokens).
DECODER_BUCKET = 256
KEPT_DECODERS = 4
_decoders: "weakref.WeakKeyDictionary[AudioGraftedQwen2VL, dict[tuple, StaticKVDecoder]]" = weakref.WeakKeyDictionary()


def release_buffers(model: AudioGraftedQwen2VL) -> None:
    """Drop the model's kept decoders and their graphs (training frees them after each evaluation)."""
    _decoders.pop(model, None)


def _greedy_decoder(model: AudioGraftedQwen2VL, batch: int, length: int, dtype: torch.dtype,
                    use_graph: bool) -> StaticKVDecoder:
    kept = _decoders.setdefault(model, {})
    key = (batch, -(-length // DECODER_BUCKET) * DECODER_BUCKET, dtype, use_graph)
    if key not in kept:
        while len(kept) >= KEPT_DECODERS:
            kept.pop(next(iter(kept)))
        kept[key] = StaticKVDecoder(model.base_vlm, batch, key[1], dtype)
    return kept[key]


@contextlib.contextmanager
def clip_attention(model: AudioGraftedQwen2VL):
    """The vision tower on the batched clip attention for the duration (restored after)."""
    register_clip_attention()
    visual = model.base_vlm.model.visual
    before = visual.config._attn_implementation
    set_vision_attention(model.base_vlm, CLIP_ATTENTION)
    try:
        yield
    finally:
        set_vision_attention(model.base_vlm, before)


@torch.no_grad()
def answer_and_score(model: AudioGraftedQwen2VL, batch: dict[str, Any], max_new_tokens: int, score: bool = True,
                     use_graph: bool = True) -> tuple[list[str] | None, list[CandidateScores] | None]:
    """What ``surgvqa.inference.answer_and_score`` computes, on the fast path: one prefill through stock
    Qwen2-VL (clip attention), then the candidates scored over a static copy of its cache and the greedy
    answer decoded over another (a CUDA graph replayed per token when ``use_graph``). ``max_new_tokens`` 0:
    no answers; ``score`` False: no scores. The batch is a generation batch on the model's device."""
    with clip_attention(model):
        logp_first, cache, next_position = prefill(model, batch)
    mask = batch["attention_mask"]
    dtype = cache.layers[0].keys.dtype
    answers = scores = None
    if max_new_tokens:
        decoder = _greedy_decoder(model, mask.shape[0], mask.shape[1] + max_new_tokens, dtype, use_graph)
        first = logp_first.argmax(-1, keepdim=True)
        if use_graph and decoder.graph is None:
            decoder.load_prompt(cache, mask)
            decoder.tokens.copy_(first)
            decoder.positions.copy_(next_position)
            decoder.capture()  # its warm-up steps write past the prompt: loaded again below
        decoder.load_prompt(cache, mask)
        tokens = decoder.greedy(first, next_position, max_new_tokens - 1, stop_token=model.im_end_id)
        # a row's answer ends at its first end-of-turn (the plain path feeds finished rows padding instead)
        ended = (tokens == model.im_end_id).int().cumsum(dim=1) - (tokens == model.im_end_id).int() > 0
        tokens = tokens.masked_fill(ended, model.tokenizer.pad_token_id)
        answers = [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    if score:
        scorer = CandidateScorer(model, batch, dtype)
        scorer.decoder.load_prompt(cache, mask, rows=scorer.owner)
        positions = next_position[scorer.owner] + torch.arange(scorer.feed.shape[1], device=scorer.feed.device)
        scorer.pick(logp_first, scorer.decoder.forward(scorer.feed, positions))
        scores = candidate_scores(batch["samples"], scorer.owners, scorer.labels, scorer.totals.tolist())
    return answers, scores
