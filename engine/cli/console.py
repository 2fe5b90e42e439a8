"""Terminal output shared by the command-line tools (demo, bench, drill)."""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "percentile_ms"]


class Progress:
    """One self-rewriting status line on a terminal; plain lines otherwise."""

    def __init__(self, stream: object = sys.stderr) -> None:
        self._stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self._tty else 2.0):
            return
        self._last = now
        out = self._stream
        if self._tty:
            print(f"\r\033[K  {text}", end="", file=out, flush=True)  # type: ignore[call-overload]
        else:
            print(f"  {text}", file=out, flush=True)  # type: ignore[call-overload]

    def done(self, text: str) -> None:
        out = self._stream
        if self._tty:
            print(f"\r\033[K  {text}", file=out, flush=True)  # type: ignore[call-overload]
        else:
            print(f"  {text}", file=out, flush=True)  # type: ignore[call-overload]


def percentile_ms(data: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of durations in seconds, in milliseconds."""
    if not data:
        return None
    ordered = sorted(data)
    rank = math.ceil(q / 100 * len(ordered))  # nearest rank: p50 of 1..100 is 50
    return ordered[min(len(ordered), max(rank, 1)) - 1] * 1000.0
