import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from surgvqa import get_config
from surgvqa.config import REPO_ROOT
from surgvqa.model import load_checkpoint
from surgvqa.data import limited
from surgvqa.train import train

SMOKE = dict(max_steps=6, eval_every=2, batch_size=4, limit_train=12, eval_limit=6, frame_size=56, patience=10)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("audio"))


def smoke_cfg(tmp_path, audio_dir, **overrides):
    return get_config("smoke", **{**SMOKE, "output_dir": str(tmp_path / "run"), "audio_dir": audio_dir,
                                  "audio_features_dir": f"{audio_dir}/features", **overrides})


def test_limited_subset_covers_question_types_and_is_seeded():
    from surgvqa import data
    rows = data.published_split()["train"]
    picked = limited(rows, 40, seed=3)
    assert len(picked) == 40 and len({s.question_type for s in picked}) == 20
    assert [s.uid for s in picked] == [s.uid for s in limited(rows, 40, seed=3)]
    assert limited(rows, 0, seed=3) is rows


def test_training_logs_evaluates_and_keeps_the_best_checkpoint(tmp_path, audio_dir):
    cfg = smoke_cfg(tmp_path, audio_dir)
    summary = train(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    assert summary["steps"] == 6 and [h["step"] for h in summary["history"]] == [2, 4, 6]
    assert summary["ranks_in_sync"] and summary["processes"] == 1
    log = pd.read_csv(out / "log.csv")
    assert {"train_loss", "eval_loss", "eval_accuracy", "samples_per_s"} <= set(log.columns)
    assert log["train_loss"].dropna().iloc[-1] < log["train_loss"].dropna().iloc[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6
    best = max(summary["history"], key=lambda h: h["eval_accuracy"])
    assert summary["best_step"] == best["step"]
    model = load_checkpoint(out / "best")
    assert model.cfg.frame_size == 56


def test_training_from_cached_encoder_outputs_matches_running_whisper_every_step(tmp_path, audio_dir):
    from pathlib import Path

    runs = {}
    for cached in (True, False):
        cfg = smoke_cfg(tmp_path / str(cached), audio_dir, max_steps=4, cache_audio_features=cached)
        runs[cached] = train(cfg, log=lambda *_: None)["history"]
    assert [h["step"] for h in runs[True]] == [h["step"] for h in runs[False]] == [2, 4]
    for a, b in zip(runs[True], runs[False]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-4)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    assert len(list(Path(audio_dir, "features").glob("*-pool2/*.npy"))) >= SMOKE["limit_train"] // 2


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, audio_dir):
    # lr 0 freezes the model: eval loss never improves after the first evaluation
    cfg = smoke_cfg(tmp_path, audio_dir, lr=0.0, projector_lr=0.0, max_steps=20, patience=2,
                    early_stop_metric="eval_loss")
    summary = train(cfg, log=lambda *_: None)
    assert summary["stopped_early"] and summary["steps"] == 6 and summary["best_step"] == 2


def test_resume_reaches_the_same_final_metrics_as_an_uninterrupted_run(tmp_path, audio_dir):
    whole = train(smoke_cfg(tmp_path / "a", audio_dir), log=lambda *_: None)
    cfg_b = smoke_cfg(tmp_path / "b", audio_dir)
    assert train(cfg_b, stop_after=3, log=lambda *_: None) == {"interrupted_at": 3}
    resumed = train(cfg_b, resume=True, log=lambda *_: None)
    assert resumed["steps"] == whole["steps"]
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["step"] == b["step"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    assert torch.tensor(whole["rank_checksums"]).allclose(torch.tensor(resumed["rank_checksums"]), rtol=1e-5)


def test_resume_without_a_saved_state_says_so(tmp_path, audio_dir):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(smoke_cfg(tmp_path, audio_dir), resume=True)


def test_two_process_cpu_ddp_keeps_ranks_in_sync(tmp_path, audio_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO_ROOT / "configs/accelerate/cpu-2proc.yaml"), "-m", "surgvqa.train", "--preset", "smoke"]
    for k, v in {**SMOKE, "max_steps": 4, "output_dir": str(out), "audio_dir": audio_dir}.items():
        args += ["-p", f"{k}={v}"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_in_sync"]


def test_phantom_augmentation_adds_new_rendered_clips_to_each_epoch_only(tmp_path, audio_dir):
    from surgvqa.train import phantom_extra
    cfg = smoke_cfg(tmp_path, audio_dir, phantom_extra_per_epoch=5)
    first, states = phantom_extra(cfg, 0)
    second, _ = phantom_extra(cfg, 1)
    assert len(first) == 5 and set(states) == {s.uid for s in first}
    assert {s.uid for s in first}.isdisjoint({s.uid for s in second})  # new clips every epoch
    assert [s.uid for s in phantom_extra(cfg, 0)[0]] == [s.uid for s in first]  # seeded
    assert all(s.video_id not in ("002-001", "002-002", "002-003", "002-004") for s in first)
    summary = train(cfg.replace(max_steps=4, eval_every=4), log=lambda *_: None)
    assert summary["steps"] == 4 and summary["eval_rows"] == 6  # eval never sees the extra clips



def test_distillation_is_logged_and_eval_loss_stays_the_answer_loss(tmp_path, audio_dir):
    runs = {}
    for weight in (0.0, 1.0):
        # learning rates 0: both runs keep the same weights, so their evaluations must agree
        cfg = smoke_cfg(tmp_path / str(weight), audio_dir, question_mode="mixed", distill_weight=weight,
                        max_steps=4, eval_every=4, lr=0.0, projector_lr=0.0)
        runs[weight] = (train(cfg, log=lambda *_: None), pd.read_csv(tmp_path / str(weight) / "run" / "log.csv"))
    summary, log = runs[1.0]
    assert (log["distill_loss"].dropna() > 0).all() and log["distill_loss"].notna().any()
    assert runs[0.0][1]["distill_loss"].isna().all()
    # the teacher rows change the training loss, not what evaluation measures (the answer loss on eval)
    assert log["train_loss"].dropna().iloc[-1] > runs[0.0][1]["train_loss"].dropna().iloc[-1]
    assert summary["history"][-1]["eval_loss"] == pytest.approx(runs[0.0][0]["history"][-1]["eval_loss"], rel=1e-6)
