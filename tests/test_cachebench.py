"""``python -m engine bench --local-cache`` in a tiny mode: every figure present (no timings).

The figures themselves are measured in bench.md (section 10, "Local cache"); here only that one run
produces all of them, that the cache actually answered the hit phase, that every worker saw
every revocation, and that bad arguments are refused clearly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    *("--seconds", "0.2", "--rounds", "2", "--hot", "128", "--tasks", "16"),
    *("--latency-samples", "1000", "--zipf-tokens", "1000", "--mix-samples", "5000"),
    *("--mix-tasks", "4", "--memory-entries", "500", "--workers", "2", "--tracked", "200"),
    *("--revocations", "4", "--revoke-gap-ms", "2", "--worker-timeout", "30"),
    *("--fan-out-writes", "50"),
    # Any commit works for the shape of the output; HEAD exists in every clone.
    *("--baseline-commit", "HEAD"),
]


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@pytest.mark.timeout(280)
@pytest.mark.skipif(shutil.which("git") is None, reason="the baseline comes from git")
def test_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "engine", "bench", "--local-cache", *TINY),
            *("--markdown", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=260,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    hits = result["hits"]
    modes = {(row["mode"], row["engine"]) for row in hits["rows"]}
    assert modes == {
        (mode, engine)
        for mode in ("sequential", "gather x16", "16 tasks")
        for engine in ("cached", "uncached")
    }
    for row in hits["rows"]:
        assert number(row["ops_per_s"]) and number(row["cpu_us_per_op"]), row
        assert number(row["ops_per_cpu_second"]), row
        assert len(row["all_rounds_ops_per_s"]) == 2
        assert row["none"] == 0, row
        if row["engine"] == "cached":
            assert row["hit_fraction"] == 1.0, row  # the cache answered every call
    for figure in ("best_hit_ops_per_s", "best_uncached_ops_per_s"):
        assert number(hits[figure])
    assert number(hits["ratio_best_hit_to_best_uncached"])
    assert set(hits["ratio_by_mode"]) == {"sequential", "gather x16", "16 tasks"}
    for latency in (hits["hit_latency"], hits["uncached_latency"]):
        for figure in ("p50_us", "p99_us", "p999_us", "max_us"):
            assert number(latency[figure]), latency
    assert hits["hit_latency"]["hit_fraction"] == 1.0
    assert set(hits["targets"]) == {"hits_per_s_300k", "ratio_10x", "p99_hit_under_20us"}

    mix = result["mix"]
    assert mix["tokens"] == 1000 and mix["zipf_s"] == 1.1 and mix["write_fraction"] == 0.01
    for label in ("cached", "uncached"):
        row = mix["rows"][label]
        assert number(row["ops_per_s"]) and number(row["validations_per_s"])
        assert row["writes"] > 0 and row["validations"] > 0
        assert row["unexplained_none"] == 0, row  # no live session refused
    assert 0 < mix["rows"]["cached"]["hit_rate"] <= 1
    assert mix["rows"]["uncached"]["hit_rate"] is None
    assert number(mix["ratio"])

    revocation = result["revocation"]
    assert revocation["samples"] == 2 * 4 and revocation["unseen"] == 0
    for figure in ("p50", "p99", "max"):
        assert isinstance(revocation[f"from_ack_{figure}_ms"], float)
        assert isinstance(revocation[f"from_send_{figure}_ms"], float)

    fan_out = result["fan_out"]
    assert fan_out["updates"] == 50 and fan_out["holders_per_key"] == 2
    assert fan_out["invalidation_messages"] == 2 * 50  # one per (key, caching process)
    for figure in ("server_cpu_us_per_update_unwatched", "server_cpu_us_per_update_watched"):
        assert number(fan_out[figure])
    assert "server_cpu_us_per_message" in fan_out  # a float, or None below the 10 ms tick

    tracking = result["tracking"]
    steps = tracking["steps"]
    assert [s["processes"] for s in steps] == [0, 1, 2]
    assert [s["tracking_total_items"] for s in steps] == [0, 200, 400]  # before the fan-out
    assert steps[2]["tracking_total_keys"] == 200
    for figure in (
        "bytes_per_tracked_key_first_process",
        "bytes_per_item_each_further_process",
        "worker_rss_bytes_per_entry",
    ):
        assert isinstance(tracking[figure], float), figure

    memory = result["entry_memory"]
    assert memory["entries"] == 500 and number(memory["bytes_per_entry"])

    before_after = result["uncached_before_after"]
    engines = before_after["engines"]
    assert engines["after"].startswith(str(ROOT))
    assert not engines["before"].startswith(str(ROOT))  # the extracted commit, not ours
    for mode in ("sequential", "gather"):
        for side in ("before", "after"):
            assert number(before_after[f"{mode}|{side}"]["ops_per_s"])
        assert number(before_after[f"{mode}|after_over_before_ops"])
        assert number(before_after[f"{mode}|after_over_before_cpu"])

    for figure in ("machine", "load_average", "date", "command"):
        assert result[figure]
    assert "| sequential | cached |" in done.stdout  # --markdown: what bench.md records
    assert "| cached | " in done.stdout and "| sequential | " in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "--workers must be > 0"),
        (["--fan-out-writes", "-1"], "--fan-out-writes must be > 0"),
        (["--hot", "8", "--tasks", "16"], "--hot must be >= --tasks"),
        (["--write-fraction", "1.5"], "--write-fraction must be in [0, 1)"),
        (["--callgrind", "3200,640"], "expected 0 < LOW < HIGH"),
        (["--baseline-commit", "no-such-commit"], "is not a commit of"),
    ],
)
def test_bad_arguments_are_refused_before_any_cluster(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--local-cache", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert "starting a local cluster" not in done.stderr
