"""``python -m engine``: every command is reachable and documents itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.__main__ import _COMMANDS, main


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    for name in _COMMANDS:
        assert name in err


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_command_has_help(command: str) -> None:
    extra = ["up"] if command == "cluster" else []
    out = subprocess.run(
        [sys.executable, "-m", "engine", command, *extra, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
