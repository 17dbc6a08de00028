"""What a prompt is scored and answered with, on the plain path: the specification every faster path matches.

A generation batch's prompt runs once (``prefill``: the model's own positions from its rope index, the audio rows
in the embeddings, the key/value cache kept). From it, ``greedy_answers`` decodes the free-text answer and
``candidate_totals`` scores each candidate answer sentence (the cache repeated for each candidate, every
candidate of the batch in one more forward); ``candidate_scores`` reduces the totals to each sample's label
and probabilities. ``candidate_token_rows`` says which token rows are scored for which sample.

``surgvqa.fastpath`` computes the same on CUDA over a static cache; ``surgvqa.inference`` chooses the path.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import data
from .model import AudioGraftedVLM

# Greedy answers stop at end-of-turn or after this many tokens (the data's longest answer sentence is 12 tokens in
# the Qwen2 vocabulary; zero-shot models say more).
MAX_NEW_TOKENS = 32


@dataclass
class CandidateScores:
    uid: str
    label: str  # the most likely label of the question type
    probabilities: dict[str, float]  # over the type's label set (softmax of the log-likelihoods)
    log_likelihoods: dict[str, float]  # of each label's answer sentence + end-of-turn


def audio_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    keys = ("audio_features", "audio_encoded", "audio_lengths", "audio_rows")
    return {k: batch[k] for k in keys if k in batch}


def candidate_token_rows(model: AudioGraftedVLM, samples: Sequence[data.Sample]
                         ) -> tuple[list[int], list[str], list[list[int]]]:
    """(owning sample index, label, token ids) of every candidate answer of every sample, in order."""
    owners, labels, rows = [], [], []
    for i, s in enumerate(samples):
        texts, complete = data.candidate_answers(s.question_type, model.cfg)
        for label, text in texts.items():
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            owners.append(i)
            labels.append(label)
            rows.append(ids + [model.im_end_id] if complete else ids)
    return owners, labels, rows


def candidate_scores(samples: Sequence[data.Sample], owners: Sequence[int], labels: Sequence[str],
                     totals: Sequence[float]) -> list[CandidateScores]:
    """Each sample's scores from the log-likelihood of every candidate (rows as ``candidate_token_rows``)."""
    results = []
    for i, s in enumerate(samples):
        ll = {labels[r]: float(totals[r]) for r, o in enumerate(owners) if o == i}
        probs = torch.softmax(torch.tensor(list(ll.values()), dtype=torch.float64), dim=0).tolist()
        results.append(CandidateScores(uid=s.uid, label=max(ll, key=ll.get), probabilities=dict(zip(ll, probs)),
                                       log_likelihoods=ll))
    return results


@dataclass
class Prefill:
    """A generation batch's prompt run once: its key/value cache, the log-probabilities of the first answer
    token, and the position of that token (the prompt's last position + 1, per row)."""

    cache: Any
    first: torch.Tensor  # (batch, vocab)
    mask: torch.Tensor  # the prompt's attention mask
    next_position: torch.Tensor  # (batch, 1)


class ClipVision:
    """The vision tower's output for every clip a model has answered about, so that the next pass over the same
    rows (05 asks each test clip six ways, 08 its hundred clips in every condition) reuses it instead of running
    the tower again: the stock forward takes it as ``mm_encoder_outputs``.

    Kept per clip (its video and frames, ``Sample.clip_key``) and patch grid, so it holds for one model answering
    with one frames setting while its vision tower's weights stay as they are: ``keep_clip_vision`` switches it
    on for a model that only answers (the adapters never reach the vision tower). The outputs are kept in host
    memory and moved to the model's device batch by batch: at 7B, 1,000 clips of 672 tokens are about 4.8 GB, which a
    24 GB card cannot spare. Clips that arrive as images are run by the stock path as before.
    """

    def __init__(self) -> None:
        self.clips: dict[tuple, tuple[torch.Tensor, list[torch.Tensor] | None]] = {}
        self.output_class: type | None = None
        self.computed = 0  # clips the vision tower ran for

    def vision_inputs(self, base: Any, batch: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
        """``vision`` (the stock forward's clip arguments) with the clips' pixels replaced by their tower outputs."""
        pixels, grids = vision.get("pixel_values_videos"), vision.get("video_grid_thw")
        if pixels is None or grids is None or vision.get("pixel_values") is not None or "samples" not in batch:
            return vision
        patches = grids.prod(-1).tolist()
        if len(batch["samples"]) != len(grids) or sum(patches) != len(pixels):
            raise ValueError(f"{len(batch['samples'])} rows, {len(grids)} clips and {len(pixels)} patch rows for "
                             f"{sum(patches)} patches: the batch's clips are not one a row")
        keys = [(s.clip_key, tuple(grid)) for s, grid in zip(batch["samples"], grids.tolist())]
        starts = [0, *itertools.accumulate(patches)]
        first_row: dict[tuple, int] = {}
        for i, key in enumerate(keys):
            first_row.setdefault(key, i)
        missing = [i for key, i in first_row.items() if key not in self.clips]
        if missing:
            out = base.model.get_video_features(
                torch.cat([pixels[starts[i]:starts[i] + patches[i]] for i in missing]), grids[missing],
                return_dict=True)
            deepstack = getattr(out, "deepstack_features", None)  # Qwen3-VL's features for its DeepStack layers
            for j, i in enumerate(missing):
                self.clips[keys[i]] = (out.pooler_output[j].cpu(),
                                       None if deepstack is None else [d[j].cpu() for d in deepstack])
            self.output_class, self.computed = type(out), self.computed + len(missing)
        kept = [self.clips[k] for k in keys]
        on = pixels.device
        extra = {} if kept[0][1] is None else {
            "deepstack_features": [tuple(layers[n].to(on) for _, layers in kept) for n in range(len(kept[0][1]))]}
        outputs = self.output_class(pooler_output=tuple(pooled.to(on) for pooled, _ in kept), **extra)
        return {**{k: v for k, v in vision.items() if k != "pixel_values_videos"},
                "mm_encoder_outputs": {"video": outputs}}


def keep_clip_vision(model: AudioGraftedVLM) -> ClipVision:
    """Reuse the vision tower's output per clip from now on (``ClipVision``, read by ``prefill``, which the CUDA
    fast path runs too), for a model that only answers; refused where an adapter reaches into the vision tower,
    whose output it would then change."""
    adapted = [name for name, _ in model.base_vlm.model.visual.named_modules() if "lora_" in name]
    if adapted:
        raise ValueError(f"the vision tower carries adapter layers ({adapted[0]}, ...): its output is not fixed")
    model.clip_vision = ClipVision()
    return model.clip_vision


def prefill(model: AudioGraftedVLM, batch: dict[str, Any]) -> Prefill:
    """The prompt through the stock model (``Backbone.prompt_inputs``) with the positions from the model's own
    rope index (and the clips' kept vision outputs, where ``keep_clip_vision`` is on)."""
    base = model.base_vlm
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, rope_deltas = model.backbone.rope_index(base, batch)
    embeds = model.embed(ids, samples=batch.get("samples"), **audio_inputs(batch))
    vision = model.backbone.vision_inputs(batch)
    if model.clip_vision is not None:
        vision = model.clip_vision.vision_inputs(base, batch, vision)
    prefix = base.model(**model.backbone.prompt_inputs(base, batch, embeds, positions), attention_mask=mask,
                        mm_token_type_ids=batch["mm_token_type_ids"], use_cache=True, **vision)
    first = torch.log_softmax(base.lm_head(prefix.last_hidden_state[:, -1]).float(), dim=-1)
    # Text positions continue after the prompt's last position (rope_deltas shift past the vision grid).
    return Prefill(prefix.cache, first, mask, mask.sum(dim=1, keepdim=True) + rope_deltas)


def greedy_answers(model: AudioGraftedVLM, pre: Prefill, max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy decoding on a prefill's cache (text positions continue after the prompt; finished rows are fed
    padding); returns the answers and the number of tokens it added to the cache."""
    base, pad = model.base_vlm, model.tokenizer.pad_token_id
    token = pre.first.argmax(-1)
    done = token == model.im_end_id
    tokens, mask = [token], pre.mask
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        hidden = base.model(input_ids=token[:, None], attention_mask=mask, cache=pre.cache, use_cache=True,
                            position_ids=model.backbone.text_positions(pre.next_position + step - 1)).last_hidden_state
        token = base.lm_head(hidden[:, -1]).argmax(-1).masked_fill(done, pad)  # finished rows only pad
        done = done | (token == model.im_end_id)
        tokens.append(token)
    texts = model.tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True)
    return [t.strip() for t in texts], len(tokens) - 1


def candidate_totals(model: AudioGraftedVLM, pre: Prefill, owners: Sequence[int],
                     rows: Sequence[Sequence[int]]) -> list[float]:
    """The log-likelihood of each token row after its owner's prompt: the prefill's cache is repeated for
    each row (in place) and every row of the batch is scored in one more forward."""
    base = model.base_vlm
    device = pre.mask.device
    owner = torch.tensor(owners, device=device)
    pre.cache.batch_select_indices(owner)
    # Feed every candidate token but the last; the prompt's last position already predicted the first. When
    # every candidate is one token (a small tokenizer can have whole answers as tokens), nothing is fed.
    length = max(len(r) for r in rows) - 1
    if length:
        feed = torch.full((len(rows), length), model.tokenizer.pad_token_id, dtype=torch.long, device=device)
        feed_mask = torch.zeros_like(feed)
        for r, row in enumerate(rows):
            feed[r, : len(row) - 1] = torch.tensor(row[:-1], device=device)
            feed_mask[r, : len(row) - 1] = 1
        positions = model.backbone.text_positions(pre.next_position[owner] + torch.arange(length, device=device))
        cont = base.model(input_ids=feed, attention_mask=torch.cat([pre.mask[owner], feed_mask], dim=1),
                          position_ids=positions, cache=pre.cache, use_cache=True)
        logp = torch.log_softmax(base.lm_head(cont.last_hidden_state).float(), dim=-1)

    totals = []
    for r, row in enumerate(rows):
        total = pre.first[owners[r], row[0]]
        if len(row) > 1:
            total = total + logp[r, torch.arange(len(row) - 1), torch.tensor(row[1:])].sum()
        totals.append(float(total))
    return totals


def scores(model: AudioGraftedVLM, pre: Prefill, samples: Sequence[data.Sample]) -> list[CandidateScores]:
    """Every sample's candidate scores from a prefill (see ``candidate_totals``)."""
    owners, labels, rows = candidate_token_rows(model, samples)
    return candidate_scores(samples, owners, labels, candidate_totals(model, pre, owners, rows))


def answered_prefill(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int
                     ) -> tuple[list[str], Prefill]:
    """The greedy answers, and the prefill they were decoded on with its cache cut back to the prompt, ready to
    score candidates after the same run of the prompt."""
    pre = prefill(model, batch)
    answers, added = greedy_answers(model, pre, max_new_tokens)
    if added:
        pre.cache.crop(-added)
    return answers, pre


def answers_and_scores(model: AudioGraftedVLM, batch: dict[str, Any], max_new_tokens: int
                       ) -> tuple[list[str], list[CandidateScores]]:
    """Greedy answers and candidate scores from ONE run of the prompt."""
    answers, pre = answered_prefill(model, batch, max_new_tokens)
    return answers, scores(model, pre, batch["samples"])
