"""``python -m engine``: one parser; every command is reachable and documents itself."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import delete_prefix

from engine.cli import COMMANDS, main


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["no-such-command"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    err = capsys.readouterr().err
    for name in COMMANDS:
        assert name in err


def test_help_and_version_exit_zero() -> None:
    for flag in ("--help", "--version"):
        out = subprocess.run(
            [sys.executable, "-m", "engine", flag],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
    assert "0.1.0" in out.stdout


@pytest.mark.parametrize("command", [*sorted(COMMANDS), "bench --http", "bench --tls"])
def test_every_command_has_help_with_its_defaults(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine", *command.split(), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    assert "(default:" in out.stdout


def test_the_key_prefix_flag_has_one_name() -> None:
    for command in ("demo", "loadtest"):
        out = subprocess.run(
            [sys.executable, "-m", "engine", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "--prefix" in out.stdout and "--key-prefix" not in out.stdout, command


@pytest.mark.cluster
def test_the_demo_shows_the_local_cache_and_a_revocation_crossing_processes(
    cluster_url: str, prefix: str
) -> None:
    argv = ["--url", cluster_url, "--sessions", "2000", "--users", "200", "--seconds", "1"]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "engine", "demo", *argv, "--prefix", prefix],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        delete_prefix(cluster_url, prefix)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = out.stdout.split("\nreport\n", 1)[1]
    cache = re.search(r"local cache +hit rate ([\d.]+)% \(([\d,]+) hits", report)
    assert cache is not None and int(cache.group(2).replace(",", "")) > 0, report
    crossing = re.search(r"revocation across processes +(\d+)/(\d+) revocations seen", report)
    assert crossing is not None and crossing.group(1) == crossing.group(2), report
