"""Spoken questions: the synthesis cache with its manifest, and the rule that a question's audio is usable speech.

* ``synthesize_split`` speaks every question of a split with its voice (``surgvqa.tts``), under room noise where
  asked (``surgvqa.noise``), into 16 kHz mono WAV files keyed on (text, voice spec, noise), written atomically on
  every core, with a manifest (CSV and JSONL) beside them; ``python -m surgvqa synthesize`` runs it (``main``).
* ``load_question_audio`` refuses anything that is not usable speech with one ``AudioError`` naming the sample
  and the file; it never substitutes silence. ``speech_problem`` tells a spoken question from noise, a tone or
  a steady sound.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import soundfile as sf

from .config import Config, get_config, parse_overrides
from .data import SPLIT_NAMES, Sample, load_split
from .files import end_with_parent, readable_wav, remove_stale_temporaries, riff_data_frames, write_atomic
from .noise import RoomNoise, add_room_noise, load_noise_kernels, noise_sources, training_noise
from .tts import (ENGINE_WORKERS, SILENCE_RMS, TTSError, VoiceError, VoiceSpec, assign_voices, render, resample_audio,
                  rms, sample_rng)

MAX_PEAK = 1.0  # full scale: a float WAV beyond it holds samples in other units (raw integers, say), not audio
CLIP_LEVEL = 0.999  # |x| at or above this sits at full scale (16-bit full scale reads as 0.99997)
MAX_CLIPPED_FRACTION = 0.01  # ``render`` keeps every engine below 0.99, so a question we made never clips


class AudioError(ValueError):
    """A question's audio file is unusable; the message names the sample and the file, ``advice`` says in plain
    words what to do (empty where the message is the whole story)."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.advice = advice


# --- synthesis with a cache ------------------------------------------------------------------------

NOISY_SUFFIX = ".noisy.wav"  # a question with room noise added on purpose (surgvqa.noise)


def audio_relpath(text: str, spec: VoiceSpec, noise: "RoomNoise | None" = None, noise_seed: int = 0) -> str:
    """The cache key: a file name that depends on the text, the full voice spec and the noise added (its kind,
    SNR and seed), nothing else."""
    key = f"{spec.key}\n{text}" + ("" if noise is None else f"\n{noise.tag}\n{noise_seed}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{spec.engine}/{digest}{'.wav' if noise is None else NOISY_SUFFIX}"


# A drawn training noise that leaves no speech to hear is raised this much at a time until the speech rule hears the
# question (the manifest then says the SNR used); a noise condition asked for (the robustness checks) is never changed.
DROWNED_STEP_DB = 5.0
USED_NOISE_SUFFIX = ".noise"  # beside a file whose noise was raised: the condition used


def _render_jobs(jobs: Sequence[tuple]) -> list[str]:
    """Render jobs (text, voice, path, sample rate, noise, noise seed, noise sources, raise drowned noise) into
    their files, the speech rule judging the files of the chunk together (``speech_seconds_of``)."""
    rates = {job[3] for job in jobs}
    if len(rates) != 1:
        raise ValueError(f"a chunk of synthesis jobs at several sample rates: {sorted(rates)}")
    sample_rate = rates.pop()
    waves = [render(text, spec, sample_rate) for text, spec, *_ in jobs]
    with_noise = [k for k, job in enumerate(jobs) if job[4] is not None]
    # the speech itself is checked before noise covers it
    for k, seconds in zip(with_noise, speech_seconds_of([waves[k] for k in with_noise], sample_rate)):
        problem = speech_problem(waves[k], sample_rate, seconds)
        if problem:
            raise TTSError(f"{jobs[k][1]} saying {jobs[k][0]!r}: {problem}")
    used = [job[4] for job in jobs]
    # the speech rule judges the samples each file will hold (16-bit), once: its verdict decides whether a drawn
    # noise is raised and is kept beside the file, so that checking it later (02's validation, every loader)
    # reads the verdict instead of running the rule again
    files = [_as_wav(_heard(wave, sample_rate, noise, job), sample_rate) for wave, noise, job in zip(waves, used, jobs)]
    seconds = speech_seconds_of([written for _, written in files], sample_rate)
    for k, job in enumerate(jobs):
        path, noise, raise_drowned = job[2], job[4], job[7]
        while (raise_drowned and used[k] is not None and used[k].snr_db is not None
               and speech_problem(files[k][1], sample_rate, seconds[k])):
            used[k] = RoomNoise(used[k].kind, used[k].snr_db + DROWNED_STEP_DB)
            files[k] = _as_wav(_heard(waves[k], sample_rate, used[k], job), sample_rate)
            seconds[k] = speech_seconds(files[k][1], sample_rate)
        used_file = Path(path + USED_NOISE_SUFFIX)
        used_file.unlink(missing_ok=True)
        write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(files[k][0]))
        if noise is not None and used[k] != noise:
            used_file.write_text(used[k].tag)
        _keep_verdict(Path(path), _verdict_key(Path(path)), seconds[k])
    return [job[2] for job in jobs]


def _heard(wave: np.ndarray, sample_rate: int, noise: RoomNoise | None, job: tuple) -> np.ndarray:
    """The question as it will be heard: ``wave`` under ``noise`` (the job's noise seed and sources), if any."""
    return wave if noise is None else add_room_noise(wave, sample_rate, noise, job[5], job[6])


def _as_wav(wave: np.ndarray, sample_rate: int) -> tuple[bytes, np.ndarray]:
    """A 16-bit WAV file's bytes for ``wave``, and the samples a reader decodes from them."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, subtype="PCM_16", format="WAV")
    encoded = buffer.getvalue()
    return encoded, sf.read(io.BytesIO(encoded), dtype="float32")[0]


def render_into_cache(jobs: Sequence[tuple], root: Path, workers: int, what: str, progress: bool = True) -> None:
    """Render the ``_render_jobs`` jobs (text, voice, path, sample rate, noise, noise seed, noise sources, raise
    drowned noise) whose file under the cache ``root`` is missing, or left empty or unreadable, on ``workers``
    processes, with a progress bar; the first alone, so that an engine that cannot speak fails once, before the
    pool starts."""
    from .progress import progress_bar

    for engine in {job[1].engine for job in jobs}:
        remove_stale_temporaries(root / engine)
    wanted = {job[2]: job for job in jobs}
    jobs = [job for path, job in wanted.items() if not readable_wav(Path(path))]
    bar = progress_bar(total=len(jobs), desc=f"{what} ({len(wanted) - len(jobs)} of {len(wanted)} files cached)",
                       unit="file", disable=not progress or not jobs)
    if jobs:
        _render_jobs(jobs[:1])
        bar.update()
    rest = jobs[1:]
    # chunks of up to VAD_BATCH files, the speech rule judging each chunk at once; smaller ones where there are
    # few files, so that every worker gets several
    size = max(1, min(VAD_BATCH, len(rest) // (4 * workers)))
    chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
    if workers > 1 and len(chunks) > 1:
        if any(job[4] is not None for job in rest):
            load_noise_kernels()  # once, here: workers compiling them together corrupt numba's cache
        with ProcessPoolExecutor(workers, initializer=end_with_parent) as pool:
            for done in pool.map(_render_jobs, chunks):
                bar.update(len(done))
    else:
        for chunk in chunks:
            bar.update(len(_render_jobs(chunk)))
    bar.close()


def manifest_path(split: str, cfg: Config | None = None, suffix: str = ".csv") -> Path:
    cfg = cfg or get_config()
    return cfg.path(cfg.audio_dir) / f"manifest_{cfg.template}_{split}{suffix}"


def synthesize_split(samples: Sequence[Sample], split: str, cfg: Config | None = None,
                     question_text: Callable[[Sample], str] = lambda s: s.question,
                     workers: int | None = None, progress: bool = True, manifest: str | None = None,
                     voices: Mapping[str, VoiceSpec] | None = None, noise: RoomNoise | None = None) -> pd.DataFrame:
    """Speak every sample's question with its assigned voice (of ``split``'s pool, or ``voices[uid]``); return
    (and save, under ``manifest``, by default the split's name) the manifest.

    Room noise (``surgvqa.noise``): ``noise`` over every question (the robustness checks, with babble of eval
    voices); for the train split, ``cfg.train_noise`` of the questions get a drawn ``training_noise`` (babble of
    train voices); a drawn noise that leaves no speech to hear is raised by ``DROWNED_STEP_DB`` until the speech
    rule hears the question, and the manifest says the SNR used. Files already in the cache (same text, voice spec
    and noise) are not rendered again. ``path``
    in the manifest is relative to ``cfg.audio_dir``; the manifest is saved there as CSV and JSONL.
    """
    cfg = cfg or get_config()
    root = cfg.path(cfg.audio_dir)
    silent = [f"{s.uid} ({s.source})" for s in samples if not question_text(s).strip()]
    if silent:  # before any voice is assigned or file rendered
        raise TTSError(f"nothing to say for {len(silent)} sample(s) of {split}: empty question text, e.g. "
                       f"{', '.join(silent[:3])}")
    missing = [s.uid for s in samples if voices is not None and s.uid not in voices]
    if missing:
        raise VoiceError(f"no voice given for {len(missing)} sample(s) of {split}, e.g. {missing[:3]}")
    voices = voices if voices is not None else assign_voices(samples, split, cfg)
    noises = {s.uid: noise for s in samples}
    if noise is None and split == "train" and cfg.train_noise > 0:
        draws = {s.uid: sample_rng(s.uid, cfg.seed, "noise") for s in samples}
        noises = {u: training_noise(rng) if rng.uniform() < cfg.train_noise else None for u, rng in draws.items()}
    sources = None
    if any(n is not None and n.kind in ("babble", "beeps") for n in noises.values()):
        sources = noise_sources(root / "noise", "train" if noise is None else "eval", cfg.sample_rate)
    rows, jobs = [], []
    for s in samples:
        text, spec, heard_noise = question_text(s), voices[s.uid], noises[s.uid]
        noise_seed = int(sample_rng(s.uid, cfg.seed, "noise seed").integers(2**31))
        rel = audio_relpath(text, spec, heard_noise, noise_seed)
        rows.append(dict(uid=s.uid, sample_id=s.id, video_id=s.video_id, split=split,
                         question_type=s.question_type, path=rel, engine=spec.engine, voice=spec.voice,
                         rate=spec.rate, pitch=spec.pitch, noise=heard_noise.tag if heard_noise else "", text=text))
        jobs.append((text, spec, str(root / rel), cfg.sample_rate, heard_noise, noise_seed, sources, noise is None))
    workers = workers or min(ENGINE_WORKERS[v.engine] or os.cpu_count() or 1 for v in voices.values())
    render_into_cache(jobs, root, workers, f"synthesize {split}", progress)
    facts = {rel: _file_facts(root / rel) for rel in {r["path"] for r in rows}}
    for r in rows:
        r["duration_s"], r["sha256"] = facts[r["path"]]
        used = root / (r["path"] + USED_NOISE_SUFFIX)
        if r["noise"] and used.is_file():  # a drawn training noise raised until the question was heard
            r["noise"] = used.read_text().strip()
    table = pd.DataFrame(rows, columns=["uid", "sample_id", "video_id", "split", "question_type", "path",
                                        "engine", "voice", "rate", "pitch", "noise", "duration_s", "sha256", "text"])
    _save_manifest(table, manifest or split, cfg)
    return table


def _file_facts(path: Path) -> tuple[float, str]:
    info = sf.info(str(path))
    return round(info.frames / info.samplerate, 4), hashlib.sha256(path.read_bytes()).hexdigest()


def _save_manifest(manifest: pd.DataFrame, split: str, cfg: Config) -> None:
    for suffix, write in ((".csv", lambda p: manifest.to_csv(p, index=False)),
                          (".jsonl", lambda p: manifest.to_json(p, orient="records", lines=True))):
        path = manifest_path(split, cfg, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def read_manifest(split: str, cfg: Config | None = None) -> pd.DataFrame:
    path = manifest_path(split, cfg)
    if not path.exists():
        raise FileNotFoundError(f"no audio manifest for split {split} ({path}); run "
                                f"`python -m surgvqa synthesize --split {split}` first")
    return pd.read_csv(path, dtype={"sample_id": str, "video_id": str, "noise": str}, keep_default_na=False)


# --- loading and validation ------------------------------------------------------------------------

def load_question_audio(uid: str, path: str | Path, cfg: Config | None = None,
                        resample: bool = False) -> np.ndarray:
    """A question's audio as float32 mono at ``cfg.sample_rate``, or an ``AudioError``.

    Checked, cheapest first: the file exists, holds as many frames as its WAV header declares and decodes;
    then its samples as ``checked_question_audio`` checks them. A relative path is under ``cfg.audio_dir``.
    """
    cfg = cfg or get_config()
    path = Path(path)
    if not path.is_absolute():
        path = cfg.path(cfg.audio_dir) / path

    def fail(reason: str, advice: str = "") -> AudioError:
        return AudioError(f"question audio of sample {uid} ({path}): {reason}", advice)

    if not path.is_file():
        raise fail("file does not exist")
    frames = riff_data_frames(path)
    if frames is not None and frames[0] > frames[1]:
        raise fail(f"cut short: its WAV header declares {frames[0]} frames but only {frames[1]} were decoded")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise fail(f"cannot be decoded as audio ({e})") from None
    return checked_question_audio(audio, rate, cfg, resample, fail,
                                  speech_s=lambda wave: file_speech_seconds(path, wave, cfg))


# The speech rule's verdict on a file, kept by the digest of its bytes: a question file is heard once, however many
# notebooks and passes read it (the rule costs ~25 ms a question on one core, reading it ~0.2 ms). In this process
# a dict; for the project's own audio cache (under cfg.audio_dir) also a ``<wav>.speech`` file beside it, read by
# the next process. Any change to a file's bytes, or to the rule, makes its verdict be computed again.
SPEECH_VERDICT_SUFFIX = ".speech"
_SPEECH_VERDICTS: dict[str, float] = {}


@lru_cache(maxsize=1)
def speech_rule() -> str:
    """What a kept verdict was computed under (the model and the rule's settings)."""
    from importlib.metadata import version

    return (f"silero-vad {version('silero-vad')} (onnx), p >= {SPEECH_PROBABILITY}, window {VAD_WINDOW} at "
            f"{VAD_RATE} Hz")


def file_speech_seconds(path: Path, wave: np.ndarray, cfg: Config) -> float:
    """``speech_seconds`` of the file at ``path`` (decoded as ``wave`` at ``cfg.sample_rate``), kept by digest."""
    key = _verdict_key(path)
    if key in _SPEECH_VERDICTS:
        return _SPEECH_VERDICTS[key]
    sidecar = path.with_name(path.name + SPEECH_VERDICT_SUFFIX)
    kept = path.resolve().is_relative_to(cfg.path(cfg.audio_dir).resolve())
    if kept and sidecar.is_file():
        stored_key, _, seconds = sidecar.read_text().rpartition("\n")
        if stored_key == key:
            _SPEECH_VERDICTS[key] = float(seconds)
            return float(seconds)
    seconds = speech_seconds(wave, cfg.sample_rate)
    _SPEECH_VERDICTS[key] = seconds
    if kept:
        _keep_verdict(path, key, seconds)
    return seconds


def _verdict_key(path: Path) -> str:
    return f"{hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()} {speech_rule()}"


def _keep_verdict(path: Path, key: str, seconds: float) -> None:
    write_atomic(path.with_name(path.name + SPEECH_VERDICT_SUFFIX),
                 lambda tmp: Path(tmp).write_text(f"{key}\n{seconds!r}"))


def refused_questions(manifest: pd.DataFrame, cfg: Config | None = None) -> dict[str, str]:
    """uid -> why, for the files of a synthesis manifest that the checks refuse (noise asked for can drown a
    question: it is then refused like any file, and counted, never answered)."""
    refused = {}
    for row in manifest.itertuples():
        try:
            load_question_audio(row.uid, row.path, cfg)
        except AudioError as e:
            refused[row.uid] = str(e)
    return refused


def checked_question_audio(audio: np.ndarray, rate: int, cfg: Config, resample: bool,
                           fail: Callable[[str, str], AudioError],
                           speech_s: Callable[[np.ndarray], float] | None = None) -> np.ndarray:
    """Decoded samples (frames, channels) as a question's float32 mono at ``cfg.sample_rate``, or ``fail(reason,
    advice)`` raised: finite, within full scale and not clipped; mono at the expected rate (other rates and channel
    counts are converted only when ``resample`` is asked for); between ``cfg.min_audio_s`` and ``cfg.max_audio_s``
    long; not silent (RMS floor); holding speech (``speech_problem``; ``speech_s``: how its seconds of speech are
    found, by default ``speech_seconds``). ``advice`` says in plain words what to do."""
    if not np.isfinite(audio).all():
        raise fail("contains NaN or infinite samples", "the file holds invalid samples: export or record it again")
    problem = _level_problem(audio)  # on the samples as stored: resampling may overshoot full scale
    if problem:
        raise fail(problem, "it is too loud (distorted): record it again a little further from the microphone")
    if audio.shape[1] != 1:
        if not resample:
            raise fail(f"{audio.shape[1]} channels, expected mono (pass resample=True to mix down)")
        audio = audio.mean(axis=1, keepdims=True)
    audio = audio[:, 0]
    if rate != cfg.sample_rate:
        if not resample:
            raise fail(f"sample rate {rate} Hz, expected {cfg.sample_rate} Hz (pass resample=True to convert)")
        audio = resample_audio(audio, rate, cfg.sample_rate)
    duration = audio.size / cfg.sample_rate
    if duration < cfg.min_audio_s:
        raise fail(f"too short: {duration:.3f} s < min_audio_s {cfg.min_audio_s} s",
                   f"it lasts {duration:.1f} s, too short for a question: ask the whole question")
    if duration > cfg.max_audio_s:
        raise fail(f"too long: {duration:.3f} s > max_audio_s {cfg.max_audio_s} s",
                   f"it lasts {duration:.0f} s, longer than a question ({cfg.max_audio_s:.0f} s at most): "
                   f"record just the question")
    level = rms(audio)
    if level < SILENCE_RMS:
        raise fail(f"silent: RMS {level:.2e} < {SILENCE_RMS:.0e}", "it is silent: check that the microphone is on")
    problem = speech_problem(audio, cfg.sample_rate, None if speech_s is None else speech_s(audio))
    if problem:
        raise fail(problem, "no speech could be heard in it (a tone, an alarm, music or noise alone is not a "
                            "question): ask the question aloud, close to the microphone")
    return audio


def _level_problem(audio: np.ndarray) -> str | None:
    """Why samples cannot be a recording's levels (beyond full scale, or clipped), or None."""
    magnitude = np.abs(audio)
    peak = float(magnitude.max(initial=0.0))
    if peak > MAX_PEAK:
        return f"peak {peak:.3g} > {MAX_PEAK}: samples beyond full scale (float data in other units?)"
    clipped = float(np.mean(magnitude >= CLIP_LEVEL)) if audio.size else 0.0
    if clipped > MAX_CLIPPED_FRACTION:
        return (f"clipped: {clipped:.1%} of samples at full scale (|x| >= {CLIP_LEVEL}), more than "
                f"{MAX_CLIPPED_FRACTION:.0%}")
    return None


# Speech or not. Silero VAD (the silero-vad package, which ships its weights) gives the probability of speech in
# each 32 ms window of the question, peak-normalised first so that its level decides nothing (quietness is the
# silence floor's business) and at 16 kHz; a question must hold at least MIN_SPEECH_S of windows at or above
# SPEECH_PROBABILITY. One rule for every way a question enters: synthesized, cached, uploaded, recorded, or covered
# with room noise on purpose (no file name exempts it). Measured on the sets of tests/test_speech_rule.py (espeak-ng
# voices clean, under white, pink and babble noise at 20 to 0 dB SNR, quiet, telephone-band and reverberant; tones,
# beep trains, alarm melodies, chords, hum, noise, room tone and clicks): see docs/design.md for the margins.
VAD_RATE = 16000
VAD_WINDOW = 512  # samples at VAD_RATE: the model's window
SPEECH_PROBABILITY = 0.5
MIN_SPEECH_S = 0.1
VAD_BATCH = 16  # questions synthesis judges in one pass of the model
_VAD_LOCK = threading.Lock()  # the model keeps state between windows: one pass (a question or a batch) at a time


@lru_cache(maxsize=1)
def _speech_model():
    import warnings

    with warnings.catch_warnings():  # its module's torch.jit.script_method, its loader's resources.path and jit.load
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*(path is deprecated|jit.load|script_method)")
        from silero_vad import load_silero_vad

        # its ONNX export (the package ships both; onnxruntime comes with piper): the same windows' probabilities
        # within 1e-4 of the TorchScript model's, at half the time (13.6 against 29.2 ms a question on one core)
        return load_silero_vad(onnx=True)


def speech_probabilities(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The probability of speech in each 32 ms window of ``wave`` (mono), whatever its level."""
    return speech_probabilities_of([wave], sample_rate)[0]


def speech_probabilities_of(waves: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    """``speech_probabilities`` of several questions in one pass of the model: each window of the batch is one
    call for every question (a third of the time a question of judging them one by one on a CPU). The same
    numbers as one at a time: each row keeps its own state, and a shorter question's padding only follows its
    own windows, which are all that is kept of it."""
    import torch

    out = [np.zeros(0, dtype=np.float32) for _ in waves]
    rows = []
    for i, wave in enumerate(waves):
        wave = np.asarray(wave, dtype=np.float32)
        if sample_rate != VAD_RATE:
            wave = resample_audio(wave, sample_rate, VAD_RATE)
        peak = float(np.abs(wave).max(initial=0.0))
        if wave.size >= VAD_WINDOW and peak > 0.0:
            rows.append((i, 0.5 * wave / peak))
    if not rows:
        return out
    # padded in numpy: no torch operation may run before the one-thread section below (see there)
    padded = np.zeros((len(rows), max(len(w) for _, w in rows)), dtype=np.float32)
    for k, (_, wave) in enumerate(rows):
        padded[k, :len(wave)] = wave
    x = torch.from_numpy(padded)
    with _VAD_LOCK, torch.inference_mode():
        # one thread: the model is small, and a forked worker (synthesis, data loading) whose parent started torch's
        # thread pool would hang in its first parallel region
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = _speech_model()
            model.reset_states()
            probabilities = model.audio_forward(x, VAD_RATE).numpy()
        finally:
            torch.set_num_threads(threads)
    for k, (i, wave) in enumerate(rows):
        out[i] = probabilities[k, :math.ceil(len(wave) / VAD_WINDOW)]
    return out


def speech_seconds(wave: np.ndarray, sample_rate: int) -> float:
    """How long ``wave`` sounds like speech: its windows at or above ``SPEECH_PROBABILITY``."""
    return speech_seconds_of([wave], sample_rate)[0]


def speech_seconds_of(waves: Sequence[np.ndarray], sample_rate: int) -> list[float]:
    """``speech_seconds`` of several questions, judged in one pass (``speech_probabilities_of``)."""
    return [float((p >= SPEECH_PROBABILITY).sum()) * VAD_WINDOW / VAD_RATE
            for p in speech_probabilities_of(waves, sample_rate)]


def speech_problem(wave: np.ndarray, sample_rate: int, seconds: float | None = None) -> str | None:
    """Why ``wave`` is not a spoken question, in plain words, or None when it holds speech (``seconds`` of it,
    when already known)."""
    seconds = speech_seconds(wave, sample_rate) if seconds is None else seconds
    if seconds < MIN_SPEECH_S:
        return (f"no speech heard: {seconds:.2f} s of it sounds like speech, a question needs at least "
                f"{MIN_SPEECH_S} s (a tone, an alarm, music or noise alone is not a question)")
    return None


# --- command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa synthesize",
                                     description="Speak the questions of a split into 16 kHz WAV files "
                                                 "with a manifest (cached: a re-run renders nothing new).")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--split", default=",".join(SPLIT_NAMES), help="comma-separated: train,eval,test")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. -p tts_engine=piper -p template=in")
    parser.add_argument("--limit", type=int, default=0, help="first N samples of each split (0: all)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    args = parser.parse_args(argv)
    cfg = get_config(args.preset, **parse_overrides(args.param))
    splits = load_split(cfg)
    for split in args.split.split(","):
        if split not in splits:
            parser.error(f"unknown split {split!r}; splits: {list(splits)}")
        samples = splits[split][:args.limit or None]
        start = time.time()
        manifest = synthesize_split(samples, split, cfg, workers=args.workers)
        print(f"[synthesize] {split}: {len(manifest)} questions, {manifest['path'].nunique()} files, "
              f"{manifest['voice'].nunique()} voices, {manifest['duration_s'].sum():.0f} s of audio "
              f"in {time.time() - start:.1f} s -> {manifest_path(split, cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
