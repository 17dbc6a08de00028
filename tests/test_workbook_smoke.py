"""The whole workbook, 01 to 08, with the smoke preset: every notebook runs headless and each hands its
stored metrics to the next."""
from pathlib import Path

import pytest

from surgvqa import workbook

SMOKE_PARAMS = {
    "probe_size": 32, "probe_rows": 100, "probe_clips": 100, "gallery_size": 48,  # 01
    "limit": 3, "players": 1, "wer_voices": 1, "wer_per_voice": 2,  # 02
    "n_samples": 4,  # 03
    "batch_size": 8,  # 05, 08
    "robustness_rows": 8, "snr_db": [0], "speaking_rates": [1.25],  # 08
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("workbook")
    params = {**SMOKE_PARAMS, "audio_dir": str(root / "audio"), "output_dir": str(root / "run")}
    lines = []
    workbook.run_workbook(None, preset="smoke", params=params, reports_dir=root / "reports", html=True,
                          cell_timeout=600, log=lines.append)
    (root / "reports" / "workbook.log").write_text("\n".join(lines) + "\n")
    return root / "reports"


def test_the_run_says_which_cell_runs_and_streams_the_training_steps(reports):
    lines = (reports / "workbook.log").read_text().splitlines()
    assert any(line.startswith("[workbook] 05-evaluate: cell 4 (cell 3 took ") for line in lines)
    steps = [line for line in lines if line.startswith("[04-train] [train] step ") and "samples/s" in line]
    assert steps and "eta" in steps[-1]


def test_every_notebook_ran_and_stored_metrics(reports):
    names = [p.stem for p in workbook.notebook_paths()]
    assert names == ["01-explore-data", "02-synthesize-audio", "03-feasibility-overfit", "04-train",
                     "05-evaluate", "06-error-analysis", "07-demo", "08-robustness"]
    for name in names:
        assert (reports / f"{name}.ipynb").exists()
        assert workbook.read_metrics(name, reports)


@pytest.mark.parametrize("name", ["01-explore-data", "02-synthesize-audio", "03-feasibility-overfit", "04-train",
                                  "05-evaluate", "06-error-analysis", "07-demo", "08-robustness"])
def test_each_html_copy_shows_its_figures_and_no_warning_spam(reports, name):
    html = (reports / f"{name}.html").read_text()
    assert html.count("data:image/png;base64,") >= 1, "the figures are missing from the HTML copy"
    for noise in ("seem to have been set", "kernels-community", "is deprecated", "Kernel is running over TCP"):
        assert noise not in html, noise


def test_metrics_chain_from_training_to_the_demo(reports):
    trained = workbook.read_metrics("04-train", reports)
    evaluated = workbook.read_metrics("05-evaluate", reports)
    assert Path(trained["best_checkpoint"]).is_dir()
    assert evaluated["checkpoint"] == trained["best_checkpoint"]
    assert evaluated["n_test"] == 16
    assert set(evaluated["baselines"]) == {"blind prior", "audio-only (headline)", "text-only", "audio + text",
                                           "Whisper ASR -> text", "Whisper ASR -> closest question -> text",
                                           "text-only, zero-shot base model"}
    assert 0 <= evaluated["asr_intent_accuracy"] <= 1
    # smoke's projector starts random, so the model before fine-tuning cannot hear: it reads the question
    # the starting model is scored on the same rows, type by type, and its predictions are kept
    assert set(evaluated["audio_only_before_fine_tuning_per_type"]) == set(evaluated["audio_only_per_type"])
    assert Path(evaluated["predictions"]["before"]).is_file()
    for row in evaluated["baselines"].values():
        assert row["n"] == 16 and 0 <= row["accuracy"] <= 1 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    parity = evaluated["training_eval_parity"]  # training's logged eval accuracy, re-predicted by 05
    assert parity["n"] == 8 and parity["equal"] and parity["predicted_accuracy"] == parity["logged_accuracy"]
    prior = evaluated["baselines"]["blind prior"]
    assert prior["accuracy"] == prior["blind_prior"]
    analysed = workbook.read_metrics("06-error-analysis", reports)
    assert analysed["n"] == evaluated["n_test"] and 0 <= analysed["expected_calibration_error"] <= 1
    kinds = analysed["misheard_or_missed"]
    assert sum(kinds.values()) == evaluated["n_test"]
    assert kinds["correct"] == round(evaluated["baselines"]["audio-only (headline)"]["accuracy"] * evaluated["n_test"])
    wrong = evaluated["n_test"] - kinds["correct"]
    assert analysed["wrong_answers"] == wrong
    assert len((reports / "06-wrong-answers.csv").read_text().strip().splitlines()) == wrong + 1
    demo = workbook.read_metrics("07-demo", reports)
    assert demo["inspected"] == evaluated["n_test"] and demo["demo_clips"] >= 1
    # answered without being told the question type, or said it could not tell which question it heard (its floor,
    # measured on the eval voices, is a type confidence)
    assert 0 <= demo["question_floor"] <= 1 and demo["question_floor_n"] >= 1
    assert (demo["demo_answer"] and demo["demo_understood"]) or demo["demo_answer"] is None


def test_the_robustness_report_runs_every_condition_beside_the_pipeline(reports):
    robust = workbook.read_metrics("08-robustness", reports)
    assert robust["rows_per_condition"] == 8
    conditions = {row["condition"]: row for row in robust["conditions"]}
    assert list(conditions) == ["test voices", "unseen engine (flite)", "held-out wordings, heard", "babble 0 dB",
                                "broadband 0 dB", "speaking rate 1.25x", "held-out wordings, read"]  # as the notebook runs them
    for name, row in conditions.items():
        assert row["n"] == 8 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert row["blind_prior"] is not None and row["chance"] is not None
        heard = name != "held-out wordings, read"
        assert (row["pipeline"] is not None) == heard  # reading has no audio for the pipeline to transcribe
        if heard:
            assert row["direct - pipeline"] == pytest.approx(row["accuracy"] - row["pipeline"])
    assert [t["condition"] for t in robust["targets"]] == ["held-out wordings, heard", "held-out wordings, read",
                                                           "unseen engine (flite)", "babble 0 dB"]
    assert all(t["met"] == (t["accuracy"] >= 0.90) for t in robust["targets"] if t["condition"] == "babble 0 dB")
    summary = (reports / "README.md").read_text()
    assert "Robustness (08)" in summary and "| held-out wordings, read |" in summary and "Targets:" in summary
    assert set(robust["pipeline_ahead"]) <= set(conditions)
    # each condition heard what it says: flite's voices, the noise at its SNR, the test voices faster
    from surgvqa import audio, get_config

    cfg = get_config("smoke", audio_dir=str(reports.parent / "audio"))
    clean = audio.read_manifest("robustness-clean", cfg).set_index("uid")
    assert set(audio.read_manifest("robustness-flite", cfg)["engine"]) == {"flite"}
    assert set(audio.read_manifest("robustness-babble-0dB", cfg)["noise"]) == {"babble@0dB"}
    faster = audio.read_manifest("robustness-rate-1.25x", cfg).set_index("uid")
    assert (faster["voice"] == clean["voice"]).all() and (faster["rate"] == (clean["rate"] * 1.25).round()).all()
    assert (reports / "figures" / "08-noise-sweep.png").is_file()


def test_data_and_audio_notebooks_report_real_numbers(reports):
    explored = workbook.read_metrics("01-explore-data", reports)
    assert explored["blind_prior_accuracy"]["test"] == pytest.approx(0.573)
    audio = workbook.read_metrics("02-synthesize-audio", reports)
    assert audio


def test_the_run_writes_a_summary_and_a_results_table(reports):
    import json
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["preset"] == "smoke" and "05-evaluate" in summary["notebooks"]
    table = (reports / "README.md").read_text()
    assert "| blind prior |" in table and "| audio-only (headline) |" in table and "n = 16" in table
