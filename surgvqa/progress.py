"""Progress a person can read: a live bar at a terminal or in a notebook; elsewhere (a subprocess whose
output a notebook or a log file collects) plain lines every ``every_s`` seconds and one at the end, each
with the count, the rate and the time left, instead of hundreds of carriage-return redraws."""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator


def _interactive() -> bool:
    if sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and "IPKernelApp" in getattr(shell, "config", {})


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Lines:
    """tqdm's interface as far as this package uses it (iterate, update, set_postfix, close, disable)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool | None = False, every_s: float = 15.0, **_: Any):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.disable = bool(disable)
        self.n, self.postfix, self.closed = 0, "", False
        self.started = self.printed = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.printed >= self.every_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and not self.disable and self.n:
            self._print()
        self.closed = True

    def _print(self) -> None:
        self.printed = now = time.monotonic()
        elapsed = max(1e-9, now - self.started)
        rate = self.n / elapsed
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        left = (f", {_duration((self.total - self.n) / rate)} left" if self.total and rate and self.n < self.total
                else "")
        extra = f" [{self.postfix}]" if self.postfix else ""
        print(f"{self.desc}: {count} {self.unit} in {_duration(elapsed)} ({rate:.1f} {self.unit}/s{left}){extra}",
              file=sys.stderr, flush=True)


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar where someone watches it live, ``Lines`` elsewhere; same arguments as tqdm."""
    if _interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return Lines(iterable, **kwargs)
