"""Files that appear whole or not at all, and pool workers that do not outlive the process that started them.

* ``write_atomic`` writes through a temporary file in the target's folder and a rename, so a reader sees all of
  a file or nothing; ``write_wav_atomic`` writes 16-bit PCM WAV that way. ``remove_stale_temporaries`` deletes
  the temporaries of runs that were killed mid-write.
* ``readable_wav`` tells a whole WAV file from an empty one or one cut short; ``riff_data_frames`` compares the
  frames a RIFF/WAVE header declares with those the file holds, from chunk headers alone.
* ``end_with_parent`` is a process-pool initializer: a worker ends when its parent does, even a killed one.
"""
from __future__ import annotations

import os
import signal
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf


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



def write_wav_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    write_atomic(path, lambda tmp: sf.write(tmp, audio, sample_rate, subtype="PCM_16", format="WAV"))


def readable_wav(path: Path) -> bool:
    """Whether ``path`` is a WAV file that holds frames and all of those its header declares."""
    try:
        frames = riff_data_frames(path)
        return (path.stat().st_size > 44 and sf.info(str(path)).frames > 0  # 44 bytes: a WAV header alone
                and (frames is None or frames[0] <= frames[1]))  # a file cut short is rendered again
    except (OSError, RuntimeError, sf.LibsndfileError):
        return False


def riff_data_frames(source: Path | bytes) -> tuple[int, int] | None:
    """(frames the ``data`` chunk's header declares, whole frames the file holds after that header) of a
    RIFF/WAVE file (a path, or its bytes); None for any other file or when no ``fmt ``-then-``data`` chunks are found.

    Only chunk headers are read: decoders quietly return the frames that are there when a file was cut
    short with its header intact, so the header and the file size are compared here.
    """
    import io

    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f:
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
