"""Progress of a long loop, for whoever waits on it: a progress bar with count, rate and time left on a terminal, and
in a log (not a terminal) one line every ``every`` items or every ``seconds`` seconds, with the same figures."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("medhybrid")


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``total`` items of ``what`` (``images``), counted with :meth:`update`. On a terminal (``stream`` is a tty): a bar
    in tqdm's format, redrawn in place. Otherwise a log line (``<desc>: 40/5000 images, 3.1 images/s, 26:40 left``)
    whenever ``every`` items (default: a twentieth of the total, at least 10) or ``seconds`` have passed since the
    last one, and at the end."""

    def __init__(self, total: int, desc: str, what: str = "images", every: int | None = None, seconds: float = 30.0,
                 stream: TextIO | None = None, enabled: bool = True):
        self.total, self.desc, self.what, self.seconds = total, desc, what, seconds
        self.every = every or max(10, total // 20)
        self.n = 0
        self.t0 = self.last_t = time.monotonic()
        self.last_n = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        self.drawn = 0.0
        if self.tty:
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 0
            self.width = width or 100  # a terminal that reports no width (a bare pseudo-terminal): 100 columns
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        """The bar (tqdm's format: count, elapsed<left, rate), redrawn in place at most ten times a second."""
        now = time.monotonic()
        if not force and now - self.drawn < 0.1 and self.n < self.total:
            return
        self.drawn = now
        bar = tqdm.format_meter(self.n, self.total, now - self.t0, ncols=self.width - 1, prefix=self.desc,
                                unit=self.what.rstrip("s") or self.what)
        self.stream.write("\r" + bar)
        self.stream.flush()

    def line(self) -> str:
        """``<desc>: n/total <what>, rate, time left``."""
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        tail = f", {_duration(left)} left" if rate > 0 and self.n < self.total else f", {_duration(elapsed)} in all"
        return f"{self.desc}: {self.n}/{self.total} {self.what}, {rate:.2f} {self.what}/s{tail}"

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.tty:
            self._draw()
            return
        now = time.monotonic()
        if self.n - self.last_n >= self.every or now - self.last_t >= self.seconds or self.n >= self.total:
            log.info(self.line())
            self.last_n, self.last_t = self.n, now

    def close(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.tty = False


__all__ = ["Progress"]
