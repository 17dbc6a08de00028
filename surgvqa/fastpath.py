"""The CUDA fast path of ``surgvqa.scoring``, built on the stock transformers modules (nothing is patched).

* ``StaticKVDecoder``: the language model continuing a prompt over a preallocated KV cache with fixed
  shapes, so that a greedy decoding step can be captured as a CUDA graph and replayed per token.
* ``CandidateScorer``: every label's answer sentence scored over the shared prompt, logits only where
  scored, one host read.
* ``answer_and_score``: what ``surgvqa.inference`` runs on CUDA (notebooks 05 and 07, training-time evaluation):
  the plain path's prefill (the towers on packed attention, as everywhere), the candidates over a static
  copy of its cache, the greedy answer over another, replayed as a CUDA graph per token.

It computes what ``surgvqa.scoring`` computes (tests/test_model.py on a CPU with graphs off; ``benchmarks/gpu.py``
on CUDA), where ``benchmarks/NOTES.md`` has what each piece gains on an H200 at 7B shapes.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import scoring
from .collate import IGNORE_INDEX
from .model import AudioGraftedVLM
from .scoring import CandidateScores, Prefill, candidate_scores, candidate_token_rows


# --- decoding and scoring over a preallocated KV cache ---------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticKVDecoder:
    """The language model (Qwen2's or Qwen3's decoder layers) continuing a prompt over a preallocated KV cache, with fixed shapes.

    The prompt (vision, audio, M-RoPE) runs through stock transformers once; its cache is copied into
    buffers of a fixed length, and the tokens after it run through the same decoder layers here. After the
    prompt every position is text, where M-RoPE's three position streams are equal, so the rotation is the
    ordinary 1-D one from the same inv_freq. Every shape is fixed and nothing reads back to the host, so a
    decoding step can be captured as a CUDA graph: one replay per token instead of ~600 kernel launches.
    """

    def __init__(self, base: torch.nn.Module, batch: int, max_length: int,
                 dtype: torch.dtype | None = None):
        lm = base.model.language_model
        cfg = lm.config
        self.layers, self.norm, self.lm_head, self.embed = lm.layers, lm.norm, base.lm_head, lm.embed_tokens
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
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
            q = attn.q_proj(h).view(batch, steps, self.heads, self.head_dim)
            k = attn.k_proj(h).view(batch, steps, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3's decoder normalises each head's query and key before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
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


class CandidateScorer:
    """Each label's answer sentence scored over the shared prompt: one prefill, then all candidates of the
    batch in one forward over the static KV cache, with logits only at the scored positions and one
    host read at the end (the plain path reads each candidate's total separately)."""

    def __init__(self, model: AudioGraftedVLM, batch: dict[str, Any], dtype: torch.dtype | None = None):
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
        return self.continue_from(scoring.prefill(self.model, self.batch))

    def continue_from(self, pre: Prefill) -> list[str]:
        """The most likely label of each sample after a prefill of the batch's prompts."""
        self.decoder.load_prompt(pre.cache, pre.mask, rows=self.owner)
        positions = pre.next_position[self.owner] + torch.arange(self.feed.shape[1], device=self.feed.device)
        return self.pick(pre.first, self.decoder.forward(self.feed, positions))

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
_decoders: "weakref.WeakKeyDictionary[AudioGraftedVLM, dict[tuple, StaticKVDecoder]]" = weakref.WeakKeyDictionary()


def _greedy_decoder(model: AudioGraftedVLM, batch: int, length: int, dtype: torch.dtype,
                    use_graph: bool) -> StaticKVDecoder:
    kept = _decoders.setdefault(model, {})
    key = (batch, -(-length // DECODER_BUCKET) * DECODER_BUCKET, dtype, use_graph)
    if key not in kept:
        while len(kept) >= KEPT_DECODERS:
            kept.pop(next(iter(kept)))
        kept[key] = StaticKVDecoder(model.base_vlm, batch, key[1], dtype)
    return kept[key]


@torch.no_grad()
def answer_and_score(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int, score: bool = True,
                     use_graph: bool = True) -> tuple[list[str] | None, list[CandidateScores] | None]:
    """What ``surgvqa.scoring.answers_and_scores`` computes, on the fast path: one prefill through the stock model,
    then the candidates scored over a static copy of its cache and the greedy
    answer decoded over another (a CUDA graph replayed per token when ``use_graph``). ``max_new_tokens`` 0:
    no answers; ``score`` False: no scores. The batch is a generation batch on the model's device."""
    pre = scoring.prefill(model, batch)
    mask, cache = pre.mask, pre.cache
    dtype = cache.layers[0].keys.dtype
    answers = scores = None
    if max_new_tokens:
        decoder = _greedy_decoder(model, mask.shape[0], mask.shape[1] + max_new_tokens, dtype, use_graph)
        first = pre.first.argmax(-1, keepdim=True)
        if use_graph and decoder.graph is None:
            decoder.load_prompt(cache, mask)
            decoder.tokens.copy_(first)
            decoder.positions.copy_(pre.next_position)
            decoder.capture()  # its warm-up steps write past the prompt: loaded again below
        decoder.load_prompt(cache, mask)
        tokens = decoder.greedy(first, pre.next_position, max_new_tokens - 1, stop_token=model.im_end_id)
        # a row's answer ends at its first end-of-turn (the plain path feeds finished rows padding instead)
        ended = (tokens == model.im_end_id).int().cumsum(dim=1) - (tokens == model.im_end_id).int() > 0
        tokens = tokens.masked_fill(ended, model.tokenizer.pad_token_id)
        answers = [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    if score:
        scorer = CandidateScorer(model, batch, dtype)
        scorer.continue_from(pre)
        scores = candidate_scores(batch["samples"], scorer.owners, scorer.labels, scorer.totals.tolist())
    return answers, scores
