"""Operating-room noise: each kind at the SNR asked, seeded, over speech that stays loadable; its use in synthesis."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import pytest

from surgvqa import audio, files, noise, tts
from surgvqa.tts import VoiceSpec
from surgvqa.config import get_config
from surgvqa.data import published_split
from surgvqa.noise import RoomNoise

QUESTION = "Is the endoscope body visible in this sequence?"


@pytest.fixture(scope="module")
def speech():
    return tts.render(QUESTION, VoiceSpec("espeak-ng", "en-us+m3"), 16000) * np.float32(0.3)  # headroom: no rescaling


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return noise.noise_sources(tmp_path_factory.mktemp("noise"), "eval")


def snr_db(clean, noisy):
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean).astype(np.float64) ** 2))


@pytest.mark.parametrize("kind", ["babble", "broadband", "hiss"])
@pytest.mark.parametrize("snr", [0.0, 10.0])
def test_additive_noise_lands_at_the_snr_asked_and_is_seeded(speech, sources, kind, snr):
    out = noise.add_room_noise(speech, 16000, RoomNoise(kind, snr), seed=3, sources=sources)
    assert out.shape == speech.shape and out.dtype == np.float32
    assert snr_db(speech, out) == pytest.approx(snr, abs=0.5)
    assert np.array_equal(out, noise.add_room_noise(speech, 16000, RoomNoise(kind, snr), seed=3, sources=sources))
    assert not np.array_equal(out, noise.add_room_noise(speech, 16000, RoomNoise(kind, snr), seed=4, sources=sources))


def test_beeps_are_tones_between_words_and_reverb_adds_a_tail(speech, sources):
    beeped = noise.add_room_noise(speech, 16000, RoomNoise("beeps", 0.0), seed=1, sources=sources)
    added = beeped - speech
    spectrum = np.abs(np.fft.rfft(added))
    peak_hz = np.fft.rfftfreq(added.size, 1 / 16000)[spectrum.argmax()]
    assert min(abs(peak_hz - hz) for hz in (740, 880, 1000)) < 15
    reverberant = noise.add_room_noise(speech, 16000, RoomNoise("reverb"), seed=1)
    assert reverberant.size > speech.size and np.abs(reverberant[speech.size:]).max() > 0
    assert np.abs(reverberant).max() < 1.0


def test_noise_conditions_and_sources_refuse_what_they_cannot_do(tmp_path, speech):
    with pytest.raises(ValueError, match="one of"):
        RoomNoise("siren", 10)
    with pytest.raises(ValueError, match="reverb takes no SNR"):
        RoomNoise("reverb", 10)
    with pytest.raises(ValueError, match="needs one"):
        RoomNoise("babble")
    with pytest.raises(ValueError, match="outside"):
        RoomNoise("babble", float("nan"))
    with pytest.raises(ValueError, match="never test voices"):
        noise.noise_sources(tmp_path, "test")
    with pytest.raises(ValueError, match="needs the folder"):
        noise.add_room_noise(speech, 16000, RoomNoise("babble", 5), seed=0)
    assert RoomNoise("babble", 10).tag == "babble@10dB" and RoomNoise("reverb").tag == "reverb"


def test_training_noise_draws_every_kind_within_the_snr_range():
    rng = np.random.default_rng(0)
    drawn = [noise.training_noise(rng) for _ in range(300)]
    assert {n.kind for n in drawn} == set(noise.NOISE_KINDS)
    snrs = [n.snr_db for n in drawn if n.snr_db is not None]
    assert noise.TRAIN_SNR_DB[0] <= min(snrs) and max(snrs) <= noise.TRAIN_SNR_DB[1] and len(set(snrs)) > 20


def test_noisy_synthesis_is_cached_per_condition_and_loads_as_noisy_speech(tmp_path):
    cfg = get_config(audio_dir=str(tmp_path / "audio"))
    rows = published_split("out")["test"][:4]
    clean = audio.synthesize_split(rows, "test", cfg, progress=False)
    noisy = audio.synthesize_split(rows, "test", cfg, progress=False, manifest="test-broadband",
                                   noise=RoomNoise("broadband", 0.0))
    assert list(noisy["voice"]) == list(clean["voice"]) and set(noisy["noise"]) == {"broadband@0dB"}
    assert set(clean["noise"]) == {""} and not set(noisy["path"]) & set(clean["path"])
    assert all(p.endswith(audio.NOISY_SUFFIX) for p in noisy["path"])
    assert list(audio.read_manifest("test-broadband", cfg)["noise"]) == list(noisy["noise"])
    for r in noisy.itertuples():
        wave = audio.load_question_audio(r.uid, r.path, cfg)  # speech under noise at 0 dB is still speech
        # one rule whatever the name: the same samples in a file of another name load the same
        plain = tmp_path / f"{r.uid.replace('/', '_')}.wav"
        files.write_wav_atomic(plain, wave, 16000)
        assert np.array_equal(audio.load_question_audio(r.uid, plain, cfg), wave)
    train = published_split("out")["train"][:60]
    manifest = audio.synthesize_split(train, "train", cfg, progress=False)
    share = (manifest["noise"] != "").mean()
    assert share == pytest.approx(cfg.train_noise, abs=0.2)
    quiet = audio.synthesize_split(train, "train", cfg.replace(train_noise=0.0), progress=False, manifest="quiet")
    assert set(quiet["noise"]) == {""}


def test_a_drawn_training_noise_that_drowns_the_question_is_raised_and_a_condition_asked_for_is_counted(tmp_path,
                                                                                                   monkeypatch):
    """Training noise is drawn down to -5 dB; where it leaves nothing the speech rule hears, the SNR rises in
    5 dB steps until it does, and the manifest says the SNR used. A condition asked for (the robustness checks)
    is never changed: its drowned files are refused and counted."""
    cfg = get_config(audio_dir=str(tmp_path / "audio"), train_noise=1.0)
    rows = published_split("out")["train"][:2]
    monkeypatch.setattr(audio, "training_noise", lambda rng: RoomNoise("broadband", -20.0))
    drawn = audio.synthesize_split(rows, "train", cfg, progress=False)
    used = [float(tag.split("@")[1].removesuffix("dB")) for tag in drawn["noise"]]
    assert all(tag.startswith("broadband@") for tag in drawn["noise"]) and all(-20 < snr <= 60 for snr in used)
    assert all((snr + 20) % audio.DROWNED_STEP_DB == 0 for snr in used)
    for r in drawn.itertuples():  # every drawn-noise file now holds a question the rule hears
        audio.load_question_audio(r.uid, r.path, cfg)
    asked = audio.synthesize_split(rows, "test", cfg, progress=False, manifest="drowned",
                                   noise=RoomNoise("broadband", -20.0))
    assert set(asked["noise"]) == {"broadband@-20dB"}
    refused = audio.refused_questions(asked, cfg)
    assert set(refused) == set(asked["uid"]) and all("no speech heard" in why for why in refused.values())


def test_synthesis_runs_the_speech_rule_once_on_what_a_file_holds(tmp_path, monkeypatch):
    """A clean question is judged once (the file as written, its verdict kept beside it); one under drawn training
    noise twice (its speech before the noise, then the file, whose verdict also decides whether the noise must be
    raised); the kept verdict is what the rule says of the file as read back."""
    cfg = get_config(audio_dir=str(tmp_path / "audio"), train_noise=0.0)
    rows = published_split("out")["train"][:2]
    calls = []
    rule, batched = audio.speech_seconds, audio.speech_seconds_of  # every judgement goes through speech_seconds_of
    monkeypatch.setattr(audio, "speech_seconds_of",
                        lambda waves, rate: calls.extend(len(w) for w in waves) or batched(waves, rate))
    manifest = audio.synthesize_split(rows, "test", cfg, progress=False, manifest="clean", workers=1)
    assert len(calls) == len(set(manifest["path"]))
    calls.clear()
    monkeypatch.setattr(audio, "training_noise", lambda rng: RoomNoise("broadband", 10.0))
    noisy = audio.synthesize_split(rows, "train", cfg.replace(train_noise=1.0), progress=False, workers=1)
    assert set(noisy["noise"]) == {"broadband@10dB"}  # heard at the SNR drawn: the same verdict raised nothing
    assert len(calls) == 2 * len(set(noisy["path"]))
    for r in noisy.itertuples():
        path = Path(cfg.audio_dir) / r.path
        kept = float(path.with_name(path.name + audio.SPEECH_VERDICT_SUFFIX).read_text().rpartition("\n")[2])
        assert kept == rule(sf.read(path, dtype="float32")[0], 16000)
