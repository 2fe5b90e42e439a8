"""``python -m engine``: one parser; every command is reachable and documents itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(
    "command", [*sorted(COMMANDS), "bench --http", "bench --tls", "bench --local-cache"]
)
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
