"""ipywidgets: an inspector for predictions, sample by sample, and a live demo you can ask out loud.

``Inspector`` filters a predictions table (split, question type, correct/incorrect, voice), shows the
8-frame grid, a 2 FPS flipbook (a Play widget driving a frame slider), the spoken question as an audio
player, truth vs prediction vs candidate probabilities, and the browsed type's accuracy beside the blind
prior, with previous/next. ``Demo`` answers a question recorded in the browser (``Recorder``, an anywidget
on getUserMedia and Web Audio), uploaded, or one of the clip's own, about any clip, without being told
which question it is. Both render a static snapshot for executed copies of a notebook.
"""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import anywidget
import ipywidgets as w
import numpy as np
import pandas as pd
import traitlets
from PIL import Image

from .collate import SAMPLE_RATE
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


def type_accuracy_html(predictions: pd.DataFrame, samples: dict[str, Sample], question_type: str,
                       train: Sequence[Sample] | None = None) -> str:
    """The accuracy of the browsed question type (or of all) with n and its 95 % interval, and the blind
    prior's accuracy on the same rows when the train rows are given."""
    from .data import blind_prior
    from .evaluate import wilson_interval

    rows = predictions if question_type == ALL else predictions[predictions["question_type"] == question_type]
    if rows.empty:
        return ""
    correct, n = int(rows["correct"].sum()), len(rows)
    lo, hi = wilson_interval(correct, n)
    text = (f"<b>{html.escape('all types' if question_type == ALL else question_type)}</b>: accuracy "
            f"<b>{correct / n:.1%}</b> [{lo:.1%}, {hi:.1%}], n = {n}")
    if train:
        prior = blind_prior(train)
        hits = [prior.get(samples[u].question_type) == samples[u].short_answer for u in rows["uid"]]
        text += f" · blind prior {np.mean(hits):.1%}"
    return text


class Inspector:
    """Browse predictions with filters; ``load_frames(sample)`` and ``audio_path(uid)`` supply the media,
    ``train`` (optional) the rows of the blind prior shown beside the browsed type's accuracy."""

    def __init__(self, predictions: pd.DataFrame, samples: dict[str, Sample],
                 load_frames: Callable[[Sample], np.ndarray], audio_path: Callable[[str], str | None] | None = None,
                 fps: int = 2, train: Sequence[Sample] | None = None):
        missing = sorted(set(predictions["uid"]) - set(samples))
        if missing:
            raise KeyError(f"{len(missing)} prediction(s) name samples not given, e.g. {missing[:3]}")
        self.predictions = predictions.reset_index(drop=True)
        if "split" not in self.predictions:
            self.predictions["split"] = "test"
        if "voice" not in self.predictions:
            self.predictions["voice"] = ""
        self.samples, self.load_frames, self.audio_path, self.train = samples, load_frames, audio_path, train
        self._frames: np.ndarray | None = None
        options = lambda col: [ALL] + sorted(str(v) for v in self.predictions[col].dropna().unique() if v != "")
        self.split = w.Dropdown(options=options("split"), description="split")
        self.question_type = w.Dropdown(options=options("question_type"), description="type")
        self.outcome = w.ToggleButtons(options=[ALL, "correct", "incorrect"], description="outcome")
        self.voice = w.Dropdown(options=options("voice"), description="voice")
        self.previous, self.next = w.Button(description="◀ previous"), w.Button(description="next ▶")
        # 1-based like the counter beside it, and clamped to the rows that match
        self.position = w.BoundedIntText(value=1, min=1, max=1, description="#", layout=w.Layout(width="140px"))
        self.stats = w.HTML()
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
            self.audio, self.answer, self.stats,
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
        return None if rows.empty else rows.iloc[min(self.position.value, len(rows)) - 1].to_dict()

    def _refilter(self) -> None:
        self.stats.value = type_accuracy_html(self.predictions, self.samples, self.question_type.value, self.train)
        with self.position.hold_trait_notifications():
            self.position.max = max(1, len(self.filtered))
        if self.position.value != 1:
            self.position.value = 1  # triggers _show
        else:
            self._show()

    def _step(self, delta: int) -> None:
        n = len(self.filtered)
        if n:
            self.position.value = (self.position.value - 1 + delta) % n + 1

    def _show(self) -> None:
        rows = self.filtered
        self.count.value = f"{min(self.position.value, len(rows))} of {len(rows)}"
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

    def snapshot_html(self) -> str:
        """What the inspector shows now, as static HTML (an executed notebook's copy has no live widgets)."""
        grid = image_html(frame_grid(self._frames)) if self._frames is not None else ""
        return (f"<div><b>inspector</b> · {html.escape(self.count.value)}<br>{grid}<br>{self.answer.value}"
                f"<br>{self.stats.value}</div>")


def _bytes_from_json(value: Any, _widget: Any) -> bytes:
    return bytes(value) if value is not None else b""


# The browser side of the recorder: the microphone through Web Audio into 16-bit mono PCM, sent to the
# kernel as a WAV (no codec on either side), with a player for the recording.
RECORDER_ESM = """
function wavBytes(samples, rate) {
  const buffer = new ArrayBuffer(44 + 2 * samples.length), view = new DataView(buffer);
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * samples.length, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * samples.length, true);
  samples.forEach((x, i) => { const s = Math.max(-1, Math.min(1, x)); view.setInt16(44 + 2 * i, s < 0 ? s * 0x8000 : s * 0x7fff, true); });
  return buffer;
}
function microphoneProblem(error) {
  if (error.name === "NotAllowedError") return "microphone permission refused: allow it in the browser and record again";
  if (error.name === "NotFoundError") return "no microphone found";
  return `the microphone could not be opened (${error.name}: ${error.message})`;
}
export default {
  render({ model, el }) {
    const record = document.createElement("button"), stop = document.createElement("button");
    const player = document.createElement("audio"), status = document.createElement("span");
    record.textContent = "\u25cf record"; record.className = "surgvqa-record";
    stop.textContent = "\u25a0 stop"; stop.className = "surgvqa-stop"; stop.disabled = true;
    player.controls = true; status.className = "surgvqa-record-status"; status.style.marginLeft = "8px";
    let stream, context, source, processor, chunks = [];
    const report = (message) => { status.textContent = message; model.set("error", message); model.save_changes(); };
    record.onclick = async () => {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        report("this page cannot use a microphone (it needs https or localhost)"); return;
      }
      try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false,
                                                                         noiseSuppression: false, autoGainControl: false } });
      } catch (error) { report(microphoneProblem(error)); return; }
      context = new AudioContext();
      source = context.createMediaStreamSource(stream);
      processor = context.createScriptProcessor(4096, 1, 1);
      chunks = [];
      processor.onaudioprocess = (event) => chunks.push(new Float32Array(event.inputBuffer.getChannelData(0)));
      source.connect(processor); processor.connect(context.destination);
      record.disabled = true; stop.disabled = false;
      model.set("error", ""); model.save_changes(); status.textContent = "recording\u2026";
    };
    stop.onclick = async () => {
      processor.disconnect(); source.disconnect(); stream.getTracks().forEach((t) => t.stop());
      const total = chunks.reduce((n, c) => n + c.length, 0), samples = new Float32Array(total);
      let at = 0; for (const c of chunks) { samples.set(c, at); at += c.length; }
      const rate = context.sampleRate; await context.close();
      const wav = wavBytes(samples, rate);
      player.src = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
      record.disabled = false; stop.disabled = true;
      status.textContent = `recorded ${(total / rate).toFixed(1)} s`;
      model.set("wav", new DataView(wav)); model.save_changes();
    };
    el.append(record, stop, player, status);
  },
};
"""


class Recorder(anywidget.AnyWidget):
    """Record a question in the browser: record, stop, play back. The recording arrives as a 16-bit mono WAV
    in ``wav``; what kept it from recording (no microphone, permission refused, a page that may not use
    one) in ``error``."""

    _esm = RECORDER_ESM
    wav = traitlets.Bytes(b"").tag(sync=True, from_json=_bytes_from_json)
    error = traitlets.Unicode("").tag(sync=True)


def image_html(image: np.ndarray, width: int | None = None) -> str:
    import base64

    size = f" width='{width}'" if width else ""
    return f"<img src='data:image/png;base64,{base64.b64encode(png_bytes(image)).decode()}'{size}>"


class Demo:
    """Ask about any clip out loud. Record a question (``Recorder``), upload one (wav, flac, ogg/opus, mp3),
    or use one of the clip's own spoken questions; the model says which question it understood, its answer
    and confidence, the clip's truth for that question and how long it took. Bad audio (silence, noise, a
    tone, clipping, too short or too long) and microphone problems get a message and no answer.

    ``answer(sample, waveform)`` runs the model on a clip (any of its samples) and returns a
    ``surgvqa.model.HeardAnswer``; ``read_audio(content, name)`` decodes and validates an upload or a
    recording (it raises ``ValueError``); ``own_audio(sample)`` is a sample's own spoken question.
    """

    def __init__(self, samples: Sequence[Sample], load_frames: Callable[[Sample], np.ndarray],
                 own_audio: Callable[[Sample], np.ndarray], read_audio: Callable[[bytes, str], np.ndarray],
                 answer: Callable[[Sample, np.ndarray], Any], fps: int = 2, question_floor: Any = None):
        from .data import question_wordings

        self.load_frames, self.own_audio, self.read_audio, self.answer_fn = load_frames, own_audio, read_audio, answer
        # below this confidence in the question it understood, it says so instead of answering
        # (an ``inference.QuestionConfidenceFloor``, measured on the eval voices)
        self.question_floor = question_floor
        self.clips: dict[str, dict[str, Sample]] = {}
        for s in samples:
            self.clips.setdefault(f"{s.video_id} frames {s.frame_numbers[0]}-{s.frame_numbers[-1]}", {})[s.question_type] = s
        self.wordings = question_wordings("out")
        self.clip = w.Dropdown(options=list(self.clips), description="clip", layout=w.Layout(width="420px"))
        self.question = w.Dropdown(description="its question", layout=w.Layout(width="520px"))
        self.own = w.Button(description="ask this question")
        self.recorder = Recorder()
        self.upload = w.FileUpload(accept="audio/*,.wav,.flac,.ogg,.opus,.mp3,.m4a,.webm", multiple=False,
                                   description="upload")
        self.ask_upload = w.Button(description="answer the upload")
        self.clear = w.Button(description="clear upload")
        self.grid = w.Image(format="png")
        self.frame = w.IntSlider(min=0, max=7, description="frame")
        self.play = w.Play(min=0, max=7, interval=int(1000 / fps), description="flipbook")
        w.jslink((self.play, "value"), (self.frame, "value"))
        self.flipbook = w.Image(format="png", layout=w.Layout(width="224px"))
        self.result = w.HTML()
        self._frames: np.ndarray | None = None
        self.clip.observe(lambda _: self._show_clip(), names="value")
        self.frame.observe(lambda _: self._show_frame(), names="value")
        self.own.on_click(lambda _: self.run_own())
        self.ask_upload.on_click(lambda _: self.run_upload())
        self.clear.on_click(lambda _: self.clear_upload())
        self.recorder.observe(lambda change: self.run_recording(change["new"]), names="wav")
        self.recorder.observe(lambda change: self._microphone_problem(change["new"]), names="error")
        self.widget = w.VBox([
            self.clip, w.HBox([self.question, self.own]), w.HBox([w.Label("ask out loud:"), self.recorder]),
            w.HBox([self.upload, self.ask_upload, self.clear]),
            w.HBox([self.grid, w.VBox([self.flipbook, w.HBox([self.play, self.frame])])]), self.result])
        self._show_clip()

    @property
    def sample(self) -> Sample:
        """The clip's sample of the chosen question (every sample of a clip has the same frames)."""
        return self.clips[self.clip.value][self.question.value]

    def _show_clip(self) -> None:
        questions = self.clips[self.clip.value]
        self.question.options = [(f"{t}: {self.wordings.get(t, questions[t].question)}", t) for t in questions]
        self.question.value = next(iter(questions))
        self._frames = self.load_frames(next(iter(questions.values())))
        self.grid.value = png_bytes(frame_grid(self._frames))
        self._show_frame()
        self.result.value = ""

    def _show_frame(self) -> None:
        if self._frames is not None:
            self.flipbook.value = png_bytes(self._frames[self.frame.value])

    def _microphone_problem(self, message: str) -> None:
        if message:
            self.result.value = f"<b style='color:crimson'>{html.escape(message)}</b> (nothing answered)"

    def clear_upload(self) -> None:
        self.upload.value = ()
        self.result.value = ""

    def run_own(self):
        return self._answer(lambda: self.own_audio(self.sample), f"the clip's own spoken question ({self.sample.uid})")

    def run_upload(self):
        if not self.upload.value:
            self.result.value = "<i>no upload to answer: choose a file first</i>"
            return None
        upload = self.upload.value[0]
        return self._answer(lambda: self.read_audio(bytes(upload["content"]), upload["name"]), upload["name"])

    def run_recording(self, wav: bytes):
        if not wav:
            return None
        return self._answer(lambda: self.read_audio(wav, "the recording"), "the recording")

    def _answer(self, waveform: Callable[[], np.ndarray], source: str):
        import time

        try:
            wave = waveform()
            started = time.perf_counter()
            heard = self.answer_fn(self.sample, wave)
            latency_ms = 1000 * (time.perf_counter() - started)
        except ValueError as e:  # bad audio is reported in plain words, never answered
            advice = getattr(e, "advice", "")
            self.result.value = (f"<b style='color:crimson'>{html.escape(advice or str(e))}</b> (nothing answered)"
                                 + (f"<br><small style='color:grey'>{html.escape(str(e))}</small>" if advice else ""))
            return None
        floor = self.question_floor
        if floor is not None and heard.type_confidence < floor.floor:
            self.result.value = "<br>".join([
                f"heard: {html.escape(source)} ({len(wave) / SAMPLE_RATE:.1f} s)",
                f"<b>I could not tell which question that was</b> (sure of the question {heard.type_confidence:.2f}: "
                f"its best guess, <i>{html.escape(heard.question_type)}</i>, is under the {floor.floor:.2f} that "
                f"{floor.share:.0%} of the eval questions it understood reach); nothing answered: ask again, closer "
                f"to the microphone or in other words", f"latency: {latency_ms:.0f} ms"])
            return None
        truth = self.clips[self.clip.value].get(heard.question_type)
        truth_text = (f"<b>{html.escape(truth.short_answer)}</b> — {html.escape(truth.answer)}" if truth
                      else "<i>this clip has no annotation for that question</i>")
        verdict = ("" if truth is None else " <b style='color:green'>correct</b>" if truth.short_answer == heard.label
                   else " <b style='color:crimson'>wrong</b>")
        self.result.value = "<br>".join([
            f"heard: {html.escape(source)} ({len(wave) / SAMPLE_RATE:.1f} s)",
            f"understood: <b>{html.escape(heard.question_type)}</b> — <i>"
            f"{html.escape(self.wordings.get(heard.question_type, ''))}</i> (by {heard.by}; sure of the question "
            f"{heard.type_confidence:.2f}, over all {len(self.wordings)} question types)",
            f"answer: <b class='surgvqa-answer'>{html.escape(heard.label)}</b> (sure of the answer "
            f"{heard.confidence:.2f}, among that question's answers) — {html.escape(heard.text)}{verdict}",
            f"truth for this clip: {truth_text}", f"latency: {latency_ms:.0f} ms"])
        return heard

    def snapshot_html(self) -> str:
        """What the demo shows now, as static HTML (an executed notebook's copy has no live widgets)."""
        return (f"<div><b>demo</b> · clip {html.escape(self.clip.value)}<br>{image_html(frame_grid(self._frames))}"
                f"<br>{self.result.value}</div>")


def model_answerer(model, cfg, load_frames: Callable[[Sample], np.ndarray]) -> Callable[[Sample, np.ndarray], Any]:
    """``answer(sample, waveform)`` for ``Demo``: the model hears the waveform (audio-only prompt) about the
    sample's clip, whatever question it asks (``surgvqa.inference.answer_any_question``)."""
    import dataclasses

    from .inference import answer_any_question
    from .model import collator

    collate = dataclasses.replace(collator(model), question_mode="audio", frame_size=cfg.frame_size)

    def answer(sample: Sample, waveform: np.ndarray):
        batch = collate([(sample, load_frames(sample), waveform)], for_generation=True)
        return answer_any_question(model, batch)[0]

    return answer


def decode_upload(content: bytes, name: str) -> tuple[np.ndarray, int]:
    """Samples (frames, channels) and rate of uploaded audio, its format told by its content, not its name:
    libsndfile reads wav, flac, ogg (vorbis, opus) and mp3; anything else (the m4a and webm that phones and browsers
    record) goes through ffmpeg where it is installed. Raises ``AudioError`` in plain words."""
    import shutil
    import subprocess

    import soundfile as sf

    from .audio import AudioError

    try:
        wave, rate = sf.read(io.BytesIO(content), dtype="float32", always_2d=True)
        return wave, rate
    except (sf.LibsndfileError, RuntimeError, ValueError):
        pass
    ffmpeg = shutil.which("ffmpeg")
    unreadable = (f"{name} is not a recording this demo can read (wav, flac, ogg, mp3, m4a or webm): export or record "
                  f"it again")
    if ffmpeg is None:
        raise AudioError(f"{name}: libsndfile cannot decode it and ffmpeg is not installed", unreadable +
                         " as wav (m4a and webm need ffmpeg, which scripts/setup.sh installs where apt is available)")
    run = subprocess.run([ffmpeg, "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE),
                          "pipe:1"], input=content, capture_output=True, timeout=60)
    wave = np.frombuffer(run.stdout, dtype="<f4")
    if run.returncode != 0 or wave.size == 0:
        raise AudioError(f"{name}: ffmpeg cannot decode it ({run.stderr.decode(errors='replace').strip()[-200:]})",
                         unreadable)
    return wave.astype(np.float32)[:, None], SAMPLE_RATE


def audio_reader(cfg) -> Callable[[bytes, str], np.ndarray]:
    """``read_audio(content, name)`` for ``Demo``: an upload or a recording decoded by its content
    (``decode_upload``), refused when cut short in transfer, mixed to mono and resampled to the model's rate with
    librosa's soxr resampler, then checked like any question audio (levels, duration, silence, speech). Every
    refusal is an ``AudioError`` that names the upload and says in plain words what to do."""
    import librosa

    from .audio import AudioError, checked_question_audio
    from .files import riff_data_frames

    def read_audio(content: bytes, name: str) -> np.ndarray:
        def fail(reason: str, advice: str = "") -> AudioError:
            return AudioError(f"{name}: {reason}", f"{name}: {advice}" if advice else "")

        frames = riff_data_frames(content)
        if frames is not None and frames[0] > frames[1]:
            raise fail(f"cut short: its WAV header declares {frames[0]} frames but only {frames[1]} arrived",
                       f"only {frames[1] / max(frames[0], 1):.0%} of it arrived: upload it again")
        wave, rate = decode_upload(content, name)
        if np.isfinite(wave).all():
            wave = wave.mean(axis=1, keepdims=True)
            if rate != cfg.sample_rate:
                wave = librosa.resample(wave[:, 0], orig_sr=rate, target_sr=cfg.sample_rate,
                                        res_type="soxr_hq")[:, None]
        return checked_question_audio(wave.astype(np.float32), cfg.sample_rate, cfg, False, fail)

    return read_audio
