import json
from collections import Counter

import pytest

from surgvqa import data, evaluate
from surgvqa.config import REPO_ROOT

GOOD = json.loads((data.data_dir() / "out_template.jsonl").open().readline())


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_label_sets_come_from_the_data_and_match_the_facts():
    sets = data.label_sets()
    assert len(sets) == 20
    assert sets["tool_identification"] == {"catheter", "forceps", "snare"}
    assert sets["lesion_motion_direction"] == {"up", "down", "left", "right", "stable"}
    assert sets["lesion_size_range"] == {"<5"} and sets["lighting_mode"] == {"NBI"}
    assert sum(v == {"yes", "no"} for v in sets.values()) == 11
    assert sets["blue_dye_presence"] == {"yes", "no"}  # the data only says "no"; the question allows both
    assert len(data.answer_sentences()) == 45


def test_one_wording_per_type_per_template():
    for template in ("in", "out"):
        wordings = data.question_wordings(template)
        assert len(wordings) == 20 and len(set(wordings.values())) == 20


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: "{not json", "bad JSON"),
    (lambda r: {k: v for k, v in r.items() if k != "answer"}, "missing field(s) ['answer']"),
    (lambda r: {**r, "question_type": "polyp_colour"}, "unknown question_type 'polyp_colour'"),
    (lambda r: {**r, "short_answer": "maybe"}, "short_answer 'maybe' is not a label of mucosa_visibility"),
    (lambda r: {**r, "frames": r["frames"][:7], "frame_numbers": r["frame_numbers"][:7]}, "7 frames"),
    (lambda r: {**r, "frames": ["002-001_3806"] + r["frames"][1:]}, "is not of video 002-003"),
    (lambda r: {**r, "frame_numbers": [1] + r["frame_numbers"][1:]}, "does not match frame number 1"),
    (lambda r: {**r, "answer": ""}, "empty field(s) ['answer']"),
    (lambda r: {**r, "question": "   "}, "empty field(s) ['question']"),
])
def test_each_malformed_row_is_reported_with_file_and_line(tmp_path, mutate, reason):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, mutate(dict(GOOD)), {**GOOD, "id": "qa_9"}])
    with pytest.raises(data.AnnotationError) as err:
        data.load_annotations(path)
    assert f"{path}:2: " in str(err.value) and reason in str(err.value)
    assert "1 malformed row" in str(err.value)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "id": "qa_9"}])
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"qa_9"', b'"qa_\xff9"')] + lines[2:]))
    with pytest.raises(data.AnnotationError, match=rf"{path}:2: not UTF-8 text"):
        data.load_annotations(path)


def test_skipping_bad_rows_says_how_many_and_why(tmp_path, caplog):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, "{oops", {**GOOD, "question_type": "x", "id": "q2"}, GOOD])
    samples = data.load_annotations(path, skip_bad=True)
    assert [s.id for s in samples] == [GOOD["id"]]  # the repeated id on line 4 is skipped too
    assert "skipped 3 malformed row(s)" in caplog.text
    assert "bad JSON" in caplog.text and "unknown question_type" in caplog.text and "duplicate id" in caplog.text


def test_samples_are_typed_and_carry_their_source():
    s = data.load_template("in")[0]
    assert isinstance(s.frames, tuple) and len(s.frames) == 8 and all(isinstance(n, int) for n in s.frame_numbers)
    assert s.source.endswith("in_template.jsonl:1") and s.uid == f"{s.video_id}/{s.id}"


def test_published_split_counts_videos_and_rewording():
    splits = data.published_split()
    assert {k: len(v) for k, v in splits.items()} == {"train": 2302, "eval": 398, "test": 1000}
    assert {s.video_id for s in splits["test"]} == {"002-004"}
    assert {s.video_id for s in splits["train"] + splits["eval"]} == {"002-001", "002-002", "002-003"}
    reworded = data.published_split("in")
    wordings = data.question_wordings("in")
    assert all(s.question == wordings[s.question_type] for s in reworded["test"])
    assert [s.short_answer for s in reworded["test"]] == [s.short_answer for s in splits["test"]]


def test_make_split_with_the_original_settings_reproduces_the_published_shape():
    rows = data.load_template("out")
    ours = data.make_split(rows, ("002-001", "002-002", "002-003"), "002-004", 0.15, seed=42)
    published = data.published_split()
    assert {k: len(v) for k, v in ours.items()} == {k: len(v) for k, v in published.items()}
    for name in ("train", "eval", "test"):
        assert Counter(s.question_type for s in ours[name]) == Counter(s.question_type for s in published[name])
    assert len({s.question_type for s in ours["eval"]}) == 20
    # the held-out video is the same rows; train/eval membership differs (the original seed is unknown)
    key = lambda s: (s.video_id, s.frames, s.question_type)
    assert {key(s) for s in ours["test"]} == {key(s) for s in published["test"]}
    ours_again = data.make_split(rows, ("002-001", "002-002", "002-003"), "002-004", 0.15, seed=42)
    assert [s.uid for s in ours_again["eval"]] == [s.uid for s in ours["eval"]]
    other_seed = data.make_split(rows, ("002-001", "002-002", "002-003"), "002-004", 0.15, seed=7)
    assert {s.uid for s in other_seed["eval"]} != {s.uid for s in ours["eval"]}


def test_make_split_refuses_test_video_in_training():
    with pytest.raises(ValueError, match="also a train/eval video"):
        data.make_split(data.load_template("out"), ("002-004",), "002-004")


def test_blind_prior_matches_the_published_numbers():
    splits = data.published_split()
    prior = data.blind_prior(splits["train"])
    for name, expected in (("test", 0.573), ("eval", 0.530)):
        table = evaluate.accuracy_table(splits[name], data.prior_predictions(prior, splits[name]), splits["train"])
        assert table.loc["overall", "accuracy"] == pytest.approx(expected, abs=5e-4)
        assert table.loc["overall", "blind_prior"] == table.loc["overall", "accuracy"]
    assert data.single_class_types(splits["test"]) == [
        "blue_dye_presence", "endoscope_visibility", "lesion_histology_extended", "lesion_size_range",
        "lighting_mode", "tool_catheter_check", "tool_identification"]


def test_prior_refuses_a_type_it_never_saw():
    splits = data.published_split()
    train = [s for s in splits["train"] if s.question_type != "lesion_site"]
    with pytest.raises(KeyError, match="lesion_site"):
        data.prior_predictions(data.blind_prior(train), splits["test"])


def test_an_empty_annotation_file_is_named(tmp_path):
    from surgvqa.data import AnnotationError, load_annotations

    empty = tmp_path / "train.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(AnnotationError, match=f"{empty} holds no annotation rows"):
        load_annotations(empty)


def test_the_paraphrase_bank_words_every_type_in_every_split_and_keeps_test_wordings_apart():
    bank = data.paraphrase_bank()
    assert set(bank["question_type"]) == set(data.QUESTION_TYPES)
    for split, per_type in (("train", 5), ("eval", 2), ("test", 3)):
        counts = bank[(bank.source == "bank") & (bank.split == split)].groupby("question_type").size()
        assert (counts == per_type).all() and len(counts) == 20, split
    # both templates' wordings are train wordings; a test wording is in no other split
    templates = {w for t in ("in", "out") for w in data.question_wordings(t).values()}
    assert set(bank[bank.source == "template"]["wording"]) == templates
    assert set(bank[bank.source == "template"]["split"]) == {"train"}
    keys = bank["wording"].str.lower().str.split().str.join(" ")
    assert not keys.duplicated().any()


@pytest.mark.parametrize("bad_line, message", [
    ("nbi_status,test,short,Is the NBI light on?", "is the in template's wording"),
    ("nbi_status,train,short,Nbi   on?", "also on line 42"),
    ("colour_check,test,short,Which colour?", "unknown question type 'colour_check'"),
    ("nbi_status,holdout,short,Is it NBI light?", "split 'holdout'"),
    ("nbi_status,test,short,NBI", "not a question sentence"),
])
def test_a_bad_paraphrase_line_names_the_file_and_the_line(tmp_path, bad_line, message):
    source = (REPO_ROOT / data.PARAPHRASE_FILE).read_text()
    path = tmp_path / "wordings.csv"
    path.write_text(source + bad_line + "\n")
    with pytest.raises(data.AnnotationError, match=f"wordings.csv line 202: .*{message}"):
        data.paraphrase_bank(path=path)


def test_a_paraphrase_bank_without_a_split_of_a_type_is_refused(tmp_path):
    lines = (REPO_ROOT / data.PARAPHRASE_FILE).read_text().splitlines()
    path = tmp_path / "wordings.csv"
    path.write_text("\n".join(l for l in lines if not l.startswith("nbi_status,test,")) + "\n")
    with pytest.raises(data.AnnotationError, match=r"no wording for \[\('nbi_status', 'test'\)\]"):
        data.paraphrase_bank(path=path)


def test_closest_questions_match_a_transcript_to_its_question_type_without_the_test_wordings():
    bank = data.paraphrase_bank()
    templates = bank[bank.source == "template"]
    matched = data.closest_questions(templates["wording"].tolist())
    assert [t for t, _ in matched] == templates["question_type"].tolist()
    # what the model then reads is the question type's wording in the config's template
    wordings = data.question_wordings("out")
    assert all(w == wordings[t] for t, w in matched)
    # held-out wordings, never matched against, still mostly reach their type (chance 1/20; measured 0.72)
    test = bank[bank.split == "test"]
    types = [t for t, _ in data.closest_questions(test["wording"].tolist())]
    assert sum(t == q for t, q in zip(types, test["question_type"])) / len(test) >= 0.5
    assert data.closest_questions([]) == []


def test_reworded_samples_ask_the_same_rows_in_the_banks_wordings_of_one_split():
    rows = data.published_split()["test"][:60]
    again = data.reworded(rows, "test")
    bank = data.paraphrase_bank()
    test_wordings = bank[(bank.source == "bank") & (bank.split == "test")]
    allowed = test_wordings.groupby("question_type")["wording"].apply(set).to_dict()
    assert [s.uid for s in again] == [s.uid for s in rows]
    assert all(a.question in allowed[a.question_type] and a.question != s.question for a, s in zip(again, rows))
    assert all(a.short_answer == s.short_answer and a.frames == s.frames for a, s in zip(again, rows))
    assert [s.question for s in data.reworded(rows, "test")] == [s.question for s in again]  # by uid, every run
    assert len({s.question for s in again}) > 20
    with pytest.raises(ValueError, match="wording split 'heldout'"):
        data.reworded(rows, "heldout")


def test_training_reads_the_banks_train_wordings_and_templates_while_eval_and_test_keep_the_template():
    from surgvqa.config import get_config

    bank_cfg, template_cfg = get_config(), get_config(train_wordings="template")
    wordings = data.training_wordings(bank_cfg)
    templates = {t: {data.question_wordings(n)[t] for n in ("in", "out")} for t in data.QUESTION_TYPES}
    bank = data.paraphrase_bank()
    for qtype, options in wordings.items():
        mine = bank[(bank.question_type == qtype) & (bank.split == "train")]
        assert set(options) == set(mine.wording) and templates[qtype] <= set(options) and len(options) >= 6
    only_templates = data.training_wordings(template_cfg)
    assert all(set(only_templates[t]) == templates[t] and len(only_templates[t]) == len(templates[t]) for t in templates)
    asked, plain = data.load_split(bank_cfg), data.load_split(template_cfg)
    assert [s.uid for s in asked["train"]] == [s.uid for s in plain["train"]]
    assert all(a.question in wordings[a.question_type] for a in asked["train"])
    share_reworded = sum(a.question != p.question for a, p in zip(asked["train"], plain["train"])) / len(plain["train"])
    assert 0.6 < share_reworded < 0.95  # 5 bank wordings and 1-2 template wordings a type
    assert [s.question for s in asked["eval"]] == [s.question for s in plain["eval"]]
    assert [s.question for s in asked["test"]] == [s.question for s in plain["test"]]


def test_wording_variants_are_made_from_a_types_train_wordings_alone_and_never_a_held_out_one():
    from surgvqa.config import get_config

    cfg = get_config(wording_variants=12)
    variants = data.wording_variants(cfg)
    assert variants == data.wording_variants(cfg)  # seeded: the same in every run
    bank = data.paraphrase_bank()
    known = {" ".join(w.lower().rstrip("?.").split()) for w in bank.wording}
    train = data.wordings_of("train")
    words = {t: {w for x in ws for w in x.lower().rstrip("?.").split()} for t, ws in train.items()}
    everywhere = [" ".join(w.lower().rstrip("?.").split()) for ws in variants.values() for w in ws]
    assert len(everywhere) == len(set(everywhere)) and not set(everywhere) & known  # no eval or test wording
    for qtype, made in variants.items():
        assert 8 <= len(made) <= 12, qtype
        others = set().union(*(v for t, v in words.items() if t != qtype))
        for wording in made:
            said = set(wording.lower().rstrip("?").split())
            assert wording.endswith("?") and wording[0].isupper() and len(said) >= 2
            assert said <= words[qtype], wording  # no word its type's train wordings do not use
            assert said - others, wording  # and one no other type uses
    reading = data.training_wordings(cfg)
    assert all(reading[t] == train[t] + variants[t] for t in train)
    asked = data.load_split(cfg)["train"]
    assert any(s.question in variants[s.question_type] for s in asked)
    assert all(s.question in reading[s.question_type] for s in asked)
    with pytest.raises(ValueError, match="wording_variants=3 .* needs train_wordings='bank'"):
        get_config(train_wordings="template", wording_variants=3)


def test_the_tiny_tokenizer_covers_every_wording_of_the_bank():
    """Every wording round-trips through the tiny preset's own BPE (byte-level: nothing is unknown), and its words
    stay whole-ish: about two pieces a word (the templates' own wordings: 1.2), where bytes would be five or more."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-phantom")
    bank = data.paraphrase_bank()
    pieces_per_word = []
    for wording in bank.wording:
        ids = tokenizer(wording, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == wording
        pieces_per_word.append(len(ids) / len(wording.split()))
    assert sum(pieces_per_word) / len(pieces_per_word) < 2.2
