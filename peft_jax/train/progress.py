"""A one-line progress bar for terminals: steps done, loss, tokens/s, time left.

`fit` draws it when standard output is a terminal (or when asked); log lines printed meanwhile
appear above it. Off a terminal (CI logs, files, notebooks' captured output) only the periodic
log lines are written, so logs stay readable.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(4, stream=out, width=8, min_interval=0.0)
    >>> bar.update(2, loss=0.5, tokens_per_s=1000.0)
    >>> bar.close()
    >>> out.getvalue().split("\\r\\033[K")[-1]
    '[####    ] 2/4 | loss 0.5000 | 1,000 tok/s | ETA 0s\\n'
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]

_CLEAR = "\r\033[K"


class ProgressBar:
    """Redraws one line in place; `above` prints other output above it.

    Args:
        total: the last step (``None``: unknown; no bar, just the counter).
        stream: where to draw (default ``sys.stdout``).
        width: characters of the bar.
        min_interval: seconds between redraws (fast steps would otherwise flood the terminal).
    """

    def __init__(self, total: int | None, *, stream: TextIO | None = None, width: int = 30,
                 min_interval: float = 0.1, start: int = 0):
        self.total, self.width, self.min_interval = total, width, min_interval
        self.stream = stream or sys.stdout
        self._line, self._drawn_at = "", 0.0
        self._start_step, self._t0 = start, time.perf_counter()

    def _render(self, step: int, loss: float | None, tokens_per_s: float | None) -> str:
        parts = []
        if self.total:
            filled = int(self.width * min(step / self.total, 1.0))
            parts.append(f"[{'#' * filled}{' ' * (self.width - filled)}] {step}/{self.total}")
        else:
            parts.append(f"step {step}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        done = step - self._start_step
        if self.total and done > 0:
            left = (time.perf_counter() - self._t0) / done * (self.total - step)
            parts.append(f"ETA {left:.0f}s")
        return " | ".join(parts)

    def update(self, step: int, *, loss: float | None = None,
               tokens_per_s: float | None = None) -> None:
        """Redraws the bar (at most every ``min_interval`` seconds, and always at the last step)."""
        now = time.perf_counter()
        if now - self._drawn_at < self.min_interval and step != self.total:
            return
        self._line = self._render(step, loss, tokens_per_s)
        self._drawn_at = now
        self.stream.write(_CLEAR + self._line)
        self.stream.flush()

    def above(self, emit, text: str) -> None:
        """Calls ``emit(text)`` (e.g. ``print``) with the bar cleared, then redraws the bar."""
        if self._line:
            self.stream.write(_CLEAR)
            self.stream.flush()
        emit(text)
        if self._line:
            self.stream.write(self._line)
            self.stream.flush()

    def close(self) -> None:
        """Leaves the last drawn bar on screen and moves to a new line."""
        if self._line:
            self.stream.write("\n")
            self.stream.flush()
        self._line = ""
