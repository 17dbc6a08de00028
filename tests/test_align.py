"""Projector alignment: the heard question's answer distribution is pulled to the written one's, and only the
projector moves."""
from __future__ import annotations

import csv

import pytest
import torch

from surgvqa import audio, data
from surgvqa.align import ALIGN_LOG, AlignmentRows, adapter_off, align_projector, distillation
from surgvqa.config import get_config
from surgvqa.model import build_model
from surgvqa.train import train


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    # the shipped tiny VLM reads its questions; its projector starts random, as a real preset's does
    cfg = get_config(audio_dir=str(root / "audio"), pretrained_projector=False, align_steps=60, batch_size=8,
                     projector_lr=3e-3, warmup_steps=3, eval_every=20, extra_train_engines=(), train_noise=0.25)
    rows = data.limited(data.load_split(cfg)["train"], 40, 0)
    manifest = audio.synthesize_split(rows, "train", cfg, progress=False)
    return cfg, rows, dict(zip(manifest.uid, manifest.path)), root


def measured(model, rows, paths, cfg):
    aligner = AlignmentRows(model)
    mels = [aligner.collate.log_mel(s, audio.load_question_audio(s.uid, paths[s.uid], cfg)) for s in rows]
    model.eval()
    with torch.no_grad(), adapter_off(model):
        kl, agreement = distillation(model, *aligner.batch(rows, mels))
    return float(kl), agreement


def test_alignment_makes_the_heard_answer_the_written_one_and_moves_only_the_projector(setting):
    cfg, rows, paths, root = setting
    model = build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("projector.")}
    projector = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kl_before, agreement_before = measured(model, rows, paths, cfg)
    lines = []
    result = align_projector(model, rows, paths, cfg, root, lines.append)
    kl_after, agreement_after = measured(model, rows, paths, cfg)
    print(f"KL {kl_before:.3f} -> {kl_after:.3f}, agreement {agreement_before:.3f} -> {agreement_after:.3f}; {result}")
    assert kl_after < 0.2 * kl_before and agreement_after > max(0.9, agreement_before + 0.2)
    assert result["kl_last"] < result["kl_first"] and result["utterances"] == 60 * 8
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, projector[n]) for n, p in model.projector.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # put back for fine-tuning
    with open(root / ALIGN_LOG) as f:
        logged = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged] == list(range(1, 61))
    assert [line.split(":")[0] for line in lines] == [f"[align] step {s}/60" for s in (20, 40, 60)]


def test_alignment_refuses_a_text_only_run_and_missing_audio(setting):
    cfg, rows, paths, _ = setting
    text_only = cfg.replace(question_mode="text")  # a config inference may use (05 reads a run's cfg this way)
    with pytest.raises(ValueError, match="needs heard questions"):
        train(text_only)
    with pytest.raises(KeyError, match="no question audio for 1 sample"):
        align_projector(build_model(cfg), rows, {k: v for k, v in list(paths.items())[1:]}, cfg, log=lambda *_: None)
