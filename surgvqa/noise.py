"""Operating-room sound over a spoken question, at a chosen signal-to-noise ratio, through audiomentations.

* ``RoomNoise(kind, snr_db)``: babble (other people talking: several voices saying theatre chatter, never a
  question), broadband (white noise), beeps (a patient monitor's pulse tones and alarm bursts), hiss (suction
  and irrigation: noise rising towards high frequencies) or reverb (a simulated room, no SNR).
* ``add_room_noise`` applies one to a waveform, seeded, so a sample's noisy file is the same in every run.
  The SNR is the speech's RMS over the noise's, in dB, as audiomentations sets it.
* ``training_noise`` draws the noise of one train question (``Config.train_noise``): a kind, and an SNR
  uniform in ``TRAIN_SNR_DB``.
* The babble and beep recordings are made once into ``noise_dir`` (``noise_sources``): babble from espeak-ng
  voices of the train pool for training and of the eval pool for evaluation, so a test question's speaker is
  never among the babblers and the babble heard in a check was never heard in training; beeps from tones.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import write_wav_atomic
from .tts import render, voice_pools

NOISE_KINDS = ("babble", "broadband", "beeps", "hiss", "reverb")
# down to -5 dB, so that a question at 0 dB (as loud as the room) lies inside what training hears
TRAIN_SNR_DB = (-5.0, 25.0)
BABBLE_TALKERS = 6
BABBLE_FILES = 4  # per pool: each a different set of talkers
SOURCE_VERSION = 1  # bump when the recordings below change, so an old folder is not reused
MAX_PEAK = 0.99
# what people say in an endoscopy room besides the question: never a question of the study, never an answer
THEATRE_CHATTER = (
    "Can you pass me the snare please.", "Blood pressure is one twenty over eighty.", "Saturation is ninety eight.",
    "Give another two milligrams.", "We are starting the withdrawal now.", "Turn the patient slightly to the left.",
    "Apply some pressure on the abdomen.", "The next patient is ready in bay three.", "Pulse is seventy two.",
    "Let me know when you want the clip.", "I will write that in the report.", "The biopsy pot is labelled.",
    "Suction is on.", "Could someone dim the lights.", "She is comfortable and breathing well.",
    "Time is ten forty five.", "We need more water in the bottle.", "Hold the scope straight for a moment.",
)


@dataclass(frozen=True)
class RoomNoise:
    """One condition: ``kind`` of ``NOISE_KINDS`` and ``snr_db`` (None for reverb, which adds no noise)."""
    kind: str
    snr_db: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind {self.kind!r}: one of {NOISE_KINDS}")
        if (self.kind == "reverb") != (self.snr_db is None):
            raise ValueError(f"{self}: reverb takes no SNR, every other kind needs one")
        if self.snr_db is not None and not (math.isfinite(self.snr_db) and -20 <= self.snr_db <= 60):
            raise ValueError(f"{self}: SNR {self.snr_db} dB is outside -20..60")

    @property
    def tag(self) -> str:
        """A short name for file keys and tables: ``babble@10dB``, ``reverb``."""
        return self.kind if self.snr_db is None else f"{self.kind}@{self.snr_db:g}dB"


def training_noise(rng: np.random.Generator) -> RoomNoise:
    """The noise of one train question: a kind drawn uniformly, an SNR uniform in ``TRAIN_SNR_DB``
    (rounded to 0.5 dB, so files are few enough to cache)."""
    kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
    return RoomNoise(kind, None if kind == "reverb" else round(2 * rng.uniform(*TRAIN_SNR_DB)) / 2)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # audiomentations draws from the global random and numpy generators: seed them for this call, then put
    # back what the caller had
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def noise_sources(noise_dir: str | Path, pool: str, sample_rate: int = 16000, tts_engine: str = "espeak-ng"
                  ) -> Path:
    """The folder of babble and beep recordings for ``pool`` ("train" or "eval" voices), made on first use."""
    if pool not in ("train", "eval"):
        raise ValueError(f"noise pool {pool!r}: train (training noise) or eval (the checks); never test voices")
    folder = Path(noise_dir) / f"v{SOURCE_VERSION}-{pool}-{sample_rate}"
    done = folder / "complete"
    if done.is_file():
        return folder
    voices = voice_pools(tts_engine)[pool]
    rng = np.random.default_rng(["train", "eval"].index(pool))
    for i in range(BABBLE_FILES):
        talkers = []
        for voice_index in rng.choice(len(voices), BABBLE_TALKERS, replace=False):
            lines = [THEATRE_CHATTER[j] for j in rng.permutation(len(THEATRE_CHATTER))[:4]]
            talkers.append(np.concatenate([render(line, voices[voice_index], sample_rate) for line in lines]))
        length = min(len(t) for t in talkers)
        babble = sum(t[:length] / (np.sqrt(np.mean(t[:length] ** 2)) + 1e-9) for t in talkers)
        write_wav_atomic(folder / "babble" / f"babble-{i}.wav", _peak_normalised(babble), sample_rate)
    import librosa

    for i, (hz, beeps, gap_s) in enumerate(((880.0, 1, 0.0), (1000.0, 3, 0.12), (740.0, 2, 0.2))):
        tone = librosa.tone(hz, sr=sample_rate, duration=0.15) * np.hanning(int(0.15 * sample_rate))
        gap = np.zeros(int(gap_s * sample_rate))
        pattern = np.concatenate([np.concatenate([tone, gap]) for _ in range(beeps)])
        write_wav_atomic(folder / "beeps" / f"beep-{i}.wav", _peak_normalised(pattern), sample_rate)
    done.write_text("babble and beeps complete\n")
    return folder


def _peak_normalised(wave: np.ndarray) -> np.ndarray:
    peak = float(np.abs(wave).max())
    return (wave * (MAX_PEAK / peak)).astype(np.float32) if peak > MAX_PEAK else wave.astype(np.float32)


def _transform(noise: RoomNoise, sources: Path | None):
    import audiomentations as am

    snr = dict(min_snr_db=noise.snr_db, max_snr_db=noise.snr_db)
    if noise.kind == "babble":
        return am.AddBackgroundNoise(sounds_path=sources / "babble", noise_rms="relative", p=1.0, **snr)
    if noise.kind == "broadband":
        return am.AddGaussianSNR(p=1.0, **snr)
    if noise.kind == "beeps":
        return am.AddShortNoises(sounds_path=sources / "beeps", min_time_between_sounds=0.3,
                                 max_time_between_sounds=1.0, noise_rms="relative_to_whole_input",
                                 burst_probability=0.05, p=1.0, **snr)
    if noise.kind == "hiss":  # blue noise, rising 3 dB an octave: the hiss of suction and irrigation
        return am.AddColorNoise(min_f_decay=3.0, max_f_decay=3.0, p=1.0, **snr)
    # image sources up to order 8, no ray tracing: 0.05 s a question (ray tracing takes 0.4 s, order 15 takes 30 s)
    return am.RoomSimulator(min_target_rt60=0.3, max_target_rt60=0.8, calculation_mode="rt60", use_ray_tracing=False,
                            max_order=8, leave_length_unchanged=False, p=1.0)


def load_noise_kernels() -> None:
    """Load the numba kernels that mixing in recorded noise runs (librosa's audio and util modules, which
    audiomentations reads babble and beeps with), compiling and caching them where no cache is yet. A process
    pool calls this before it forks: workers that compile them at once write numba's cache together, and a kernel
    of one beside the wrapper of another crashes every later process that loads them (numba issue 10128)."""
    import audiomentations  # noqa: F401
    import librosa.core.audio  # noqa: F401  (librosa loads its modules lazily: the modules themselves, by name)
    import librosa.util.utils  # noqa: F401


def add_room_noise(wave: np.ndarray, sample_rate: int, noise: RoomNoise, seed: int,
                   sources: str | Path | None = None) -> np.ndarray:
    """``wave`` (float32 mono speech) with ``noise`` over it, the same for the same ``seed``; scaled down, never
    up, so that its peak stays below full scale (which keeps the SNR). Babble and beeps are read from
    ``sources`` (``noise_sources``)."""
    if noise.kind in ("babble", "beeps") and sources is None:
        raise ValueError(f"{noise.tag} needs the folder of its recordings (noise_sources)")
    transform = _transform(noise, Path(sources) if sources is not None else None)
    with _seeded(seed):
        out = transform(samples=np.asarray(wave, dtype=np.float32), sample_rate=sample_rate)
    return _peak_normalised(np.asarray(out, dtype=np.float32))
