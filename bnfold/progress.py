"""A one-line progress bar for long work: on a terminal only, quiet otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update(done, **fields)`` redraws ``label done/total  k=v ...  N/s  ETA``.

    Draws at most every ``min_interval`` seconds and only when ``stream`` is a terminal
    (or ``enabled=True``), so piping output or ``--json`` stays clean.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.2,
    ):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, done: int, force: bool = False, **fields: float | str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        pct = 100.0 * done / max(self.total, 1)
        line = (
            f"\r{self.label} {done}/{self.total} ({pct:3.0f}%)  {extra}  {rate:,.0f}/s"
            f"  ETA {eta:4.0f}s "
        )
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
