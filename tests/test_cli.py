"""``python -m engine``: one parser; every command is reachable and documents itself."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import delete_prefix

from engine import SessionEngine
from engine.cli import COMMANDS, main
from engine.testing import LocalCluster


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


# -- output: tables in plain text off a terminal, --json alone on stdout ---------------------


def _engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m engine ARGS`` with stdout and stderr piped, colour not forced."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def test_piped_output_has_no_escape_codes() -> None:
    out = _engine("acl", "--prefix", "app", "--explain")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout + out.stderr
    assert out.stdout.startswith("ACL SETUSER ") and len(out.stdout.splitlines()) == 1
    assert "GRANT" in out.stderr and "app:*" in out.stderr


def _json_only(out: subprocess.CompletedProcess[str]) -> Any:
    """stdout parsed as JSON: it must be the JSON and nothing else."""
    assert out.returncode == 0, out.stdout + out.stderr
    assert "\x1b" not in out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.mark.requires_redis_server
def test_bench_json_on_stdout_table_on_stderr() -> None:
    out = _engine(
        *("bench", "--sessions", "200", "--concurrency", "4", "--seconds", "0.2"),
        *("--rate", "100", "--server-requests", "2000", "--primaries", "1", "--replicas", "0"),
        "--json",
    )
    result = _json_only(out)
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "engine validate" and "redis-py EVALSHA" in names
    assert result["rows"][0]["ops_per_s"] > 0
    assert result["command"].startswith("python -m engine bench")
    assert "engine validate" in out.stderr and "x redis-py EVALSHA" in out.stderr


@pytest.mark.requires_redis_server
def test_tls_bench_json_file_and_markdown(tmp_path: Path) -> None:
    target = tmp_path / "tls.json"
    out = _engine(
        *("bench", "--tls", "--sessions", "100", "--concurrency", "4", "--seconds", "0.2"),
        *("--rounds", "1", "--primaries", "1", "--markdown", "--json", str(target)),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(target.read_text())
    assert {(r["what"], r["cluster"]) for r in result["rows"]} == {
        (what, cluster)
        for what in ("validate", "validate_many x100")
        for cluster in ("plaintext", "TLS")
    }
    assert all(r["ops_per_s"] > 0 for r in result["rows"])
    assert "| validate | TLS |" in out.stdout  # --markdown: what bench.md records


@pytest.mark.requires_redis_server
def test_cluster_up_status_down_json(tmp_path: Path) -> None:
    state = ("--state-file", str(tmp_path / "cluster.json"))
    up = _engine("cluster", "up", "--primaries", "1", "--replicas", "0", *state, "--json")
    try:
        started = _json_only(up)
        assert started["url"].startswith("redis://") and len(started["nodes"]) == 1
        assert started["url"] in up.stderr and "ROLE" in up.stderr  # the report, on stderr
        status = _json_only(_engine("cluster", "status", *state, "--json"))
        assert status["healthy"] is True and status["cluster_state"] == "ok"
        (node,) = status["nodes"]
        assert node["role"] == "primary" and node["alive"] and node["slots"] == [[0, 16383]]
        table = _engine("cluster", "status", *state)
        assert "\x1b" not in table.stdout
        (row,) = [line for line in table.stdout.splitlines() if "primary" in line]
        assert row.split()[:5] == ["primary", str(node["port"]), str(node["pid"]), "yes", "0-16383"]
        assert _json_only(_engine("cluster", "down", *state, "--json"))["stopped"] == 1
        gone = _engine("cluster", "status", *state, "--json")
        assert gone.returncode == 1 and json.loads(gone.stdout)["nodes"] == []
    finally:
        if (tmp_path / "cluster.json").exists():  # a failed assertion must not leak servers
            LocalCluster.from_state_file(tmp_path / "cluster.json").stop()


async def test_sessions_list_table_and_json_file(
    engine: SessionEngine, cluster_url: str, prefix: str, tmp_path: Path
) -> None:
    made = [await engine.create(user_id="carol") for _ in range(2)]
    where = ("--user", "carol", "--url", cluster_url, "--prefix", prefix)
    table = await asyncio.to_thread(_engine, "sessions", "list", *where)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout
    for new in made:
        (row,) = [line for line in table.stdout.splitlines() if new.session.session_id in line]
        assert row.split()[:2] == [new.session.session_id, "active"]
        assert new.token not in table.stdout
    target = tmp_path / "sessions.json"
    saved = await asyncio.to_thread(_engine, "sessions", "list", *where, "--json", str(target))
    assert saved.returncode == 0 and "SESSION ID" in saved.stdout  # a file: the table stays
    listed = json.loads(target.read_text())
    assert {s["session_id"] for s in listed} == {n.session.session_id for n in made}


def test_bench_network_tables_from_a_result() -> None:
    """``bench --network`` needs root and namespaces: its tables are checked on a result."""
    from engine.cli.netbench import render_networks, report_networks

    def row(name: str, p50_ms: float | None) -> dict[str, Any]:
        return {"name": name, "ops_per_s": 4000.0, "p50_ms": p50_ms, "p99_ms": 0.4}

    result = {
        "loopback": [row("validate, 1 in flight", 0.1), row("validate @ 500/s", None)],
        "netns": [row("validate, 1 in flight", 0.15), row("validate @ 500/s", 0.2)],
        "machine": {"cores": 2, "cpu": "cpu", "python": "3", "redis": "7", "loop": "asyncio"},
        "loopback_url": "redis://127.0.0.1:7000",
        "netns_url": "redis://10.213.0.2:7000",
    }
    markdown = render_networks(result).splitlines()
    assert (
        markdown[2]
        == "| validate, 1 in flight | 4,000 | 4,000 | 0.100 / 0.400 | 0.150 / 0.400 | +50 us |"
    )
    assert markdown[3].endswith("| - us |")
    out = io.StringIO()
    report_networks(result, file=out)
    (line,) = [x for x in out.getvalue().splitlines() if x.startswith(" validate, 1")]
    assert line.split()[-2:] == ["+50", "us"] and "|" not in line


@pytest.mark.cluster
def test_the_demo_shows_the_local_cache_and_a_revocation_crossing_processes(
    cluster_url: str, prefix: str
) -> None:
    argv = ["--url", cluster_url, "--sessions", "2000", "--users", "200", "--seconds", "1"]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "engine", "demo", *argv, "--prefix", prefix, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        delete_prefix(cluster_url, prefix)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout)  # --json alone: stdout is the JSON, the table on stderr
    assert result["figures"]["validate_per_s"] > 0
    assert result["figures"]["create_per_s"] > 0
    report = out.stderr.split("report", 1)[1]
    assert "\x1b[" not in report  # a pipe: no colour codes
    cache = re.search(r"local cache +hit rate ([\d.]+)% \(([\d,]+) hits", report)
    assert cache is not None and int(cache.group(2).replace(",", "")) > 0, report
    crossing = re.search(r"revocation across processes +(\d+)/(\d+) revocations seen", report)
    assert crossing is not None and crossing.group(1) == crossing.group(2), report
