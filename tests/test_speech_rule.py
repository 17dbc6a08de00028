"""The speech rule as tables: spoken questions in the conditions of a real room are heard, and sounds that are not a
question are not, whatever their level. The sets are made here (espeak-ng voices and numpy), never downloaded; the
project's own speakers and noise sources are not used, so the rule is not checked on what it was measured on alone.

Run as a script, it prints each set's speech seconds (the margins docs/design.md states)."""
from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
from scipy import signal

from surgvqa import audio, data, tts
from surgvqa.tts import VoiceSpec

RATE = 16000
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc")
VARIANTS = ("m1", "f2", "m3", "f4")  # 5 accents x 4 timbres: 20 speakers
SPEAKERS = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
SNRS = (20, 10, 5, 0)


def _rng(*key: object) -> np.random.Generator:
    return tts.sample_rng("/".join(map(str, key)), 0, "speech rule")


@functools.lru_cache(maxsize=None)
def question(speaker: str) -> np.ndarray:
    """A question of the test template, each speaker another type, at its own rate and pitch."""
    wordings = sorted(data.question_wordings("out").values())
    index = SPEAKERS.index(speaker)
    return tts.render(wordings[index % len(wordings)], VoiceSpec("espeak-ng", speaker, 150 + 3 * index,
                                                                 35 + index % 30), RATE)


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    return np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(spectrum.size), 1)), n)


def babble(n: int, rng: np.random.Generator, speaker: str) -> np.ndarray:
    """Four other speakers at once, saying other questions (a room where people talk)."""
    others = [s for s in SPEAKERS if s != speaker]
    voices = [question(others[i]) for i in rng.choice(len(others), 4, replace=False)]
    out = np.zeros(n)
    for v in voices:
        v = np.resize(v, n)  # repeated to the question's length
        out += v / (np.sqrt(np.mean(v ** 2)) + 1e-12)
    return out


def at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    scale = np.sqrt(np.mean(speech ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    mixed = speech + scale * noise
    return (mixed / max(1.0, np.abs(mixed).max() / 0.99)).astype(np.float32)


def telephone(wave: np.ndarray) -> np.ndarray:
    """300-3400 Hz through 8 kHz, as a phone line carries it."""
    narrow = signal.sosfiltfilt(signal.butter(6, (300, 3400), "bandpass", fs=RATE, output="sos"), wave)
    return tts.resample_audio(tts.resample_audio(narrow.astype(np.float32), RATE, 8000), 8000, RATE)


def reverberant(wave: np.ndarray, rng: np.random.Generator, rt60: float = 0.7) -> np.ndarray:
    """Convolved with an exponentially decaying noise tail (a room of reverberation time ``rt60``)."""
    t = np.arange(int(rt60 * RATE)) / RATE
    response = rng.standard_normal(t.size) * 10 ** (-3 * t / rt60)
    response[0] = 1.0
    wet = signal.fftconvolve(wave, response)[: wave.size]
    return (wet / np.abs(wet).max() * 0.9).astype(np.float32)


def conditions(speaker: str) -> dict[str, np.ndarray]:
    q = question(speaker)
    rng = _rng(speaker)
    out = {"clean": q, "quiet (-40 dBFS peak)": (q / np.abs(q).max() * 0.01).astype(np.float32),
           "telephone": telephone(q), "reverberant": reverberant(q, rng)}
    for snr in SNRS:
        out[f"white {snr} dB"] = at_snr(q, white(q.size, rng), snr)
        out[f"pink {snr} dB"] = at_snr(q, pink(q.size, rng), snr)
        out[f"babble {snr} dB"] = at_snr(q, babble(q.size, rng, speaker), snr)
    return out


def tone(hz: float, seconds: float, harmonics: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, harmonics + 1))


def gated(parts: list[np.ndarray], gap_s: float) -> np.ndarray:
    gap = np.zeros(int(gap_s * RATE))
    return np.concatenate([p for part in parts for p in (part, gap)])


def non_speech() -> dict[str, np.ndarray]:
    """Sounds of an operating room and elsewhere that are not a question, 3 s or so each."""
    rng = _rng("non-speech")
    n = 3 * RATE
    t = np.arange(n) / RATE
    c4, f4, a4 = 261.6, 349.2, 440.0
    sounds = {
        "tone 440 Hz": tone(440, 3), "tone 1 kHz": tone(1000, 3), "tone 2.5 kHz": tone(2500, 3),
        "square wave 220 Hz": np.sign(tone(220, 3)),
        "beeps 1 kHz (0.2 s on, 0.3 s off)": gated([tone(1000, 0.2)] * 6, 0.3),
        "oximeter beeps falling 880-740 Hz": gated([tone(f, 0.15, 3) for f in (880, 830, 784, 740)] * 2, 0.35),
        "alarm melody C4 A4 F4 with harmonics": gated([tone(f, 0.25, 5) for f in (c4, a4, f4, a4, f4)] * 2, 0.12),
        "chords C F G": np.concatenate([sum(tone(f, 0.6, 3) for f in chord) for chord in
                                        ((c4, 329.6, 392.0), (f4, a4, 523.3), (392.0, 493.9, 587.3))] * 2),
        "arpeggio with vibrato": np.concatenate([np.sin(2 * np.pi * f * np.arange(int(0.2 * RATE)) / RATE
                                                        + 3 * np.sin(2 * np.pi * 5 * np.arange(int(0.2 * RATE)) / RATE))
                                                 for f in (c4, 329.6, 392.0, 523.3, 392.0, 329.6) * 2]),
        "mains hum 50 Hz": tone(50, 3, 5), "mains hum 60 Hz": tone(60, 3, 5),
        "white noise": white(n, rng), "pink noise": pink(n, rng),
        "brown noise": np.cumsum(white(n, rng)) - np.cumsum(white(n, rng)).mean(),
        "suction hiss": signal.sosfilt(signal.butter(4, 2000, "highpass", fs=RATE, output="sos"), white(n, rng)),
        "white noise bursts": white(n, rng) * (np.arange(n) % 8000 < 2400),
        "room tone (quiet pink noise and hum)": 0.05 * pink(n, rng) / pink(n, rng).std() + 0.01 * tone(50, 3, 3),
        "clicks 5 a second": (np.arange(n) % 3200 == 0) * 1.0 + 0.001 * white(n, rng),
        "sweep 200-4000 Hz": signal.chirp(t, 200, 3, 4000),
        "decaying bell 660 Hz": gated([tone(660, 0.8, 4) * np.exp(-4 * np.arange(int(0.8 * RATE)) / RATE)] * 3, 0.2),
        "ventilator whoosh": white(n, rng) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.4 * t)) ** 2,
    }
    return {name: (0.3 * s / np.abs(s).max()).astype(np.float32) for name, s in sounds.items()}


@pytest.fixture(scope="module")
def speech_table():
    return {(speaker, condition): audio.speech_seconds(wave, RATE)
            for speaker in SPEAKERS for condition, wave in conditions(speaker).items()}


def test_every_question_is_heard_in_every_condition(speech_table):
    assert len(SPEAKERS) == 20 and len(speech_table) == 20 * 16
    refused = {key: seconds for key, seconds in speech_table.items() if seconds < audio.MIN_SPEECH_S}
    assert refused == {}


@pytest.mark.parametrize("name", sorted(non_speech()))
def test_no_sound_that_is_not_a_question_is_heard(name):
    wave = non_speech()[name]
    assert audio.speech_problem(wave, RATE) is not None
    for level in (0.005, 0.9):  # quiet or loud: the level decides nothing
        assert audio.speech_seconds(wave / np.abs(wave).max() * level, RATE) < audio.MIN_SPEECH_S


def test_there_are_twenty_sounds_that_are_not_a_question():
    assert len(non_speech()) >= 20


def test_the_rule_judges_a_file_by_its_sound_not_its_name(tmp_path):
    """A file named as the project names its noisy questions gets the same rule: white noise is refused."""
    import soundfile as sf

    path = tmp_path / "question.noisy.wav"
    sf.write(str(path), non_speech()["white noise"], RATE)
    with pytest.raises(audio.AudioError, match="no speech heard"):
        audio.load_question_audio("002-001/q", path, audio.get_config())


if __name__ == "__main__":  # the margins: the fewest speech seconds of a question, the most of anything else
    table = {(s, c): audio.speech_seconds(w, RATE) for s in SPEAKERS for c, w in conditions(s).items()}
    by_condition: dict[str, list[float]] = {}
    for (_, condition), seconds in table.items():
        by_condition.setdefault(condition, []).append(seconds)
    for condition, values in by_condition.items():
        print(f"{condition:28s} min {min(values):.2f} s  median {np.median(values):.2f} s")
    for name, wave in non_speech().items():
        print(f"{name:40s} {audio.speech_seconds(wave, RATE):.2f} s")
    sys.exit(0)


def test_a_files_verdict_is_computed_once_and_kept_by_its_bytes(tmp_path, monkeypatch):
    """The rule runs once per question file: again in this process from memory, in the next from the
    ``<wav>.speech`` file kept beside it in the project's audio cache; new bytes (or a kept verdict of other bytes)
    make it run again, and a file outside the cache gets nothing written beside it."""
    from surgvqa.config import get_config
    from surgvqa.files import write_wav_atomic

    cfg = get_config("smoke", audio_dir=str(tmp_path / "cache"))
    calls = []
    real = audio.speech_seconds
    monkeypatch.setattr(audio, "speech_seconds", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(audio, "_SPEECH_VERDICTS", {})
    wav = tmp_path / "cache" / "q.wav"
    write_wav_atomic(wav, question(SPEAKERS[0]), RATE)
    first = audio.load_question_audio("q", wav, cfg)
    audio.load_question_audio("q", "q.wav", cfg)  # the same file by its cache-relative path
    assert len(calls) == 1 and wav.with_name("q.wav.speech").is_file()
    audio._SPEECH_VERDICTS.clear()  # as a new process
    np.testing.assert_array_equal(audio.load_question_audio("q", wav, cfg), first)
    assert len(calls) == 1
    write_wav_atomic(wav, question(SPEAKERS[1]), RATE)  # other bytes, same name
    audio.load_question_audio("q", wav, cfg)
    assert len(calls) == 2
    # a kept verdict of other bytes is not believed: a tone under a speech verdict is still refused
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * RATE) / RATE)).astype(np.float32)
    write_wav_atomic(wav, tone, RATE)
    sidecar = wav.with_name("q.wav.speech")
    sidecar.write_text(sidecar.read_text().splitlines()[0] + "\n2.5")
    audio._SPEECH_VERDICTS.clear()
    with pytest.raises(audio.AudioError, match="no speech heard"):
        audio.load_question_audio("q", wav, cfg)
    outside = tmp_path / "elsewhere" / "q.wav"
    write_wav_atomic(outside, question(SPEAKERS[2]), RATE)
    audio.load_question_audio("q", outside, cfg)
    assert not outside.with_name("q.wav.speech").exists()


def test_synthesis_keeps_each_files_verdict_so_loading_it_runs_no_rule(tmp_path, monkeypatch):
    from surgvqa.config import get_config

    cfg = get_config("smoke", audio_dir=str(tmp_path / "cache"), tts_engine="espeak-ng")
    rows = data.load_split(cfg)["test"][:3]
    manifest = audio.synthesize_split(rows, "test", cfg, progress=False, workers=1)
    monkeypatch.setattr(audio, "_SPEECH_VERDICTS", {})
    monkeypatch.setattr(audio, "speech_seconds", lambda *a: pytest.fail("the rule ran again on a synthesized file"))
    for row in manifest.itertuples():
        assert audio.load_question_audio(row.uid, row.path, cfg).size > 0


def test_questions_judged_together_get_the_probabilities_of_each_alone():
    """Synthesis judges a chunk of questions in one pass of the model: each row keeps its own state and a shorter
    question's padding follows its own windows, so every question gets exactly its probabilities alone, and the
    ones too short or silent to judge get none."""
    waves = [question(SPEAKERS[0]), question(SPEAKERS[1])[: RATE // 2], np.zeros(RATE, np.float32),
             question(SPEAKERS[2])[:300], question(SPEAKERS[0]) * 0.1]
    together = audio.speech_probabilities_of(waves, RATE)
    for wave, probabilities in zip(waves, together):
        np.testing.assert_array_equal(probabilities, audio.speech_probabilities(wave, RATE))
    assert len(together[0]) == int(np.ceil(len(waves[0]) / audio.VAD_WINDOW)) and together[0].max() > 0.9
    assert together[2].size == 0 and together[3].size == 0
    np.testing.assert_allclose(together[4], together[0], atol=1e-5)  # its level decides nothing
    assert audio.speech_seconds_of(waves, RATE)[:3] == [audio.speech_seconds(w, RATE) for w in waves[:3]]
