import dataclasses
import datetime
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from surgvqa import data
from surgvqa.audio import AudioError
from surgvqa.widgets import Demo, Inspector, frame_grid


@pytest.fixture(scope="module")
def rows():
    test = data.published_split()["test"]
    return [s for s in test if s.question_type in ("nbi_status", "lesion_motion_direction")][:12]


def clip_of(sample):
    # a clip whose pixels say which sample and frame they are, so the display can be checked
    value = int(sample.id.split("_")[1]) % 200
    return np.stack([np.full((16, 16, 3), value + i, dtype=np.uint8) for i in range(8)])


def predictions(rows):
    records = []
    for i, s in enumerate(rows):
        correct = i % 3 != 0
        parsed = s.short_answer if correct else "other"
        records.append(dict(uid=s.uid, question_type=s.question_type, short_answer=s.short_answer,
                            prediction=f"text {i}", parsed=parsed, correct=correct,
                            probabilities={parsed: 0.7, "x": 0.3}, voice="en-us+m3" if i % 2 else "en-gb+f2",
                            split="test"))
    return pd.DataFrame(records)


def decode(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def test_frame_grid_tiles_eight_frames():
    frames = np.stack([np.full((4, 5, 3), i, dtype=np.uint8) for i in range(8)])
    grid = frame_grid(frames)
    assert grid.shape == (4 * 2 + 2, 5 * 4 + 6, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 7, 0] == 1 and grid[6, 0, 0] == 4 and grid[-1, -1, 0] == 7


def test_inspector_filters_and_navigates(rows):
    inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of)
    assert len(inspector.filtered) == 12 and inspector.count.value == "1 of 12"
    first = inspector.answer.value
    inspector.question_type.value = "lesion_motion_direction"
    assert set(inspector.filtered.question_type) == {"lesion_motion_direction"}
    assert "lesion_motion_direction" in inspector.answer.value and inspector.answer.value != first
    inspector.outcome.value = "incorrect"
    assert not inspector.filtered.correct.any() and "wrong" in inspector.answer.value
    inspector.outcome.value = "(all)"
    inspector.voice.value = "en-gb+f2"
    assert set(inspector.filtered.voice) == {"en-gb+f2"}
    n = len(inspector.filtered)
    inspector.next.click()
    assert inspector.position.value == 2 and inspector.count.value == f"2 of {n}"  # 1-based, like the counter
    inspector.previous.click(); inspector.previous.click()
    assert inspector.position.value == n  # wraps around
    inspector.position.value = n + 5
    assert inspector.position.value == n  # clamped to the rows that match


def test_inspector_shows_the_current_samples_frames(rows):
    inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of)
    sample = rows[0]
    assert decode(inspector.grid.value)[0, 0, 0] == clip_of(sample)[0, 0, 0, 0]
    inspector.frame.value = 5
    assert decode(inspector.flipbook.value)[0, 0, 0] == clip_of(sample)[5, 0, 0, 0]
    inspector.next.click()
    assert decode(inspector.grid.value)[0, 0, 0] == clip_of(rows[1])[0, 0, 0, 0]


def test_inspector_says_when_nothing_matches(rows):
    inspector = Inspector(predictions(rows)[lambda d: d.correct], {s.uid: s for s in rows}, clip_of)
    inspector.outcome.value = "incorrect"
    assert inspector.filtered.empty and "no prediction matches" in inspector.answer.value


def test_inspector_refuses_predictions_of_unknown_samples(rows):
    with pytest.raises(KeyError, match="name samples not given"):
        Inspector(predictions(rows), {s.uid: s for s in rows[:3]}, clip_of)


def heard(question_type="nbi_status", label="yes"):
    from surgvqa.inference import HeardAnswer

    return HeardAnswer(question_type, label, 0.9, 0.8, "Yes, NBI light is on in this sequence.", "its answer sentence")


def test_demo_answers_whatever_it_hears_and_names_the_question_and_the_truth(rows):
    asked = []

    def answer(sample, wave):
        asked.append((sample.uid, len(wave)))
        return heard()

    def read_audio(content, name):
        if content == b"noise":
            raise AudioError(f"{name}: no speech heard: 0.00 s of it sounds like speech",
                             f"{name}: no speech could be heard in it: ask the question aloud, close to the microphone")
        return np.ones(8000, np.float32)

    demo = Demo(rows, clip_of, lambda s: np.ones(16000, np.float32), read_audio, answer)
    nbi = next(s for s in rows if s.question_type == "nbi_status")
    demo.clip.value = next(k for k, qs in demo.clips.items() if qs.get("nbi_status") == nbi)
    demo.question.value = "nbi_status"
    assert demo.run_own() == heard() and asked == [(nbi.uid, 16000)]
    shown = demo.result.value
    assert "understood: <b>nbi_status</b>" in shown and "latency:" in shown
    # how sure it is of which question it heard (over every type), beside how sure of the answer
    assert "sure of the question 0.80, over all 20 question types" in shown and "sure of the answer 0.90" in shown
    assert f"truth for this clip: <b>{nbi.short_answer}</b>" in shown
    assert ("correct" if nbi.short_answer == "yes" else "wrong") in shown
    demo.recorder.wav = b"speech"  # a recording arriving from the browser is answered at once
    assert len(asked) == 2 and "heard: the recording (0.5 s)" in demo.result.value
    demo.recorder.wav = b"noise"
    assert len(asked) == 2 and "no speech could be heard in it" in demo.result.value
    assert "nothing answered" in demo.result.value
    demo.recorder.error = "microphone permission refused: allow it in the browser and record again"
    assert "permission refused" in demo.result.value and len(asked) == 2
    assert demo.run_upload() is None and "no upload" in demo.result.value
    demo.upload.value = ({"name": "q.ogg", "content": memoryview(b"noise"), "type": "audio/ogg", "size": 5,
                          "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},)
    assert demo.run_upload() is None and "q.ogg: no speech could be heard" in demo.result.value and len(asked) == 2
    demo.clear.click()
    assert demo.upload.value == () and demo.result.value == ""


def test_demo_says_when_it_cannot_tell_which_question_it_heard(rows):
    from surgvqa.inference import QuestionConfidenceFloor

    floor = QuestionConfidenceFloor(floor=0.85, share=0.95, n=40, understood=0.9, refused_below=0.1)
    demo = Demo(rows, clip_of, lambda s: np.ones(16000, np.float32), lambda c, n: np.ones(8000, np.float32),
                lambda sample, wave: heard(), question_floor=floor)  # sure of the question 0.80 < 0.85
    assert demo.run_own() is None
    shown = demo.result.value
    assert "I could not tell which question that was" in shown and "nothing answered" in shown
    assert "sure of the question 0.80" in shown and "under the 0.85 that 95% of the eval questions" in shown
    assert "answer:" not in shown
    demo.question_floor = dataclasses.replace(floor, floor=0.5)  # sure enough: answered
    assert demo.run_own() == heard() and "answer:" in demo.result.value


def test_demo_offers_every_clip_and_says_when_a_clip_lacks_the_understood_question(rows):
    demo = Demo(rows, clip_of, lambda s: np.ones(16000, np.float32), lambda c, n: np.ones(8000, np.float32),
                lambda sample, wave: heard("tool_identification", "forceps"))
    assert len(demo.clips) == len({s.clip_key for s in rows})
    assert sum(len(qs) for qs in demo.clips.values()) == len(rows)
    demo.run_own()
    assert "no annotation for that question" in demo.result.value
    assert "<img src='data:image/png;base64," in demo.snapshot_html()


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")])
def test_uploads_in_the_common_formats_are_decoded_resampled_and_validated(fmt, subtype):
    import soundfile as sf

    from surgvqa.config import get_config
    from surgvqa.widgets import audio_reader
    from test_collate import speech_like

    rate = 48000 if subtype == "OPUS" else 44100  # what phones and browsers record at
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(speech_like(2.0, rate)[:, None], 2, axis=1), rate, format=fmt, subtype=subtype)
    wave = audio_reader(get_config())(buffer.getvalue(), f"question.{fmt.lower()}")
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) / 16000 - 2.0) < 0.1


def test_uploads_that_cannot_be_a_question_are_refused_by_name_in_plain_words(monkeypatch):
    import soundfile as sf

    from surgvqa.audio import AudioError
    from surgvqa.config import get_config
    from surgvqa.widgets import audio_reader
    from test_collate import speech_like

    read = audio_reader(get_config())

    def refusal(content, name):
        with pytest.raises(AudioError) as error:
            read(content, name)
        said = f"{error.value.advice} {error.value}"
        assert name in error.value.advice and "/tmp" not in said and "BytesIO" not in said and "<_io" not in said
        return error.value.advice

    assert "not a recording this demo can read" in refusal(b"not audio at all", "q.wav")
    noise = io.BytesIO()
    sf.write(noise, (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32), 16000, format="WAV")
    assert "no speech could be heard in it" in refusal(noise.getvalue(), "noise.wav")
    whole = io.BytesIO()
    sf.write(whole, speech_like(2.0), 16000, format="WAV", subtype="PCM_16")
    assert read(whole.getvalue(), "whole.wav").size == 32000
    cut = whole.getvalue()[: 44 + 32000]  # half of the samples arrived, the header says all
    assert "only 50% of it arrived: upload it again" in refusal(cut, "cut.wav")
    monkeypatch.setattr("shutil.which", lambda _: None)  # a machine without ffmpeg says what would read it
    assert "m4a and webm need ffmpeg" in refusal(b"\x00\x00\x00\x20ftypM4A " + bytes(64), "q.m4a")


FFMPEG_FORMATS = {"m4a": ["-c:a", "aac"], "webm": ["-c:a", "libopus"], "mp3": ["-c:a", "libmp3lame"],
                  "ogg": ["-c:a", "libvorbis"]}


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("fmt", sorted(FFMPEG_FORMATS))
def test_what_phones_and_browsers_record_is_read_by_its_content_and_answered_like_its_wav(fmt, tmp_path):
    """m4a, webm, mp3 and ogg made by ffmpeg here, uploaded under a misleading name too: each decodes to the
    question its WAV holds (the same length, the same speech) and passes the same checks."""
    import subprocess

    import soundfile as sf

    from surgvqa import audio, tts
    from surgvqa.config import get_config
    from surgvqa.tts import VoiceSpec
    from surgvqa.widgets import audio_reader

    wave = tts.render("Is the instrument on screen a snare?", VoiceSpec("espeak-ng", "en-us+m3", 160, 50), 16000)
    sf.write(str(tmp_path / "q.wav"), wave, 16000)
    encoded = tmp_path / f"q.{fmt}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tmp_path / "q.wav"), "-ar", "48000", "-ac", "2",
                    *FFMPEG_FORMATS[fmt], str(encoded)], check=True)
    read = audio_reader(get_config())
    reference = read((tmp_path / "q.wav").read_bytes(), "q.wav")
    for name in (f"question.{fmt}", "question.wav"):  # the name does not decide the decoder
        decoded = read(encoded.read_bytes(), name)
        assert abs(decoded.size - reference.size) < 0.08 * 16000  # encoder padding, at most tens of ms
        assert abs(audio.speech_seconds(decoded, 16000) - audio.speech_seconds(reference, 16000)) < 0.2


def test_inspector_plays_the_current_samples_question(rows, tmp_path):
    wavs = {}
    for i, s in enumerate(rows):
        wavs[s.uid] = tmp_path / f"{i}.wav"
        wavs[s.uid].write_bytes(b"RIFF" + bytes([i]) * 8)
    inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of, audio_path=wavs.get)
    assert inspector.audio.value == wavs[rows[0].uid].read_bytes()
    inspector.next.click()
    assert inspector.audio.value == wavs[rows[1].uid].read_bytes()



def test_inspector_shows_the_browsed_types_accuracy_with_its_interval_and_the_blind_prior(rows):
    from surgvqa.evaluate import wilson_interval

    train = data.published_split()["train"]
    inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of, train=train)
    inspector.question_type.value = "nbi_status"
    shown = predictions(rows)[lambda d: d.question_type == "nbi_status"]
    lo, hi = wilson_interval(int(shown.correct.sum()), len(shown))
    prior = data.blind_prior(train)["nbi_status"]
    prior_accuracy = sum(s.short_answer == prior for s in rows if s.question_type == "nbi_status") / len(shown)
    assert (f"accuracy <b>{shown.correct.mean():.1%}</b> [{lo:.1%}, {hi:.1%}], n = {len(shown)}"
            in inspector.stats.value)
    assert f"blind prior {prior_accuracy:.1%}" in inspector.stats.value
