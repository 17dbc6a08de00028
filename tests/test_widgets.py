import datetime
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from surgvqa import data
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
    assert inspector.position.value == 1 and inspector.count.value == f"2 of {n}"
    inspector.previous.click(); inspector.previous.click()
    assert inspector.position.value == n - 1  # wraps around


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


def test_demo_answers_and_reports_bad_audio(rows):
    asked = []

    def answer(sample, wave):
        asked.append((sample.uid, len(wave)))
        return sample.short_answer, {sample.short_answer: 0.9}, sample.answer

    def read_wav(content, name):
        raise ValueError(f"{name}: sample rate 8000 Hz, expected 16000 Hz")

    demo = Demo(rows[:3], clip_of, lambda s: np.ones(16000, np.float32), read_wav, answer)
    demo.sample.value = rows[1].uid
    label, probabilities, _ = demo.run()
    assert asked == [(rows[1].uid, 16000)] and label == rows[1].short_answer
    assert "confidence 0.90" in demo.result.value
    demo.upload.value = ({"name": "q.wav", "content": memoryview(b"RIFF"), "type": "audio/wav", "size": 4,
                          "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},)
    assert demo.run() is None and "8000 Hz" in demo.result.value and len(asked) == 1


def test_inspector_plays_the_current_samples_question(rows, tmp_path):
    wavs = {}
    for i, s in enumerate(rows):
        wavs[s.uid] = tmp_path / f"{i}.wav"
        wavs[s.uid].write_bytes(b"RIFF" + bytes([i]) * 8)
    inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of, audio_path=wavs.get)
    assert inspector.audio.value == wavs[rows[0].uid].read_bytes()
    inspector.next.click()
    assert inspector.audio.value == wavs[rows[1].uid].read_bytes()

