"""Terminal output shared by the command-line tools (demo, bench, drill), through rich.

On a terminal a phase shows ONE live line that rewrites itself, and charts are coloured;
in a log or a pipe there are no colours and no control codes, and a phase's progress is a
plain line at most every ``LOG_INTERVAL`` seconds (a 4-second failover is a line or two,
not one per 100 ms). rich decides what a terminal is and honours ``NO_COLOR``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from typing import IO, Final

from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = ["LOG_INTERVAL", "Progress", "percentile_ms"]

LOG_INTERVAL: Final = 2.0
"""Seconds between progress lines when the output is not a terminal."""

_MARK_STYLES: Final = {".": "green", "!": "yellow", "x": "bold red"}


class Progress:
    """One live status line per phase on a terminal; sparse plain lines otherwise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self._live: Live | None = None
        self._last = float("-inf")

    def update(self, text: str) -> None:
        """The phase's current state: rewrites the live line (terminal) or, off a
        terminal, prints it if the last line is ``LOG_INTERVAL`` old."""
        line = Text(f"  {text}")
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(line, console=self.console, refresh_per_second=10, transient=True)
                self._live.start()
            else:
                self._live.update(line)
            return
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL:
            self._last = now
            self.console.print(line)

    def done(self, text: str, *, style: str = "") -> None:
        """End the phase with a line that stays."""
        self._stop_live()
        self._last = float("-inf")
        self.console.print(Text(f"  {text}", style=style))

    def chart(self, title: str, lines: Iterable[str]) -> None:
        """A text chart whose marks ``.`` ``!`` ``x`` are green, yellow, red on a terminal."""
        self._stop_live()
        self.console.print(Text(f"  {title}"))
        for line in lines:
            text = Text(f"    {line}")
            # Lines read "  1.2s ..!!x.": the marks follow the time's "s ".
            start = text.plain.find("s ") + 2
            for i, mark in enumerate(text.plain[start:], start):
                style = _MARK_STYLES.get(mark)
                if style:
                    text.stylize(style, i, i + 1)
            self.console.print(text)

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def percentile_ms(data: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of durations in seconds, in milliseconds."""
    if not data:
        return None
    ordered = sorted(data)
    rank = math.ceil(q / 100 * len(ordered))  # nearest rank: p50 of 1..100 is 50
    return ordered[min(len(ordered), max(rank, 1)) - 1] * 1000.0
