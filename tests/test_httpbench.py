"""``python -m engine bench --http`` in a tiny mode: rows present, numbers sane (no timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import httpbench as _httpbench

ROOT = Path(__file__).resolve().parent.parent

WRK_REPORT = """\
Running 1s test @ http://127.0.0.1:40000/me
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.21ms  412.00us   1.20s    90.00%
    Req/Sec    10.00k   500.00    11.00k    80.00%
  Latency Distribution
     50%  850.00us
     75%    3.30ms
     90%    3.60ms
     99%    1.05s
  9960 requests in 1.00s, 1.40MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:   9960.00
Transfer/sec:      1.40MB
"""


def test_parse_wrk() -> None:
    row = _httpbench.parse_wrk(WRK_REPORT)
    assert row["requests"] == 9960
    assert row["seconds"] == pytest.approx(1.0)
    assert row["rps"] == pytest.approx(9960.0)
    assert row["avg_ms"] == pytest.approx(3.21)
    assert row["p50_ms"] == pytest.approx(0.85)
    assert row["p99_ms"] == pytest.approx(1050.0)
    assert row["non2xx"] == 7
    assert row["socket_errors"] == 3
    with pytest.raises(ValueError, match="not a wrk report"):
        _httpbench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_missing_peer_is_skipped_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "starsessions" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(shutil, "which", lambda _: "/usr/bin/wrk")
    code = _httpbench.main(["--systems", "starsessions", "--redis-server", sys.executable])
    err = capsys.readouterr().err
    assert code == 2
    assert "skipping starsessions: not installed (starsessions" in err
    assert "nothing to measure" in err


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_tiny_run_has_a_row_per_system(tmp_path: Path) -> None:
    systems = ["engine", "engine-cached", "engine-cached-direct"] + [
        key
        for key, module in (("starsessions", "starsessions"), ("redis-sdk", "redis_fastapi"))
        if importlib.util.find_spec(module) is not None
    ]
    out = tmp_path / "http.json"
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "bench",
        "--http",
        "--seconds",
        "1",
        "--seq-seconds",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--connections",
        "4",
        "--replicas",
        "0",
        "--systems",
        ",".join(systems),
        "--json",
        str(out),
        "--markdown",  # the tables as bench.md records them
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| /me |" in proc.stdout
    result = json.loads(out.read_text())
    assert [row["system"] for row in result["summary"]] == systems
    assert result["skipped"] == {}
    for row in result["summary"]:
        for tag in ("bare", "me"):
            assert row[f"{tag}_rps"] > 0
            assert 0 < row[f"{tag}_p50_ms"] <= row[f"{tag}_p99_ms"]
            assert row[f"{tag}_cpu_us_per_req"] > 0
            assert row[f"{tag}_seq_mean_us"] > 0
            assert row[f"{tag}_non2xx"] == 0
        assert row["bare_redis_cmds_per_req"] < 0.1  # /bare touches no session
        if row["system"].startswith("engine-cached"):
            assert row["me_redis_cmds_per_req"] < 0.5  # answered by the local cache
        else:
            assert row["me_redis_cmds_per_req"] >= 0.9  # every /me asks Redis
        assert 0 < row["me_to_bare_rps"] < 2
    # one load and one sequential run per endpoint and system
    assert len(result["runs"]) == 4 * len(systems)
    assert result["machine"]["redis"]
    assert result["redis_rtt"]["mean_ms"] > 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_json_alone_goes_to_stdout_and_the_tables_to_stderr() -> None:
    cmd = [sys.executable, "-m", "engine", "bench", "--http", "--systems", "engine"]
    cmd += ["--seconds", "1", "--seq-seconds", "1", "--warmup", "1", "--rounds", "1"]
    cmd += ["--connections", "2", "--replicas", "0", "--primaries", "1", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert [row["system"] for row in result["summary"]] == ["engine"]
    assert result["summary"][0]["me_rps"] > 0
    # The report, in plain text: a rich table's header, no Markdown, no escape codes.
    assert "/me against /bare" in proc.stderr and "| /me |" not in proc.stderr
    assert "\x1b" not in proc.stderr
