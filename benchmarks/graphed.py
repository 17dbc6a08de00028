"""The graphed prompt paths that only benchmarks/gpu.py times: the prompt's host reads done once ahead, its
launch-bound parts (Whisper + projector, the vision tower, the candidates' continuation, greedy decoding) replayed
as CUDA graphs. They are measured against the package's own paths (surgvqa.scoring, surgvqa.fastpath), which the
notebooks run; what each gains at 7B shapes is in benchmarks/NOTES.md.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from surgvqa import scoring
from surgvqa.fastpath import CandidateScorer, StaticKVDecoder, capture_graph
from surgvqa.model import AudioGraftedVLM
from surgvqa.scoring import audio_inputs


def set_text_attention(base: torch.nn.Module, name: str) -> None:
    # Read at every forward by the decoder layers; set on the config object they hold, no re-validation.
    base.model.language_model.config._attn_implementation = name


def model_inputs(model: AudioGraftedVLM, batch: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-VL's forward takes from a batch, with the audio rows in the embeddings."""
    embeds = model.embed(batch["input_ids"], samples=batch.get("samples"), **audio_inputs(batch))
    return dict(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"], **model.backbone.vision_inputs(batch))


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

    def __init__(self, model: AudioGraftedVLM, batch: dict[str, Any], use_graph: bool):
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        self.model, self.batch = model, batch
        base = model.base_vlm
        visual = base.model.visual
        host = {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        positions, deltas = model.backbone.rope_index(base, host)
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


class GraphedScorer:
    """Candidate scoring with the graphed prefill and the candidates' continuation replayed as a graph."""

    def __init__(self, model: AudioGraftedVLM, batch: dict[str, Any], use_graph: bool):
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

    def __init__(self, model: AudioGraftedVLM, batch: dict[str, Any], n_tokens: int, use_graph: bool):
        self.model, self.batch, self.n_tokens = model, batch, n_tokens
        length = batch["input_ids"].shape[1] + n_tokens
        self.decoder = StaticKVDecoder(model.base_vlm, batch["input_ids"].shape[0], length)
        if use_graph:
            # A real prompt in the buffers, so that the capture's warm-up steps run on real values.
            pre = scoring.prefill(model, batch)
            self.decoder.load_prompt(pre.cache, pre.mask)
            self.decoder.tokens.copy_(pre.first.argmax(-1, keepdim=True))
            self.decoder.positions.copy_(pre.next_position)
            self.decoder.capture()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        pre = scoring.prefill(self.model, self.batch)
        self.decoder.load_prompt(pre.cache, pre.mask)
        return self.decoder.greedy(pre.first.argmax(-1, keepdim=True), pre.next_position, self.n_tokens - 1)
