import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

from surgvqa import __main__ as cli
from surgvqa import data, evaluate
from surgvqa.evaluate import UNPARSEABLE, score_answer

SENTENCES = sorted(data.answer_sentences().items())


# --- the scorer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key,sentence", SENTENCES, ids=[f"{t}={label}" for (t, label), _ in SENTENCES])
def test_every_real_answer_sentence_maps_to_its_own_label(key, sentence):
    question_type, label = key
    variants = [sentence, sentence.upper(), sentence.lower(), re.sub(r"[.,!?]", "", sentence),
                f'"{sentence}"', f"  {sentence}!!  ", f"**{sentence}**", f"Answer: {sentence}"]
    for text in variants:
        assert score_answer(text, question_type) == label, text


def test_all_45_sentences_are_covered():
    assert len(SENTENCES) == 45


@pytest.mark.parametrize("text,question_type", [
    ("I don't know.", "scope_motion"),
    ("I do not know", "flush_action"),
    ("The scope is not moving.", "scope_motion"),  # "not" is not "no"
    ("Normal mucosa.", "mucosa_visibility"),
    ("Nothing to see.", "flush_action"),
    ("Nobody knows", "occlusion_check"),
    ("Unknown", "scope_outside"),
    ("", "scope_motion"),
    ("Yes or no", "scope_motion"),
    ("yes/no", "endoscope_visibility"),
    ("left or right", "lesion_motion_direction"),
    ("It drifts left, then right.", "lesion_motion_direction"),
    ("close-up view", "lesion_motion_direction"),  # "up" inside a hyphenated word
    ("upper-left", "lesion_motion_direction"),  # a position, not a direction
    ("upper left or lower right", "lesion_screen_position"),
    ("In the center of the screen", "lesion_screen_position"),
    ("white light", "lighting_mode"),  # a real answer, but not a label of this type
    ("WL light is on", "lighting_mode"),
    ("5-9 mm", "lesion_size_range"),
    ("< 5.5 mm", "lesion_size_range"),
    ("(<5 mm, 5-9 mm, >9 mm)", "lesion_size_range"),  # echoing the question's options
    ("Forceps or a snare", "tool_identification"),
    ("A clip", "tool_identification"),
    ("A hemoclip is visible in the clip.", "tool_identification"),  # a named clip is a tool outside the labels
    ("Forceps and an endoclip", "tool_identification"),
    ("partially", "fluid_occlusion_level"),
    ("Fluid occlusion is not complete.", "fluid_occlusion_level"),
    ("advancing or withdrawing", "scope_motion_type"),
    ("It is neither advancing nor withdrawing", "scope_motion_type"),
    ("The scope is not advancing.", "scope_forward_motion"),
    ("transverse colon", "lesion_site"),
    ("sessile serrated lesion", "lesion_histology_extended"),
    ("adenocarcinoma", "lesion_histology_extended"),
    ("Yes.", "lesion_site"),
])
def test_unparseable(text, question_type):
    assert score_answer(text, question_type) == UNPARSEABLE


@pytest.mark.parametrize("text,question_type,label", [
    # inflections and synonyms
    ("It moves downward.", "lesion_motion_direction", "down"),
    ("downwards", "lesion_motion_direction", "down"),
    ("Upward.", "lesion_motion_direction", "up"),
    ("It moves up.", "lesion_motion_direction", "up"),
    ("It goes leftward", "lesion_motion_direction", "left"),
    ("The lesion is stationary.", "lesion_motion_direction", "stable"),
    ("The lesion doesn't move.", "lesion_motion_direction", "stable"),
    ("It is stable, not moving left", "lesion_motion_direction", "stable"),
    ("Fluid completely obscures the view", "fluid_occlusion_level", "complete"),
    ("Total.", "fluid_occlusion_level", "complete"),
    ("There is no fluid.", "fluid_occlusion_level", "absent"),
    ("The scope advances.", "scope_motion_type", "advancing"),
    ("Moving forward", "scope_motion_type", "advancing"),
    ("withdraw", "scope_motion_type", "withdrawing"),
    ("It is retracting backward", "scope_motion_type", "withdrawing"),
    ("pulling back", "scope_motion_type", "withdrawing"),
    ("The scope isn't advancing, it is withdrawing", "scope_motion_type", "withdrawing"),
    ("upper left", "lesion_screen_position", "upper-left"),
    ("Upper-Left quadrant", "lesion_screen_position", "upper-left"),
    ("top right", "lesion_screen_position", "upper-right"),
    ("bottom-left corner", "lesion_screen_position", "lower-left"),
    ("Narrow-band imaging", "lighting_mode", "NBI"),
    ("nbi", "lighting_mode", "NBI"),
    ("less than 5 mm", "lesion_size_range", "<5"),
    ("<5mm", "lesion_size_range", "<5"),
    ("< 5 mm", "lesion_size_range", "<5"),
    ("Biopsy forceps are visible.", "tool_identification", "forceps"),
    ("A forcep", "tool_identification", "forceps"),
    ("Two snares", "tool_identification", "snare"),
    ("Catheters.", "tool_identification", "catheter"),
    ("Not a catheter but forceps", "tool_identification", "forceps"),
    ("Not in the rectum but in the sigmoid colon.", "lesion_site", "sigma"),
    ("Rectal.", "lesion_site", "rectum"),
    ("Adenomatous polyp", "lesion_histology_extended", "adenoma"),
    ("It is hyperplastic, not an adenoma.", "lesion_histology_extended", "hyperplastic"),
    # yes/no: a leading yes/no decides even when the rest names other answers
    ("No, the scope is withdrawing.", "scope_forward_motion", "no"),
    ("Yes, the scope is advancing forward.", "scope_forward_motion", "yes"),
    ("No, WL light is on instead.", "nbi_status", "no"),
    ("No, no dye is visible on the mucosa.", "blue_dye_presence", "no"),
    ("Yes, blue dye is present.", "blue_dye_presence", "yes"),
    ("Yes the scope moves", "scope_motion", "yes"),
    ("NO!", "scope_motion", "no"),
    ("**Yes**", "flush_action", "yes"),
    ("**Answer:** No.", "flush_action", "no"),
    ("- The answer is: the sigmoid", "lesion_site", "sigma"),
    # yes/no without a leading word: the yes/no words and the concept asked about must agree
    ("The answer is yes.", "flush_action", "yes"),
    ("There is no flushing.", "flush_action", "no"),
    ("The scope is withdrawing.", "scope_forward_motion", "no"),
    ("The scope is advancing.", "scope_backward_motion", "no"),
    ("It is retracting.", "scope_backward_motion", "yes"),
    ("White light is used.", "nbi_status", "no"),
    ("NBI is on.", "nbi_status", "yes"),
    ("The tool is a snare.", "tool_catheter_check", "no"),
    ("It's a catheter.", "tool_catheter_check", "yes"),
    # zero-shot VLMs speak of "the clip" and "these frames": the video clip is no hemoclip
    ("The instrument present in the clip is a biopsy forceps.", "tool_identification", "forceps"),
    ("In this clip, a snare is being used.", "tool_identification", "snare"),
    ("In these frames, the scope is withdrawing.", "scope_motion_type", "withdrawing"),
    ("The lesion in the clip moves to the left across the frames.", "lesion_motion_direction", "left"),
    ("The lesion is in the upper-left part of the frame in this clip.", "lesion_screen_position", "upper-left"),
    ("The polyp shown in this clip is in the sigmoid colon.", "lesion_site", "sigma"),
    ("No fluid is seen in the clip.", "fluid_occlusion_level", "absent"),
    ("There is no catheter in the clip; a snare is used.", "tool_catheter_check", "no"),
    ("The video clip shows narrow-band imaging.", "nbi_status", "yes"),
])
def test_parses(text, question_type, label):
    assert score_answer(text, question_type) == label


def test_yes_no_words_that_disagree_are_unparseable():
    assert score_answer("The scope is withdrawing, so yes.", "scope_forward_motion") == UNPARSEABLE
    assert score_answer("NBI or white light", "nbi_status") == UNPARSEABLE


def test_unknown_question_type_raises():
    with pytest.raises(KeyError):
        score_answer("yes", "no_such_type")


# --- Wilson interval -----------------------------------------------------------------------------

def test_wilson_interval_known_values():
    lo, hi = evaluate.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)  # z^2 / (n + z^2)
    lo, hi = evaluate.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    lo, hi = evaluate.wilson_interval(10, 10)
    assert lo == pytest.approx(0.72247, abs=1e-5) and hi == 1.0
    lo, hi = evaluate.wilson_interval(81, 100)
    assert (lo, hi) == (pytest.approx(0.72221, abs=1e-5), pytest.approx(0.87485, abs=1e-5))
    assert all(math.isnan(v) for v in evaluate.wilson_interval(0, 0))


# --- prediction files and accuracy ---------------------------------------------------------------

def record(question_type, truth, prediction, **extra):
    return {"question_type": question_type, "short_answer": truth, "prediction": prediction, **extra}


def test_score_predictions_parses_and_scores():
    frame = evaluate.score_predictions([
        record("scope_motion", "yes", "Yes.", id="1", voice="a", latency_ms=12.5,
               probabilities={"yes": 0.8, "no": 0.2}),
        record("scope_motion", "no", "I don't know", id="2", voice="b"),
        record("lesion_site", "sigma", "The sigmoid.", id=3),
    ])
    assert list(frame["parsed"]) == ["yes", UNPARSEABLE, "sigma"]
    assert list(frame["correct"]) == [True, False, True]
    assert list(frame["id"]) == ["1", "2", "3"]
    assert frame.loc[0, "confidence"] == 0.8 and frame.loc[0, "prob_label"] == "yes"
    assert frame.loc[0, "prob_correct"] is True and math.isnan(frame.loc[1, "confidence"])
    assert frame.loc[0, "latency_ms"] == 12.5 and math.isnan(frame.loc[1, "latency_ms"])


def test_write_and_read_predictions_round_trip(tmp_path):
    rows = [record("scope_motion", "yes", "No.", id="7", uid="002-004/7", voice="en-us", template="out",
                   audio_duration_s=1.5, latency_ms=30.0, probabilities={"yes": 0.4, "no": 0.6},
                   correct=True, model="tiny")]  # a lenient "correct" in the input is recomputed
    path = evaluate.write_predictions(tmp_path / "p.jsonl", rows)
    stored = json.loads(path.read_text())
    assert stored["parsed"] == "no" and stored["correct"] is False and stored["model"] == "tiny"
    assert list(stored)[:3] == ["id", "uid", "question_type"]
    back = evaluate.read_predictions(path)
    assert back == [stored]


def test_bad_rows_are_named_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps(record("scope_motion", "yes", "yes")),
        "{not json",
        json.dumps({"question_type": "scope_motion", "short_answer": "yes"}),
        json.dumps(record("scope_motion", "maybe", "yes")),
        json.dumps(record("bogus_type", "yes", "yes")),
        json.dumps(record("scope_motion", "yes", 1)),
        json.dumps(record("scope_motion", "yes", "yes", probabilities={"yes": 1.5})),
        json.dumps(record("scope_motion", "yes", "yes", probabilities={"up": 0.5})),
        json.dumps(record("scope_motion", "yes", "yes", latency_ms=-1)),
        json.dumps(record("scope_motion", "yes", "yes", latency_ms=float("nan"))),
        json.dumps(record("scope_motion", "yes", "yes", uid="002-004/qa_1")),
        json.dumps(record("scope_motion", "no", "no", uid="002-004/qa_1")),
    ]) + "\n")
    with pytest.raises(evaluate.PredictionsError) as e:
        evaluate.read_predictions(path)
    message = str(e.value)
    assert "10 malformed prediction row(s)" in message
    for line, reason in [(2, "bad JSON"), (3, "missing field(s) ['prediction']"),
                         (4, "'maybe' is not a label"),
                         (5, "unknown question_type"), (6, "prediction must be a string"),
                         (7, "must lie in [0, 1]"), (8, "outside scope_motion"), (9, "non-negative"),
                         (10, "finite non-negative number, got nan"),
                         (12, "duplicate uid '002-004/qa_1' (first at line 11)")]:
        assert f"{path}:{line}: " in message and reason in message, (line, reason)
    assert f"{path}:1:" not in message
    with pytest.raises(evaluate.PredictionsError, match="row 0: missing field"):
        evaluate.score_predictions([{"question_type": "scope_motion"}])
    path.write_bytes(json.dumps(record("scope_motion", "yes", "yes")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(evaluate.PredictionsError, match=rf"{path}:2: not UTF-8 text"):
        evaluate.read_predictions(path)


def test_type_accuracy_matches_accuracy_table_and_uses_the_train_prior():
    splits = data.published_split()
    test = splits["test"]
    # predict "yes" for yes/no types, the first label otherwise, as free text
    texts = ["Yes." if data.candidate_labels(s.question_type) == ["no", "yes"]
             else data.candidate_labels(s.question_type)[0] for s in test]
    frame = evaluate.score_predictions(
        [record(s.question_type, s.short_answer, t) for s, t in zip(test, texts)])
    table = evaluate.type_accuracy(frame, splits["train"])
    reference = evaluate.accuracy_table(test, list(frame["parsed"]), splits["train"])
    assert table.equals(reference)
    assert table.loc["overall", "n"] == 1000 and table.loc["blue_dye_presence", "accuracy"] == 0.0
    assert table.loc["blue_dye_presence", "chance"] == 0.5 and table.loc["blue_dye_presence", "single_class"]
    assert table.loc["lighting_mode", "accuracy"] == 1.0 and table.loc["lighting_mode", "chance"] == 1.0
    prior = data.blind_prior(splits["train"])
    truth = [s.short_answer for s in test if s.question_type == "scope_motion"]
    assert table.loc["scope_motion", "blind_prior"] == pytest.approx(
        sum(t == prior["scope_motion"] for t in truth) / len(truth))


def test_accuracy_by_template_and_voice():
    train = data.published_split()["train"]
    frame = evaluate.score_predictions([
        record("scope_motion", "yes", "yes", template="in", voice="v1"),
        record("scope_motion", "yes", "no", template="in", voice="v2"),
        record("scope_motion", "no", "no", template="out", voice="v2"),
        record("scope_motion", "no", "no", template="out"),
    ])
    by_template = evaluate.accuracy_by(frame, "template", train)
    assert by_template.loc["in", "n"] == 2 and by_template.loc["in", "accuracy"] == 0.5
    assert by_template.loc["out", "accuracy"] == 1.0 and by_template.loc["out", "chance"] == 0.5
    by_voice = evaluate.accuracy_by(frame, "voice", train)
    assert by_voice["n"].to_dict() == {"v1": 1, "v2": 2}
    assert evaluate.accuracy_by(frame.assign(voice=None), "voice", train).empty


# --- the command line ----------------------------------------------------------------------------

def test_score_command_prints_the_table_and_writes_a_summary(tmp_path, capsys):
    rows = [
        record("scope_motion", "yes", "Yes, the scope is moving.", template="in", voice="v1"),
        record("scope_motion", "yes", "No.", template="in", voice="v1"),
        record("scope_motion", "no", "No, it is not.", template="out", voice="v2"),
        record("scope_motion", "no", "I don't know", template="out", voice="v2"),
        record("lighting_mode", "NBI", "NBI light."),  # no template or voice: left out of those tables
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["score", str(path)]) == 0
    out = capsys.readouterr().out
    lo, hi = evaluate.wilson_interval(3, 5)
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert overall.split()[:3] == ["overall", "5", "60.0"]
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in overall
    # chance (4 x 1/2 and 1 x 1/1) and the prior (right on 1 of 2 yes, 1 of 2 no and the NBI row), no flag
    assert overall.split("]")[1].split() == ["60.0", "60.0"]
    assert next(line for line in out.splitlines() if line.startswith("lighting_mode")).split()[-1] == "yes"
    assert "1 unparseable" in out
    type_line = next(line for line in out.splitlines() if line.startswith("scope_motion"))
    assert type_line.split()[-1] == "50.0"  # the prior's answer is right on half of these rows
    assert re.search(r"^in\s+2\s+50\.0", out, re.M) and re.search(r"^out\s+2\s+50\.0", out, re.M)
    assert re.search(r"^v1\s+2\s+50\.0", out, re.M)
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert summary["n"] == 5 and summary["unparseable"] == 1
    assert summary["accuracy"]["overall"]["accuracy"] == 0.6
    assert summary["accuracy"]["scope_motion"]["ci_low"] == pytest.approx(evaluate.wilson_interval(2, 4)[0])
    assert summary["accuracy"]["lighting_mode"]["single_class"] is True
    assert set(summary["accuracy_by_template"]) == {"in", "out"} and summary["mode_collapse"] == []


def test_score_command_reports_bad_lines(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(record("scope_motion", "yes", "yes")) + "\n"
                    + json.dumps({"question_type": "scope_motion", "short_answer": "yes"}) + "\n")
    assert cli.main(["score", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: missing field(s) ['prediction']" in err
    assert cli.main(["score", str(tmp_path / "missing.jsonl")]) == 2
    assert not (tmp_path / "preds.summary.json").exists()


# --- error analysis ------------------------------------------------------------------------------

def test_confusion_matrix_has_every_label_and_unparseable():
    frame = evaluate.score_predictions([
        record("tool_identification", "forceps", "forceps"),
        record("tool_identification", "forceps", "a snare"),
        record("tool_identification", "snare", "snare"),
        record("tool_identification", "snare", "no idea"),
        record("scope_motion", "yes", "yes"),
    ])
    matrix = evaluate.confusion_matrix(frame, "tool_identification")
    assert list(matrix.index) == ["catheter", "forceps", "snare"]
    assert list(matrix.columns) == ["catheter", "forceps", "snare", UNPARSEABLE]
    assert matrix.loc["forceps"].tolist() == [0, 1, 1, 0]
    assert matrix.loc["snare"].tolist() == [0, 0, 1, 1]
    assert matrix.loc["catheter"].sum() == 0 and matrix.to_numpy().sum() == 4
    with pytest.raises(ValueError):
        evaluate.confusion_matrix(frame, "lesion_site")


def test_heard_or_seen_tells_a_misheard_question_from_a_missed_clip():
    sentences = data.answer_sentences()
    frame = evaluate.score_predictions([
        record("scope_forward_motion", "yes", sentences[("scope_forward_motion", "yes")]),  # correct
        record("scope_forward_motion", "yes", sentences[("scope_forward_motion", "no")]),  # heard, missed the clip
        record("scope_forward_motion", "no", sentences[("scope_motion_type", "advancing")]),  # answered another
        record("nbi_status", "no", sentences[("lighting_mode", "NBI")]),  # another question's answer
        record("nbi_status", "no", "hmm"),  # unparseable
    ])
    table = evaluate.heard_or_seen(frame)
    assert list(table.columns) == ["n", *evaluate.FAILURE_KINDS]
    assert table.loc["scope_forward_motion"].tolist() == [3, 1, 1, 1, 0]
    assert table.loc["nbi_status"].tolist() == [2, 0, 0, 1, 1]
    assert table.loc["overall"].tolist() == [5, 1, 1, 2, 1]


def collapse_frame(truths, predictions, question_type="scope_motion"):
    return evaluate.score_predictions([record(question_type, t, p) for t, p in zip(truths, predictions)])


def test_mode_collapse_flags_one_answer_on_a_balanced_truth():
    collapsed = collapse_frame(["yes"] * 10 + ["no"] * 10, ["yes"] * 19 + ["no"])  # 95 % "yes"
    table = evaluate.mode_collapse(collapsed)
    assert table.loc["scope_motion", "collapsed"]
    assert table.loc["scope_motion", "top_prediction"] == "yes"
    assert table.loc["scope_motion", "top_share"] == 0.95
    assert table.loc["scope_motion", "truth_majority_share"] == 0.5

    healthy = collapse_frame(["yes"] * 10 + ["no"] * 10, ["yes"] * 12 + ["no"] * 8)
    assert not evaluate.mode_collapse(healthy).loc["scope_motion", "collapsed"]
    # one answer everywhere, but the truth is 90 % that answer: following the data, not collapse
    skewed = collapse_frame(["yes"] * 18 + ["no"] * 2, ["yes"] * 20)
    assert not evaluate.mode_collapse(skewed).loc["scope_motion", "collapsed"]
    # exactly 80 % is not "more than 80 %"
    at_threshold = collapse_frame(["yes"] * 10 + ["no"] * 10, ["yes"] * 16 + ["no"] * 4)
    assert not evaluate.mode_collapse(at_threshold).loc["scope_motion", "collapsed"]
    # too few rows to tell
    few = collapse_frame(["yes", "no", "yes", "no"], ["yes"] * 4)
    assert not evaluate.mode_collapse(few).loc["scope_motion", "collapsed"]
    assert evaluate.mode_collapse(few, min_n=4).loc["scope_motion", "collapsed"]
    # the same unreadable text everywhere is a collapse too
    mumbling = collapse_frame(["up", "down", "left", "right", "stable"] * 4, ["hmm"] * 20,
                              "lesion_motion_direction")
    row = evaluate.mode_collapse(mumbling).loc["lesion_motion_direction"]
    assert row["collapsed"] and row["top_prediction"] == UNPARSEABLE


def test_failures_by_voice_and_duration_bins():
    frame = evaluate.score_predictions([
        record("scope_motion", "yes", "yes", voice="a", audio_duration_s=1.0),
        record("scope_motion", "yes", "no", voice="a", audio_duration_s=1.2),
        record("scope_motion", "yes", "??", voice="b", audio_duration_s=3.0),
        record("scope_motion", "no", "no", voice="b", audio_duration_s=3.5),
        record("scope_motion", "no", "yes"),
    ])
    by_voice = evaluate.failures_by(frame, "voice")
    assert by_voice.loc["a"].to_dict()["failures"] == 1 and by_voice.loc["a", "failure_rate"] == 0.5
    assert by_voice.loc["b", "unparseable"] == 1 and by_voice["n"].sum() == 4
    lo, hi = evaluate.wilson_interval(1, 2)
    assert (by_voice.loc["a", "ci_low"], by_voice.loc["a", "ci_high"]) == (lo, hi)
    by_edges = evaluate.failures_by(frame, "audio_duration_s", bins=[0, 2, 4])
    assert by_edges["n"].tolist() == [2, 2] and by_edges["failures"].tolist() == [1, 1]
    by_quantile = evaluate.failures_by(frame, "audio_duration_s", bins=2)
    assert by_quantile["n"].tolist() == [2, 2]
    with pytest.raises(ValueError):
        evaluate.failures_by(frame, "latency_ms")


def test_reliability_on_a_hand_computed_case():
    frame = evaluate.score_predictions([
        record("scope_motion", "yes", "yes", probabilities={"yes": 0.9, "no": 0.1}),   # 0.9, right
        record("scope_motion", "no", "yes", probabilities={"yes": 0.9, "no": 0.1}),    # 0.9, wrong
        record("scope_motion", "no", "no", probabilities={"yes": 0.3, "no": 0.7}),     # 0.7, right
        record("scope_motion", "no", "yes", probabilities={"yes": 0.55, "no": 0.45}),  # 0.55, wrong
        record("scope_motion", "no", "no"),  # no probabilities: left out
    ])
    table = evaluate.reliability(frame, bins=5)
    assert table["n"].tolist() == [0, 0, 1, 1, 2]
    assert table.loc[4, "confidence"] == pytest.approx(0.9) and table.loc[4, "accuracy"] == 0.5
    assert table.loc[3, "confidence"] == pytest.approx(0.7) and table.loc[3, "accuracy"] == 1.0
    assert table.loc[2, "confidence"] == pytest.approx(0.55) and table.loc[2, "accuracy"] == 0.0
    assert table.loc[4, "gap"] == pytest.approx(-0.4) and math.isnan(table.loc[0, "accuracy"])
    # (2 * 0.4 + 1 * 0.3 + 1 * 0.55) / 4
    assert evaluate.expected_calibration_error(table) == pytest.approx(0.4125)
    figure = evaluate.reliability_figure(table)
    assert "ECE = 0.41" in figure.axes[0].get_title()
    with pytest.raises(ValueError):
        evaluate.reliability(frame[frame["confidence"].isna()])


def test_wrong_answers_lists_each_failure_with_its_question_and_audio():
    samples = data.published_split()["test"][:3]
    frame = evaluate.score_predictions([
        record(s.question_type, s.short_answer, pred, uid=s.uid, voice=f"v{i}")
        for i, (s, pred) in enumerate(zip(samples, [data_answer_of(samples[0]), "mumble", "mumble"]))])
    table = evaluate.wrong_answers(frame, samples, {samples[1].uid: "test/a.wav"})
    assert list(table.index) == [samples[1].uid, samples[2].uid]
    first = table.loc[samples[1].uid]
    assert first["question"] == samples[1].question and first["truth"] == samples[1].short_answer
    assert first["read_as"] == UNPARSEABLE and first["voice"] == "v1" and first["audio"] == "test/a.wav"
    assert pd.isna(table.loc[samples[2].uid, "audio"])
    with pytest.raises(KeyError, match="not among the given samples"):
        evaluate.wrong_answers(frame, samples[:1])


def data_answer_of(sample):
    return evaluate.data_answer(sample.question_type, sample.short_answer)


def test_a_megabyte_answer_is_scored_with_its_negations():
    # the negation check once re-read the text before every match: a 1 MB answer did not finish in 300 s
    filler = "the view is as before and " * 40_000
    assert len(filler) > 1_000_000
    assert score_answer(filler + "the lesion is located in the sigma.", "lesion_site") == "sigma"
    assert score_answer(filler + "it is not the sigma but the rectum.", "lesion_site") == "rectum"
