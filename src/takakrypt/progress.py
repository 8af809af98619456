"""A small progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Bar:
    """``Bar(total, label)``; call it with byte counts; ``close()`` when done.

    Redraws at most ten times a second (counting steps: also whenever the label, the
    current step, changes -- steps are few, each is shown).  ``enabled=None`` means
    "if stderr is a TTY".
    ``unit``: "B" counts bytes (sizes and a rate); any other word counts steps
    ("3/12 steps", no rate).  ``label`` may be changed between calls (the current step).
    """

    def __init__(self, total: int | None, label: str, *, enabled: bool | None = None,
                 stream: TextIO | None = None, unit: str = "B") -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.unit = total, label, unit
        self.done = 0
        self.start = self._last = time.monotonic()
        self._shown: str | None = None

    def start_total(self, total: int) -> None:
        """The size, once known (after a header or a first walk); 0 = unknown."""
        self.total = total or None

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or (self.unit != "B" and self.label != self._shown):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._shown = self.label
        rate = self.done / max(now - self.start, 1e-9)
        try:
            width = max(10, min(40, os.get_terminal_size(self.stream.fileno()).columns - 60))
        except (OSError, ValueError):
            width = 30
        if self.unit != "B":
            frac = min(self.done / self.total, 1.0) if self.total else 0.0
            bar = "#" * int(frac * width)
            eta = (self.total - self.done) / rate if rate and self.total else 0
            text = (f"\r[{bar:<{width}}] {self.done}/{self.total or '?'} {self.unit} "
                    f"ETA {eta:4.0f}s {self.label}\x1b[K")
        elif self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * width)
            eta = (self.total - self.done) / rate if rate else 0
            text = (f"\r{self.label} [{bar:<{width}}] {frac * 100:5.1f}% "
                    f"{_human(self.done)}/{_human(self.total)} {_human(rate)}/s ETA {eta:4.0f}s")
        else:
            text = f"\r{self.label} {_human(self.done)} {_human(rate)}/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
