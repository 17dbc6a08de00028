"""What a model is fed: the cache of the frozen Whisper encoder's outputs, and the dataset of items.

* ``cache_encoded_audio`` runs the frozen encoder once per distinct question file and keeps its output under
  ``encoded_audio_dir`` (keyed on the encoder's weights, ``whisper.encoder_fingerprint``, and the audio pool);
  ``load_encoded_audio`` reads one back and refuses an array that is not what was written.
* ``QADataset`` makes the collator's items ``(Sample, frames, waveform)`` from samples: frames loaded, audio
  validated (``audio.load_question_audio``) or read from the encoder cache as a ``collate.EncodedQuestion``;
  training and evaluation both read it, through a DataLoader or ``collate.prefetched_batches``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import frames
from .audio import AudioError, load_question_audio
from .backbones import TINY, Backbone
from .collate import EncodedQuestion
from .config import Config
from .data import Sample
from .files import remove_stale_temporaries, write_atomic

# --- cached Whisper encoder outputs ----------------------------------------------------------------

def encoded_audio_dir(fingerprint: str, audio_pool: int, cfg: Config) -> Path:
    # the pool sets how the waveform is padded before the log-mel, so it is part of the key
    return cfg.path(cfg.audio_features_dir) / f"{fingerprint}-pool{audio_pool}"


def cache_encoded_audio(paths: dict[str, str], log_mel: Callable[[str, np.ndarray], "torch.Tensor"],
                        encode: Callable[["torch.Tensor"], "torch.Tensor"], folder: Path, cfg: Config,
                        batch_size: int = 32, progress: bool = True) -> dict[str, Path]:
    """The frozen Whisper encoder's output for every question's audio, computed once per distinct file.

    ``paths`` maps uid -> WAV (as ``load_question_audio`` takes it); ``log_mel(uid, waveform)`` is the
    collator's feature step and ``encode(mel batch)`` the model's encoder, so a cached array is exactly what
    the model would compute in the batch (files of one mel length are encoded together, as the model does).
    Arrays are float32 ``(encoder frames, d_model)`` under ``folder``, named by the WAV's sha256 and written
    atomically; returns uid -> array path. Every WAV is validated on the way, errors naming the sample.
    """
    from .progress import progress_bar

    wav_of, digest_of = {}, {}
    for uid, path in paths.items():
        full = Path(path) if Path(path).is_absolute() else cfg.path(cfg.audio_dir) / path
        if full not in digest_of:
            if not full.is_file():
                load_question_audio(uid, full, cfg)  # raises the error that names the sample and file
            digest_of[full] = hashlib.sha256(full.read_bytes()).hexdigest()[:24]
        wav_of[uid] = full
    remove_stale_temporaries(folder)
    out = {uid: folder / f"{digest_of[full]}.npy" for uid, full in wav_of.items()}
    todo: dict[Path, str] = {}  # array path -> one uid that names it in errors
    for uid, target in out.items():
        if not (target.exists() and _facts_path(target).exists()):  # an array without its facts is re-encoded
            todo.setdefault(target, uid)
    if not todo:
        return out
    by_length: dict[int, list[tuple[Path, torch.Tensor]]] = {}
    for target, uid in todo.items():
        mel = log_mel(uid, load_question_audio(uid, wav_of[uid], cfg))
        by_length.setdefault(mel.shape[-1], []).append((target, mel))
    bar = progress_bar(total=len(todo), desc=f"encode question audio ({len(set(out.values())) - len(todo)} cached)",
               unit="file", disable=not progress)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            with torch.no_grad():
                frames = encode(torch.stack([mel for _, mel in chunk])).float().cpu().numpy()
            for (target, _), array in zip(chunk, frames):
                write_atomic(target, lambda tmp: _save_array(tmp, array))
                facts = {"frames": int(array.shape[0]), "width": int(array.shape[1]), "sha256": _array_digest(array),
                         "audio_sha256": target.stem, "encoder": folder.name}
                write_atomic(_facts_path(target), lambda tmp: Path(tmp).write_text(json.dumps(facts) + "\n"))
            bar.update(len(chunk))
    bar.close()
    return out


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary path's name
        np.save(f, array)


def _facts_path(array_path: Path) -> Path:
    return array_path.with_suffix(".json")


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:24]


def load_encoded_audio(uid: str, path: str | Path, width: int) -> np.ndarray:
    """A cached encoder output, ``(frames, width)`` float32 and finite, exactly as it was written: its facts
    file (frame count, digest of the array, of the WAV it came from and of the encoder, the folder's name)
    must agree, so an array replaced by zeros or cut short is refused. Errors name the sample and file."""
    path = Path(path)

    def fail(reason: str) -> AudioError:
        return AudioError(f"cached question audio features of sample {uid} ({path}): {reason}; delete the file "
                          f"to encode it again")

    try:
        array = np.load(path, allow_pickle=False)
        facts = json.loads(_facts_path(path).read_text())
    except (OSError, ValueError) as e:
        raise fail(f"cannot be read ({e})") from None
    if array.ndim != 2 or array.shape[1] != width or array.dtype != np.float32 or not np.isfinite(array).all():
        raise fail(f"expected finite float32 (frames, {width}), got {array.dtype} {array.shape}")
    written = {"frames": facts.get("frames"), "sha256": facts.get("sha256"), "audio_sha256": facts.get("audio_sha256"),
               "encoder": facts.get("encoder")}
    found = {"frames": array.shape[0], "sha256": _array_digest(array), "audio_sha256": path.stem,
             "encoder": path.parent.name}
    differ = {k: (written[k], found[k]) for k in written if written[k] != found[k]}
    if differ:
        raise fail(f"not what was written (written, found): {differ}")
    return array


# --- the dataset the collator reads ----------------------------------------------------------------

class QADataset(Dataset):
    """``(Sample, frames uint8 (8,H,W,3), waveform float32 or None)`` items, loaded on access.

    Frames come from ``frames.load_clip`` (phantom renders or real JPEGs); audio from the split's manifest,
    validated by ``audio.load_question_audio``, or from the cache of Whisper's outputs. A missing file
    raises an error naming the sample: nothing is replaced by zeros.
    """

    def __init__(self, samples: Sequence[Sample], cfg: Config, audio_paths: dict[str, str] | None,
                 encoded_audio: EncodedAudio | None = None, backbone: Backbone = TINY):
        self.samples, self.cfg = list(samples), cfg
        self.backbone = backbone  # real frames are sized for the model that sees them
        self.audio_paths = audio_paths
        self.encoded_audio = encoded_audio
        if cfg.question_mode != "text":
            missing = [s.uid for s in self.samples if s.uid not in (audio_paths or {})]
            if missing:
                raise KeyError(f"no question audio for {len(missing)} sample(s), e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.samples)

    def length_keys(self) -> list[float]:
        """Each item's prompt and answer length, roughly in tokens, for grouping batches: the question read (4
        characters a token) or heard (Whisper's 50 frames a second, pooled), and the answer."""
        import soundfile as sf

        keys, mode = [], self.cfg.question_mode
        for s in self.samples:
            key = len(s.answer) / 4 + (len(s.question) / 4 if mode != "audio" else 0.0)  # mixed: both, the longest
            if mode != "text":
                path = Path(self.audio_paths[s.uid])
                info = sf.info(str(path if path.is_absolute() else self.cfg.path(self.cfg.audio_dir) / path))
                key += info.frames / info.samplerate * 50 / self.cfg.audio_pool
            keys.append(key)
        return keys

    def __getitem__(self, index: int):
        s = self.samples[index]
        clip = frames.load_clip(s, self.cfg, self.backbone)
        wave = None
        if self.encoded_audio is not None:
            wave = EncodedQuestion(load_encoded_audio(s.uid, self.encoded_audio.paths[s.uid],
                                                    self.encoded_audio.width))
        elif self.cfg.question_mode != "text":
            wave = load_question_audio(s.uid, self.audio_paths[s.uid], self.cfg)
        return s, clip, wave


@dataclass
class EncodedAudio:
    """Where the cached Whisper encoder output of each sample's question is: uid -> .npy, and its width."""

    paths: dict[str, Path]
    width: int
