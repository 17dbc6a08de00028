"""ipywidgets: an inspector for predictions, sample by sample, and a live demo of the model.

``Inspector`` filters a predictions table (split, question type, correct/incorrect, voice), shows the
8-frame grid, a 2 FPS flipbook (a Play widget driving a frame slider), the spoken question as an audio
player, and truth vs prediction vs candidate probabilities, with previous/next. ``Demo`` answers a
question from an uploaded WAV (or a chosen sample's audio) about a chosen sample's clip.
"""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import ipywidgets as w
import numpy as np
import pandas as pd
from PIL import Image

from .data import Sample

ALL = "(all)"


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_grid(frames: np.ndarray, columns: int = 4) -> np.ndarray:
    """The 8 frames tiled into one image, 2 rows of 4, with a 2-pixel gap."""
    n, h, wd, c = frames.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2) - 2, columns * (wd + 2) - 2, c), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        r, col = divmod(i, columns)
        grid[r * (h + 2): r * (h + 2) + h, col * (wd + 2): col * (wd + 2) + wd] = f
    return grid


def answer_html(row: dict[str, Any], sample: Sample) -> str:
    """Truth vs prediction vs probabilities of one sample, as HTML."""
    ok = row.get("correct")
    verdict = {True: "<b style='color:green'>correct</b>", False: "<b style='color:crimson'>wrong</b>"}.get(ok, "")
    lines = [
        f"<b>{html.escape(sample.uid)}</b> · {html.escape(sample.question_type)} · {verdict}",
        f"question: <i>{html.escape(sample.question)}</i>",
        f"truth: <b>{html.escape(sample.short_answer)}</b> — {html.escape(sample.answer)}",
        f"prediction: <b>{html.escape(str(row.get('parsed', '')))}</b> — {html.escape(str(row.get('prediction', '')))}",
    ]
    if row.get("voice"):
        lines.append(f"voice: {html.escape(str(row['voice']))}")
    probabilities = row.get("probabilities")
    if isinstance(probabilities, dict) and probabilities:
        bars = "".join(
            f"<tr><td>{html.escape(label)}</td><td><div style='background:#4a90d9;height:10px;"
            f"width:{int(200 * p)}px'></div></td><td>{p:.2f}</td></tr>"
            for label, p in sorted(probabilities.items(), key=lambda kv: -kv[1]))
        lines.append(f"<table>{bars}</table>")
    return "<br>".join(lines)


class Inspector:
    """Browse predictions with filters; ``load_frames(sample)`` and ``audio_path(uid)`` supply the media."""

    def __init__(self, predictions: pd.DataFrame, samples: dict[str, Sample],
                 load_frames: Callable[[Sample], np.ndarray], audio_path: Callable[[str], str | None] | None = None,
                 fps: int = 2):
        missing = sorted(set(predictions["uid"]) - set(samples))
        if missing:
            raise KeyError(f"{len(missing)} prediction(s) name samples not given, e.g. {missing[:3]}")
        self.predictions = predictions.reset_index(drop=True)
        if "split" not in self.predictions:
            self.predictions["split"] = "test"
        if "voice" not in self.predictions:
            self.predictions["voice"] = ""
        self.samples, self.load_frames, self.audio_path = samples, load_frames, audio_path
        self._frames: np.ndarray | None = None
        options = lambda col: [ALL] + sorted(str(v) for v in self.predictions[col].dropna().unique() if v != "")
        self.split = w.Dropdown(options=options("split"), description="split")
        self.question_type = w.Dropdown(options=options("question_type"), description="type")
        self.outcome = w.ToggleButtons(options=[ALL, "correct", "incorrect"], description="outcome")
        self.voice = w.Dropdown(options=options("voice"), description="voice")
        self.previous, self.next = w.Button(description="◀ previous"), w.Button(description="next ▶")
        self.position = w.IntText(value=0, description="#", layout=w.Layout(width="140px"))
        self.count = w.Label()
        self.grid = w.Image(format="png")
        self.frame = w.IntSlider(min=0, max=7, description="frame")
        self.play = w.Play(min=0, max=7, interval=int(1000 / fps), description="flipbook")
        w.jslink((self.play, "value"), (self.frame, "value"))
        self.flipbook = w.Image(format="png", layout=w.Layout(width="224px"))
        # an Audio widget, not IPython's Audio shown in an Output widget: that pairing can deadlock
        # headless execution (nbclient), and the widget needs no capture at all
        self.audio = w.Audio(format="wav", autoplay=False, controls=True)
        self.answer = w.HTML()
        for control in (self.split, self.question_type, self.outcome, self.voice):
            control.observe(lambda _: self._refilter(), names="value")
        self.position.observe(lambda _: self._show(), names="value")
        self.frame.observe(lambda _: self._show_frame(), names="value")
        self.previous.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(1))
        self.widget = w.VBox([
            w.HBox([self.split, self.question_type, self.voice]), self.outcome,
            w.HBox([self.previous, self.position, self.next, self.count]),
            w.HBox([self.grid, w.VBox([self.flipbook, w.HBox([self.play, self.frame])])]),
            self.audio, self.answer,
        ])
        self._refilter()

    @property
    def filtered(self) -> pd.DataFrame:
        p, keep = self.predictions, pd.Series(True, index=self.predictions.index)
        for control, column in ((self.split, "split"), (self.question_type, "question_type"), (self.voice, "voice")):
            if control.value != ALL:
                keep &= p[column].astype(str) == control.value
        if self.outcome.value != ALL:
            keep &= p["correct"] == (self.outcome.value == "correct")
        return p[keep]

    @property
    def current(self) -> dict[str, Any] | None:
        rows = self.filtered
        return None if rows.empty else rows.iloc[min(self.position.value, len(rows) - 1)].to_dict()

    def _refilter(self) -> None:
        if self.position.value != 0:
            self.position.value = 0  # triggers _show
        else:
            self._show()

    def _step(self, delta: int) -> None:
        n = len(self.filtered)
        if n:
            self.position.value = (self.position.value + delta) % n

    def _show(self) -> None:
        rows = self.filtered
        self.count.value = f"{min(self.position.value + 1, len(rows))} of {len(rows)}"
        row = self.current
        self.audio.value = b""
        if row is None:
            self.answer.value, self._frames = "<i>no prediction matches these filters</i>", None
            self.grid.value = self.flipbook.value = b""
            return
        sample = self.samples[row["uid"]]
        self._frames = self.load_frames(sample)
        self.grid.value = png_bytes(frame_grid(self._frames))
        self._show_frame()
        self.answer.value = answer_html(row, sample)
        path = self.audio_path(sample.uid) if self.audio_path else None
        if path:
            self.audio.value = Path(path).read_bytes()

    def _show_frame(self) -> None:
        if self._frames is not None:
            self.flipbook.value = png_bytes(self._frames[self.frame.value])


class Demo:
    """Pick a sample's clip, ask by uploading a WAV (or use the sample's own spoken question), answer.

    ``answer(sample, waveform)`` runs the model and returns ``(label, probabilities, text)``;
    ``read_wav(bytes)`` turns an upload into a validated 16 kHz waveform (it raises on bad audio).
    """

    def __init__(self, samples: Sequence[Sample], load_frames: Callable[[Sample], np.ndarray],
                 own_audio: Callable[[Sample], np.ndarray], read_wav: Callable[[bytes, str], np.ndarray],
                 answer: Callable[[Sample, np.ndarray], tuple[str, dict[str, float], str]]):
        self.samples = {s.uid: s for s in samples}
        self.load_frames, self.own_audio, self.read_wav, self.answer_fn = load_frames, own_audio, read_wav, answer
        self.sample = w.Dropdown(options=[(f"{s.uid} · {s.question_type}", s.uid) for s in samples],
                                 description="clip")
        self.upload = w.FileUpload(accept=".wav", multiple=False, description="upload WAV")
        self.ask = w.Button(description="answer", button_style="primary")
        self.grid = w.Image(format="png")
        self.result = w.HTML()
        self.sample.observe(lambda _: self._show_clip(), names="value")
        self.ask.on_click(lambda _: self.run())
        self.widget = w.VBox([w.HBox([self.sample, self.upload, self.ask]), self.grid, self.result])
        self._show_clip()

    def _show_clip(self) -> None:
        self.grid.value = png_bytes(frame_grid(self.load_frames(self.samples[self.sample.value])))
        self.result.value = ""

    def run(self) -> tuple[str, dict[str, float], str] | None:
        sample = self.samples[self.sample.value]
        try:
            if self.upload.value:
                upload = self.upload.value[0]
                waveform, source = self.read_wav(bytes(upload["content"]), upload["name"]), upload["name"]
            else:
                waveform, source = self.own_audio(sample), "the sample's own spoken question"
            label, probabilities, text = self.answer_fn(sample, waveform)
        except ValueError as e:  # bad audio is reported, never answered from silence
            self.result.value = f"<b style='color:crimson'>{html.escape(str(e))}</b>"
            return None
        confidence = probabilities.get(label, float("nan"))
        self.result.value = (f"heard: {html.escape(source)}<br>answer: <b>{html.escape(label)}</b> "
                             f"(confidence {confidence:.2f}) — {html.escape(text)}")
        return label, probabilities, text


def model_answerer(model, cfg, load_frames: Callable[[Sample], np.ndarray], max_new_tokens: int = 32
                   ) -> Callable[[Sample, np.ndarray], tuple[str, dict[str, float], str]]:
    """``answer(sample, waveform)`` for ``Demo``: the model hears the waveform (audio-only prompt) about the
    sample's clip; returns the most likely label, the candidate probabilities and the free-text answer."""
    import dataclasses

    from .model import answer_and_score, collator

    collate = dataclasses.replace(collator(model), question_mode="audio", frame_size=cfg.frame_size)

    def answer(sample: Sample, waveform: np.ndarray) -> tuple[str, dict[str, float], str]:
        batch = collate([(sample, load_frames(sample), waveform)], for_generation=True)
        (text,), (scored,) = answer_and_score(model, batch, max_new_tokens)
        return scored.label, scored.probabilities, text

    return answer


def wav_reader(cfg) -> Callable[[bytes, str], np.ndarray]:
    """``read_wav(content, name)`` for ``Demo``: an uploaded WAV checked like any question audio (exists,
    decodes, not silent, duration bounds); other sample rates and stereo are converted, since an upload
    comes from anywhere."""
    import tempfile

    from .audio import load_question_audio

    def read_wav(content: bytes, name: str) -> np.ndarray:
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(content)
            f.flush()
            return load_question_audio(f"upload {name}", f.name, cfg, resample=True)

    return read_wav
