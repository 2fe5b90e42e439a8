"""engine.cli.console: one live line per phase on a terminal, sparse plain lines in a log."""

from __future__ import annotations

import io

import pytest

from engine.cli.console import Progress

CHART = ["  0.0s ....!!xx..", "  1.5s ...."]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_a_phase_is_one_line_not_one_per_update() -> None:
    out = io.StringIO()
    progress = Progress(out)
    for i in range(43):  # the demo's failover: one update per 100 ms
        progress.update(f"failover: {i / 10:.1f}s since kill")
    progress.done("recovered")
    progress.chart("timeline:", CHART)
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "failover:" in line] == ["  failover: 0.0s since kill"]
    assert "  recovered" in lines
    assert "    " + CHART[0] in lines
    assert "\x1b" not in out.getvalue()  # no colour, no cursor codes in a log


def test_on_a_terminal_the_line_is_live_and_the_chart_coloured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")  # CI's TERM may be unset or "dumb"
    out = _Terminal()
    progress = Progress(out)
    assert progress.console.is_terminal
    for i in range(43):
        progress.update(f"failover: {i / 10:.1f}s since kill")
    progress.done("recovered")
    progress.chart("timeline:", CHART)
    text = out.getvalue()
    # The live line is transient: once the phase is done, what stays is its last line.
    assert "recovered" in text
    assert "\x1b[32m" in text and "\x1b[1;31m" in text  # '.' green, 'x' bold red
    assert text.count("\n") < 10
