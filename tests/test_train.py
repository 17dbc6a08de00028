import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from surgvqa import data, get_config
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
    # the pretrained VLM at a fine-tuning rate (at 1e-3, six steps of four rows wander before they descend)
    cfg = smoke_cfg(tmp_path, audio_dir, lr=1e-4)
    summary = train(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    assert summary["steps"] == 6 and [h["step"] for h in summary["history"]] == [2, 4, 6]
    assert summary["ranks_in_sync"] and summary["processes"] == 1
    assert 0 <= summary["data_wait_fraction"] < 1
    log = pd.read_csv(out / "log.csv")
    assert {"train_loss", "eval_loss", "eval_accuracy", "samples_per_s"} <= set(log.columns)
    assert log["train_loss"].dropna().iloc[-1] < log["train_loss"].dropna().iloc[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6
    best = max(summary["history"], key=lambda h: h["eval_accuracy"])
    assert summary["best_step"] == best["step"]
    model = load_checkpoint(out / "best")
    assert model.cfg.frame_size == 56


def test_a_run_with_projector_alignment_aligns_first_and_fine_tunes_from_it(tmp_path, audio_dir):
    import csv
    import json

    cfg = smoke_cfg(tmp_path, audio_dir, align_steps=3, lora=True, max_steps=2)
    lines = []
    summary = train(cfg, log=lines.append)
    out = tmp_path / "run"
    aligned = json.loads((out / "align_summary.json").read_text())
    assert summary["alignment"] == aligned and aligned["steps"] == 3 and aligned["utterances"] == 3 * cfg.batch_size
    with open(out / "align_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    first_train = next(i for i, line in enumerate(lines) if line.startswith("[train] step"))
    assert any(line.startswith("[align] step 3/3") for line in lines[:first_train])  # before fine-tuning
    assert summary["steps"] == 2


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


@pytest.mark.parametrize("mode,grouped", [("audio", False), ("mixed", False), ("text", False), ("mixed", True)])
def test_resume_reaches_the_same_final_metrics_as_an_uninterrupted_run(tmp_path, audio_dir, mode, grouped):
    whole = train(smoke_cfg(tmp_path / "a", audio_dir, question_mode=mode, group_by_length=grouped),
                  log=lambda *_: None)
    cfg_b = smoke_cfg(tmp_path / "b", audio_dir, question_mode=mode, group_by_length=grouped)
    # step 4 ends a logging window (train_loss is a window's mean) and falls inside an epoch of 3 batches
    assert train(cfg_b, stop_after=4, log=lambda *_: None) == {"interrupted_at": 4}
    resumed = train(cfg_b, resume=True, log=lambda *_: None)
    assert resumed["steps"] == whole["steps"]
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["step"] == b["step"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    assert torch.tensor(whole["rank_checksums"]).allclose(torch.tensor(resumed["rank_checksums"]), rtol=1e-5)
    logs = [pd.read_csv(tmp_path / run / "run" / "log.csv").dropna(subset=["train_loss"]) for run in ("a", "b")]
    assert logs[0]["train_loss"].tolist() == pytest.approx(logs[1]["train_loss"].tolist(), rel=1e-5)


def test_qlora_resume_reaches_the_same_final_metrics(tmp_path, audio_dir, monkeypatch):
    # the shipped tiny VLM loaded in 4-bit nf4 (bitsandbytes' CPU backend): only the adapter and projector train
    from surgvqa.model import TINY_PRETRAINED_DIR

    # On an AVX512-BF16 CPU bitsandbytes repacks the 4-bit weights at their first inference pass, so the
    # uninterrupted run's steps 3-4 (after its step-2 evaluation) would use other kernels than the resumed run's
    # (measured 0.13 % and, with other weights, 0.74 % apart in eval loss). Without the repack both runs use the
    # same kernels everywhere, and a resume is compared exactly.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)

    qlora = dict(vlm=str(TINY_PRETRAINED_DIR), load_in_4bit=True, lora=True, lora_r=8, question_mode="mixed",
                 max_steps=4)
    whole = train(smoke_cfg(tmp_path / "a", audio_dir, **qlora), log=lambda *_: None)
    cfg_b = smoke_cfg(tmp_path / "b", audio_dir, **qlora)
    assert train(cfg_b, stop_after=2, log=lambda *_: None) == {"interrupted_at": 2}
    resumed = train(cfg_b, resume=True, log=lambda *_: None)
    assert [h["eval_loss"] for h in whole["history"]] == pytest.approx([h["eval_loss"] for h in resumed["history"]],
                                                                       rel=1e-5)
    assert torch.tensor(whole["rank_checksums"]).allclose(torch.tensor(resumed["rank_checksums"]), rtol=1e-5)
    trainable = cfg_b.path(cfg_b.output_dir) / "last" / "trainable.safetensors"
    from safetensors import safe_open

    with safe_open(str(trainable), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)


def test_last_holds_only_what_training_changes(tmp_path, audio_dir):
    cfg = smoke_cfg(tmp_path, audio_dir, max_steps=2)
    train(cfg, stop_after=2, log=lambda *_: None)
    last = cfg.path(cfg.output_dir) / "last"
    assert sorted(p.name for p in last.iterdir()) == ["config.json", "optimizer.pt", "rng-0.pt",
                                                      "trainable.safetensors", "trainer_state.json"]
    assert not list(last.parent.glob(".last.*"))  # the staging folder was renamed into place
    train(cfg, stop_after=1, log=lambda *_: None)  # a fresh run in the same folder
    assert len(list((last.parent / "tb").glob("events.*"))) == 1  # one run per TensorBoard folder


def test_resume_refuses_another_config_before_writing_anything(tmp_path, audio_dir):
    cfg = smoke_cfg(tmp_path, audio_dir)
    train(cfg, stop_after=2, log=lambda *_: None)
    saved = (cfg.path(cfg.output_dir) / "config.json").read_text()
    with pytest.raises(ValueError, match=r"lr \(saved 0.001, now 0.5\).*max_steps \(saved 6, now 9\)"):
        train(cfg.replace(lr=0.5, max_steps=9), resume=True)
    with pytest.raises(ValueError, match="audio_projector"):
        train(cfg.replace(audio_projector="vocab"), resume=True)
    assert (cfg.path(cfg.output_dir) / "config.json").read_text() == saved
    assert train(cfg.replace(num_workers=1), resume=True, log=lambda *_: None)["steps"] == 6  # a safe change


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(audio_dir):
    from surgvqa import model as M

    from test_collate import make_items
    from test_model import tiny_config, tiny_whisper

    torch.manual_seed(0)
    whisper = tiny_whisper()
    rows = limited(data.load_template("out"), 3, 0)
    items = make_items(rows, size=56)
    results = []
    for checkpointing in (False, True):
        model = M.build_model(tiny_config(gradient_checkpointing=checkpointing, lora_dropout=0.0), whisper=whisper).train()
        loss = model(**M.collator(model)(items)).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6)


def test_resume_without_a_saved_state_says_so(tmp_path, audio_dir):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(smoke_cfg(tmp_path, audio_dir), resume=True)


def _run_two_processes(out, audio_dir, **overrides):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO_ROOT / "configs/accelerate/cpu-2proc.yaml"), "-m", "surgvqa.train", "--preset", "smoke"]
    for k, v in {**SMOKE, "output_dir": str(out), "audio_dir": audio_dir, **overrides}.items():
        args += ["-p", f"{k}={v}"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_two_process_cpu_ddp_keeps_ranks_in_sync(tmp_path, audio_dir):
    summary = _run_two_processes(tmp_path / "ddp", audio_dir, max_steps=4)
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_in_sync"]


def test_two_processes_follow_the_one_process_schedule_in_mixed_mode_at_batch_1(tmp_path, audio_dir):
    # batch 1 in the mixed mode: many batches carry no audio, which leaves the projector without a gradient
    change = dict(question_mode="mixed", batch_size=1, max_steps=12, warmup_steps=2, eval_every=4, eval_limit=4,
                  audio_features_dir=f"{audio_dir}/features")
    summary = _run_two_processes(tmp_path / "ddp", audio_dir, **change)
    assert summary["processes"] == 2 and summary["steps"] == 12 and summary["ranks_in_sync"]
    one = train(smoke_cfg(tmp_path / "one", audio_dir, **change), log=lambda *_: None)
    assert one["steps"] == 12
    lrs = [pd.read_csv(path).dropna(subset=["lr"]).set_index("step")["lr"]
           for path in (tmp_path / "ddp" / "log.csv", tmp_path / "one" / "run" / "log.csv")]
    assert lrs[0].index.tolist() == [4, 8, 12] and lrs[0].tolist() == pytest.approx(lrs[1].tolist(), abs=0)
    # the cosine after warmup: half way (step 7) at half the rate, 0 at the end
    lr = get_config("smoke").lr
    assert lrs[0][8] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 6 / 10)))
    assert lrs[0][12] == 0


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_a_merged_export_answers_like_the_adapter(tmp_path, audio_dir, load_in_4bit):
    """``python -m surgvqa merge``: LoRA (and QLoRA, merged into the unquantised base) folded into the
    weights answers the eval rows as the adapter does; the parity is written beside the merged model."""
    from surgvqa.inference import merge_main
    from surgvqa.model import TINY_PRETRAINED_DIR

    cfg = smoke_cfg(tmp_path, audio_dir, vlm=str(TINY_PRETRAINED_DIR), lora=True, lora_r=8, frame_size=112,
                    load_in_4bit=load_in_4bit, max_steps=4, question_mode="text")
    train(cfg, log=lambda *_: None)
    best = cfg.path(cfg.output_dir) / "best"
    assert merge_main([str(best), "--out", str(tmp_path / "merged"), "--rows", "40"]) == 0
    parity = json.loads((tmp_path / "merged" / "merge_parity.json").read_text())
    assert parity["n"] == 40 and parity["quantized_adapter"] == load_in_4bit
    assert parity["answer_agreement"] >= 0.99 and parity["candidate_agreement"] >= 0.99
    # merged into the unquantised base, a QLoRA model's weights are not the nf4 ones it was trained on: its
    # log-probabilities move (0.72 at most measured here) while its answers stay
    assert parity["max_abs_logprob_diff"] < (2.0 if load_in_4bit else 1e-3)
    assert (tmp_path / "merged" / "vlm").is_dir() and not (tmp_path / "merged" / "adapter").exists()
    assert not load_checkpoint(tmp_path / "merged").cfg.lora
    with pytest.raises(SystemExit):  # never into a folder that holds something
        merge_main([str(best), "--out", str(tmp_path / "merged")])


@pytest.mark.parametrize("mode", ["audio", "mixed"])
def test_training_time_evaluation_equals_notebook_05_on_the_same_rows(tmp_path, audio_dir, mode):
    """The accuracy training logs for best/ is what notebook 05's predict gives for those rows and that
    checkpoint (training reads cached encoder outputs; predict runs Whisper on the WAVs); in the mixed mode
    each row is asked as training's evaluation drew it."""
    from surgvqa.inference import training_eval_parity

    cfg = smoke_cfg(tmp_path, audio_dir, max_steps=4, question_mode=mode)
    summary = train(cfg, log=lambda *_: None)
    best = next(h for h in summary["history"] if h["step"] == summary["best_step"])
    best_dir = cfg.path(cfg.output_dir) / "best"
    model = load_checkpoint(best_dir)
    parity = training_eval_parity(best_dir, model)
    assert parity["n"] == cfg.eval_limit and sum(parity["modes"].values()) == cfg.eval_limit
    assert (len(parity["modes"]) > 1) == (mode == "mixed")
    assert parity["logged_accuracy"] == pytest.approx(best["eval_accuracy"], abs=1e-9)
    assert parity["equal"] and parity["predicted_accuracy"] == pytest.approx(best["eval_accuracy"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="not a training run's best/"):
        training_eval_parity(cfg.path(cfg.output_dir) / "last", model)


def test_predict_batches_questions_of_one_length_and_keeps_the_given_order(tmp_path, audio_dir, monkeypatch):
    """Whisper runs once per distinct question length in a batch, so predict batches questions by length;
    its records still come in the order of the rows given."""
    from surgvqa import audio, inference
    from surgvqa.model import build_model

    cfg = smoke_cfg(tmp_path, audio_dir)
    rows = limited(data.load_split(cfg)["eval"], 8, cfg.seed)
    manifest = audio.synthesize_split(rows, "eval", cfg, progress=False)
    batches = []
    scored = inference.score_candidates

    def recording(model, batch):
        batches.append(batch["audio_lengths"].tolist())
        return scored(model, batch)

    monkeypatch.setattr(inference, "score_candidates", recording)
    records = inference.predict(build_model(cfg), rows, cfg, "audio", manifest, batch_size=3, generate_answers=False,
                      progress=False)
    assert [r["uid"] for r in records] == [s.uid for s in rows]
    lengths = [n for batch in batches for n in batch]
    assert [len(b) for b in batches] == [3, 3, 2] and lengths == sorted(lengths) and len(set(lengths)) > 1


def test_fewer_training_rows_than_a_batch_names_where_they_came_from(tmp_path, audio_dir):
    cfg = smoke_cfg(tmp_path, audio_dir, limit_train=2, question_mode="text")
    with pytest.raises(ValueError, match=r"2 training rows \(the published split of .*surgvivqa, limit_train 2\) "
                                         r"is fewer than one batch of 4"):
        train(cfg, log=lambda *_: None)


def wandb_offline_records(run_dir):
    """The records of a W&B run kept offline (``<run_dir>/wandb/offline-run-*/run-*.wandb``): the run's config
    and every history row, read back as W&B stores them (a LevelDB-style log of protobuf records in 32 KiB
    blocks, each chunk behind a 7-byte header of checksum, length and type)."""
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, header = open(path, "rb").read(), 32768, 7
    assert data[:4] == b":W&B"
    config, history, pending, pos = {}, [], b"", header
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pending, pos = pending + data[pos + header:pos + header + length], pos + header + length
        if kind not in (1, 4):  # 1: a whole record, 2/3: its first and middle chunks, 4: its last
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return config, history


def test_a_run_tracked_offline_in_weights_and_biases_logs_what_tensorboard_and_the_csv_do(tmp_path, audio_dir,
                                                                                          monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra: pip install -e .[wandb]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = smoke_cfg(tmp_path, audio_dir, align_steps=3, lora=True, max_steps=4, report_to="tensorboard,wandb")
    summary = train(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    config, history = wandb_offline_records(out)
    assert config["max_steps"] == 4 and config["report_to"] == "tensorboard,wandb"
    logged = pd.read_csv(out / "log.csv")
    trained = [h for h in history if "step" in h]
    for column in ("train_loss", "eval_accuracy"):
        rows = logged.dropna(subset=[column])
        assert [h["step"] for h in trained if column in h] == rows["step"].tolist()
        assert [h[column] for h in trained if column in h] == pytest.approx(rows[column].tolist())
    aligned = [h for h in history if "align/step" in h]
    assert [h["align/step"] for h in aligned] == [1, 2, 3]
    assert aligned[-1]["align/kl"] == pytest.approx(pd.read_csv(out / "align_log.csv")["kl"].iloc[-1])
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("train_loss")] == logged.dropna(subset=["train_loss"])["step"].tolist()
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx(logged["train_loss"].dropna().tolist())
    assert [e.step for e in events.Scalars("align/kl")] == [1, 2, 3]
    best = events.Scalars(f"best/{cfg.early_stop_metric}")
    assert [e.step for e in best] == [summary["best_step"]]
    assert [e.value for e in best] == pytest.approx([summary["best_eval_accuracy"]])


def test_report_to_names_trackers_and_a_missing_wandb_says_how_to_install_it(tmp_path, audio_dir, monkeypatch):
    import builtins

    with pytest.raises(ValueError, match="report_to='tensorbord'"):
        smoke_cfg(tmp_path, audio_dir, report_to="tensorbord")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[wandb\]"):
        train(smoke_cfg(tmp_path, audio_dir, report_to="wandb"), log=lambda *_: None)
    run = tmp_path / "none"
    train(smoke_cfg(tmp_path, audio_dir, report_to="none", output_dir=str(run), max_steps=2), log=lambda *_: None)
    assert not (run / "tb").exists() and not (run / "wandb").exists() and (run / "log.csv").is_file()


def test_answers_end_at_max_answer_tokens(tmp_path, audio_dir):
    """An answer that does not end its turn stops at ``max_answer_tokens`` (the dry run caps random weights' answers
    where a trained model's end)."""
    from surgvqa import inference
    from surgvqa.model import build_model

    cfg = smoke_cfg(tmp_path, audio_dir, vlm_from_scratch=True)  # untrained: its answers run to the cap
    rows = limited(data.load_split(cfg)["eval"], 4, cfg.seed)
    model = build_model(cfg)
    answers = {cap: [r["prediction"] for r in inference.predict(model, rows, cfg.replace(max_answer_tokens=cap), "text",
                                                                 batch_size=4, progress=False)] for cap in (3, 7)}
    # greedy: the shorter cap's answer is where the longer one's starts (a byte cut mid-character decodes as U+FFFD)
    for short, long in zip(answers[3], answers[7]):
        assert len(short) < len(long) and long.startswith(short.rstrip("\ufffd"))


def test_batches_grouped_by_length_pad_less(tmp_path, audio_dir):
    runs = {grouped: train(smoke_cfg(tmp_path / str(grouped), audio_dir, question_mode="mixed", limit_train=64,
                                     max_steps=16, eval_every=16, group_by_length=grouped), log=lambda *_: None)
            for grouped in (False, True)}
    assert 0 < runs[True]["padding_fraction"] < runs[False]["padding_fraction"]


def test_heard_passes_encode_each_question_once_and_answer_as_without_the_cache(tmp_path, audio_dir, monkeypatch):
    """predict reads Whisper's outputs from the encoder cache training fills: 05's heard, both and before-fine-tuning
    passes over the same files run the encoder once, and score exactly as running it inline."""
    from surgvqa import audio, inference
    from surgvqa.model import build_model

    cfg = smoke_cfg(tmp_path, audio_dir, audio_features_dir=str(tmp_path / "features"))  # an empty cache
    rows = limited(data.load_split(cfg)["eval"], 6, cfg.seed)
    manifest = audio.synthesize_split(rows, "eval", cfg, progress=False)
    model = build_model(cfg)
    inline = inference.predict(model, rows, cfg.replace(cache_audio_features=False), "audio", manifest, batch_size=3,
                               generate_answers=False, progress=False)
    encoded = []
    whisper_states = model.whisper_states
    monkeypatch.setattr(model, "whisper_states", lambda mel: encoded.append(len(mel)) or whisper_states(mel))
    passes = [inference.predict(model, rows, cfg, mode, manifest, batch_size=3, generate_answers=False, progress=False)
              for mode in ("audio", "both", "audio")]
    assert sum(encoded) == len(set(manifest["path"]))  # the first pass filled the cache; the others read it
    for cached, direct in zip(passes[0], inline):
        assert cached["candidate_label"] == direct["candidate_label"]
        assert cached["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-5)
    assert [r["probabilities"] for r in passes[2]] == [r["probabilities"] for r in passes[0]]
