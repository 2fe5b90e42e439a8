"""Terminal output shared by the command-line tools (demo, bench, drill), through rich.

On a terminal a phase shows ONE live line that rewrites itself, and charts are coloured;
in a log or a pipe there are no colours and no control codes, and a phase's progress is a
plain line at most every ``LOG_INTERVAL`` seconds (a 4-second failover is a line or two,
not one per 100 ms). rich decides what a terminal is and honours ``NO_COLOR``.

Report tables go through ``print_table`` (a rich table; in a pipe the same table in plain
text at its natural width, never wrapped to 80 columns; with ``markdown=True`` a Markdown
table, for what bench.md records). Figures go out as JSON through ``add_json_option`` and
``write_json``: ``--json`` alone puts the JSON on stdout and the human report on stderr,
``--json FILE`` writes the file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

__all__ = [
    "JSON_STDOUT",
    "LOG_INTERVAL",
    "Progress",
    "add_json_option",
    "add_markdown_option",
    "markdown_table",
    "percentile_ms",
    "print_table",
    "report_stream",
    "right",
    "write_json",
]

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


# -- report tables --------------------------------------------------------------------------

Cell = str | int | float | None
"""A table cell; ``None`` reads ``-``. Numbers are formatted by the caller (it knows the unit)."""

_UNWRAPPED: Final = 100_000
"""Console width for rendering off a terminal: wide enough that no table wraps."""


def right(header: str) -> Column:
    """A right-aligned (numeric) column."""
    return Column(header, justify="right", overflow="fold")


def _cell(value: Cell) -> str:
    return "-" if value is None else str(value)


def _header(column: str | Column) -> str:
    return column if isinstance(column, str) else str(column.header)


def markdown_table(columns: Sequence[str | Column], rows: Iterable[Sequence[Cell]]) -> str:
    """A Markdown table (right-aligned columns as ``---:``), ``|`` in cells escaped."""

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if isinstance(c, Column) and c.justify == "right" else "---" for c in columns]
    out = [line(_header(c) for c in columns), "|" + "|".join(align) + "|"]
    out += [line(_cell(v) for v in row) for row in rows]
    return "\n".join(out)


def print_table(
    title: str | None,
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[Cell]],
    *,
    notes: Sequence[str] = (),
    markdown: bool = False,
    file: IO[str] | None = None,
) -> None:
    """Print a report table and the notes under it.

    On a terminal: a rich table, bold header, fitted to the window. Off a terminal (a pipe,
    a log), with ``NO_COLOR`` or ``TERM=dumb``: the same table in plain text (no escape
    code at all) at its natural width, lines
    right-stripped, so ``grep`` and ``cut`` see whole rows. ``markdown``: a Markdown table
    without the title, the notes as paragraphs (what bench.md records).
    """
    stream = file or sys.stdout
    rows = list(rows)
    if markdown:
        body = markdown_table(columns, rows)
        stream.write("\n\n".join([body, *notes]) + "\n")
        stream.flush()
        return
    table = Table(
        # fold: on a narrow terminal a long word breaks over lines instead of losing its
        # end to an ellipsis (a system's label, a node id are worth reading whole).
        *(Column(c, overflow="fold") if isinstance(c, str) else c for c in columns),
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console = Console(file=stream, highlight=False)
    if console.is_terminal and not (console.no_color or console.is_dumb_terminal):
        console.print(table)
        for note in notes:
            console.print(Text(f"\n{note}"))
        return
    plain = io.StringIO()
    Console(file=plain, highlight=False, width=_UNWRAPPED, no_color=True).print(table)
    text = "\n".join(line.rstrip() for line in plain.getvalue().splitlines())
    stream.write("\n\n".join([text, *notes]) + "\n")
    stream.flush()


def add_markdown_option(parser: argparse.ArgumentParser) -> None:
    """``--markdown``: the report as Markdown tables, to paste into bench.md."""
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the tables as Markdown (what bench.md records) instead of a rich table",
    )


# -- JSON ----------------------------------------------------------------------------------

JSON_STDOUT: Final = "-"
"""``args.json`` when ``--json`` has no file: the JSON goes to stdout."""


def add_json_option(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    """``--json [FILE]``: ``what`` as JSON to FILE, or alone (or ``-``) to stdout; then
    stdout carries the JSON only and the human report goes to stderr. Put it after any
    positional argument (``cluster status --json``): a bare word after it is its FILE."""
    parser.add_argument(
        "--json",
        nargs="?",
        const=JSON_STDOUT,
        default=None,
        metavar="FILE",
        help=f"{what} as JSON: written to FILE, or with no FILE (or -) printed on stdout "
        "alone, the report then on stderr",
    )


def report_stream(args: argparse.Namespace) -> IO[str]:
    """Where the human report goes: stderr when stdout carries the JSON, else stdout."""
    return sys.stderr if getattr(args, "json", None) == JSON_STDOUT else sys.stdout


def write_json(target: str | Path | None, data: Any) -> None:
    """``data`` as JSON to ``target``: nothing if None, stdout if ``-``, else the file."""
    if target is None:
        return
    text = json.dumps(data, indent=2, default=str)
    if str(target) == JSON_STDOUT:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        Path(target).write_text(text + "\n")
