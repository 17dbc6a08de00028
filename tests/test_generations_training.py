"""The later generations (Qwen2.5-VL, Qwen3-VL) at tiny shapes, random weights, through what tests/test_train.py
shows for the tiny Qwen2-VL: a saved checkpoint loaded in 4-bit nf4 trains its adapter, a merged export scores
as the adapter does, and an interrupted run resumes to the uninterrupted run's numbers."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from torch import nn

from surgvqa import backbones as B
from surgvqa import get_config
from surgvqa import inference as I
from surgvqa import model as M
from surgvqa.train import train

from test_collate import make_items
from test_generations import SIZE, graft, one_torch_thread, train_steps, samples, whisper  # noqa: F401 (fixtures)
from test_model import tiny_config

LATER = [B.QWEN2_5_VL, B.QWEN3_VL, B.QWEN2_5_OMNI]  # Qwen2-VL: tests/test_train.py


@pytest.fixture(scope="module", params=LATER, ids=lambda b: b.name)
def backbone(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(backbone, whisper, samples, tmp_path_factory):
    """A tiny graft of the generation whose adapter (and output layer) took a few steps, saved: ``vlm/`` holds the
    base weights with the tokenizer, ``adapter/`` what the steps changed."""
    model = graft(backbone, whisper)
    train_steps(model, M.collator(model)(make_items(samples, size=SIZE)), 3)
    return M.save_checkpoint(model, tmp_path_factory.mktemp(backbone.name) / "run")


def native(backbone: B.Backbone) -> dict:
    """What a natively hearing model's config needs: no Whisper outputs to cache (it has no Whisper)."""
    return dict(cache_audio_features=False) if backbone.hears_natively else {}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("audio"))


def linear_layers(base: nn.Module) -> tuple[set[str], set[str]]:
    """(names of the bitsandbytes 4-bit linear layers, of the other linear layers) of a VLM, LoRA's own left out;
    a LoRA-wrapped layer is named as the layer it wraps."""
    import bitsandbytes as bnb

    quantized, full = set(), set()
    for name, module in base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.quant_type == "nf4", name
            quantized.add(name.removesuffix(".base_layer"))
        elif isinstance(module, nn.Linear) and ".lora_" not in name:
            full.add(name)
    return quantized, full


def test_a_saved_checkpoint_loads_in_4bit_nf4_and_trains_its_adapter(backbone, checkpoint, whisper, samples):
    cfg = tiny_config(frame_size=SIZE, vlm=str(checkpoint / "vlm"), vlm_from_scratch=False, load_in_4bit=True,
                      **native(backbone))
    built = M.build_model(cfg, whisper=whisper)  # what training loads: a fresh adapter on the 4-bit base
    reloaded = M.load_checkpoint(checkpoint, trainable=True, load_in_4bit=True)  # the saved adapter on it
    for model in (built, reloaded):
        assert model.backbone is backbone
        quantized, full = linear_layers(model.base_vlm)
        kept = backbone.not_quantized
        # every linear layer of the language model (each one carries the adapter) is nf4, nothing else is
        adapted = {n for n, _ in model.base_vlm.named_modules() if re.fullmatch(backbone.lora_target, n)}
        assert quantized == adapted and len(quantized) == 7 * model.base_vlm.config.text_config.num_hidden_layers
        assert full and all(n.startswith(kept) for n in full)
        assert any(n.startswith("model.visual.") for n in full) and any(n.startswith("lm_head") for n in full)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or n.startswith("projector.") or ".modules_to_save." in n
                                 for n in trainable)
        losses = train_steps(model, M.collator(model)(make_items(samples, size=SIZE)), 2)
        assert all(torch.isfinite(torch.tensor(losses))), (backbone.name, losses)
        assert backbone.hears_natively or model.projector.linear.weight.grad is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.named_parameters() if "lora_B" in n)


def test_a_merged_export_scores_the_candidates_as_the_adapter_does(backbone, checkpoint, samples, tmp_path):
    """``python -m surgvqa merge`` on a LoRA checkpoint of the generation: the same answers and candidates on
    eval rows, the merged checkpoint a full VLM of the generation that scores as the adapter does."""
    merged_dir = tmp_path / "merged"
    assert I.merge_main([str(checkpoint), "--out", str(merged_dir), "--rows", "8", "--batch-size", "8"]) == 0
    parity = json.loads((merged_dir / "merge_parity.json").read_text())
    assert parity["n"] == 8 and not parity["quantized_adapter"]
    assert parity["answer_agreement"] == 1 and parity["candidate_agreement"] == 1
    assert parity["max_abs_logprob_diff"] < 1e-3
    adapter, merged = M.load_checkpoint(checkpoint), M.load_checkpoint(merged_dir)
    assert merged.backbone is backbone and not merged.cfg.lora and not (merged_dir / "adapter").exists()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # the adapter is in the weights: a language-model layer of the export is not the base's
    layer = "model.language_model.layers.0.self_attn.q_proj"
    base = adapter.base_vlm.get_submodule(layer).base_layer.weight
    assert not torch.allclose(merged.base_vlm.get_submodule(layer).weight, base, atol=1e-4)
    # the spoken questions (the graft's mode) too: projector and Whisper came along
    batch = M.collator(adapter)(make_items(samples, size=SIZE), for_generation=True)
    before, after = I.score_candidates(adapter, batch), I.score_candidates(merged, batch)
    assert [s.label for s in before] == [s.label for s in after]
    for a, b in zip(before, after):
        assert a.log_likelihoods.keys() == b.log_likelihoods.keys()
        for label in a.log_likelihoods:
            assert abs(a.log_likelihoods[label] - b.log_likelihoods[label]) < 1e-4


# four optimizer steps of four rows, evaluations at 2 and 4 on four rows: stopped at step 2 (a logging window's
# end, inside an epoch of 3 batches), so the resumed run also crosses into the next epoch
RESUME = dict(frame_size=SIZE, batch_size=4, limit_train=12, eval_limit=4, max_steps=4, eval_every=2, patience=10,
              question_mode="mixed", lora=True, lora_r=8, vlm_from_scratch=False, pretrained_projector=False)


# slow: three training runs (uninterrupted, interrupted, resumed), each loading Whisper tiny.en, the rows and
# their spoken questions and evaluating twice: 3-5 s
@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_resume_reaches_the_same_final_metrics_as_an_uninterrupted_run(backbone, checkpoint, tmp_path, audio_dir,
                                                                       load_in_4bit, monkeypatch):
    if load_in_4bit:
        # as in tests/test_train.py: without bitsandbytes' CPU repack at the first inference pass, both runs use
        # the same kernels in every step
        monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)

    def cfg(run):
        return get_config("smoke", **RESUME, **native(backbone), vlm=str(checkpoint / "vlm"), load_in_4bit=load_in_4bit,
                          output_dir=str(tmp_path / run), audio_dir=audio_dir,
                          audio_features_dir=f"{audio_dir}/features")

    whole = train(cfg("a"), log=lambda *_: None)
    assert train(cfg("b"), stop_after=2, log=lambda *_: None) == {"interrupted_at": 2}
    resumed = train(cfg("b"), resume=True, log=lambda *_: None)
    assert whole["steps"] == resumed["steps"] == 4
    assert [h["step"] for h in whole["history"]] == [h["step"] for h in resumed["history"]] == [2, 4]
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    assert torch.tensor(whole["rank_checksums"]).allclose(torch.tensor(resumed["rank_checksums"]), rtol=1e-5)
    logs = [pd.read_csv(tmp_path / run / "log.csv").dropna(subset=["train_loss"]) for run in ("a", "b")]
    assert logs[0]["train_loss"].tolist() == pytest.approx(logs[1]["train_loss"].tolist(), rel=1e-5)
    best = M.load_checkpoint(tmp_path / "b" / "best")
    assert best.backbone is backbone and best.cfg.load_in_4bit == load_in_4bit
