"""engine.cli.console: one live line per phase on a terminal, sparse plain lines in a log;
report tables (rich, plain in a pipe, Markdown for bench.md); ``--json [FILE]``."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest

from engine.cli.console import (
    JSON_STDOUT,
    Progress,
    add_json_option,
    markdown_table,
    print_table,
    report_stream,
    right,
    write_json,
)

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


# -- report tables ---------------------------------------------------------------------------

COLUMNS = ("what", right("ops/s"), "note")
ROWS = [("engine validate", "123,456", "x" * 120), ("redis-py", None, "")]


def _no_colour_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


def test_in_a_pipe_a_table_is_plain_text_one_line_per_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_colour_env(monkeypatch)
    out = io.StringIO()
    print_table("bench", COLUMNS, ROWS, notes=["Machine: 2 cores"], file=out)
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "bench"
    assert lines[1].split() == ["what", "ops/s", "note"]
    # Wider than 80 columns, yet not wrapped: a row stays one line for grep.
    (row,) = [line for line in lines if "engine validate" in line]
    assert row.split() == ["engine", "validate", "123,456", "x" * 120]
    (empty,) = [line for line in lines if "redis-py" in line]
    assert empty.split() == ["redis-py", "-"]
    # ops/s is right-aligned: the two cells end in the same column.
    assert row.index("123,456") + len("123,456") == empty.rindex("-") + 1
    assert all(line == line.rstrip() for line in lines)
    assert lines[-1] == "Machine: 2 cores"


def test_markdown_table_is_what_bench_md_records() -> None:
    out = io.StringIO()
    print_table(
        "ignored", COLUMNS, [("a|b", "1", "n")], notes=["Machine."], markdown=True, file=out
    )
    assert out.getvalue() == (
        "| what | ops/s | note |\n|---|---:|---|\n| a\\|b | 1 | n |\n\nMachine.\n"
    )
    assert markdown_table(("a",), [(None,)]) == "| a |\n|---|\n| - |"


def test_on_a_terminal_the_table_is_styled_unless_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_colour_env(monkeypatch)
    styled = _Terminal()
    print_table("bench", COLUMNS, ROWS, file=styled)
    assert "\x1b[" in styled.getvalue()  # the bold header: this test can fail
    monkeypatch.setenv("NO_COLOR", "1")
    plain, piped = _Terminal(), io.StringIO()
    print_table("bench", COLUMNS, ROWS, file=plain)
    print_table("bench", COLUMNS, ROWS, file=piped)
    assert "\x1b" not in plain.getvalue()
    assert plain.getvalue() == piped.getvalue()


# -- --json ----------------------------------------------------------------------------------


def test_json_option_alone_means_stdout_with_a_file_means_the_file() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    add_json_option(parser)
    assert parser.parse_args(["status"]).json is None
    assert parser.parse_args(["status", "--json"]).json == JSON_STDOUT
    assert parser.parse_args(["status", "--json", "out.json"]).json == "out.json"
    assert report_stream(parser.parse_args(["status", "--json"])) is sys.stderr
    assert report_stream(parser.parse_args(["status", "--json", "f"])) is sys.stdout
    assert report_stream(parser.parse_args(["status"])) is sys.stdout


def test_write_json_to_stdout_or_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(None, {"a": 1})
    assert capsys.readouterr().out == ""
    write_json(JSON_STDOUT, {"a": 1, "at": Path("/x")})
    assert json.loads(capsys.readouterr().out) == {"a": 1, "at": "/x"}
    write_json(tmp_path / "r.json", [1, 2])
    assert json.loads((tmp_path / "r.json").read_text()) == [1, 2]
    assert capsys.readouterr().out == ""
