"""Failover drills: the engine under a steady mixed load while the cluster fails.

Each test starts its own six-node cluster (the drills kill, pause and fail over nodes).
The short drills run in CI; the long ones are marked ``slow`` and their latest figures are
recorded in bench.md (``python -m engine drill SCENARIO``).
"""

from __future__ import annotations

import pytest

from engine.cli.drill import DrillReport, cluster_options, run_drill, write_chart
from engine.testing import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.drill]

NODE_TIMEOUT_S = 2.0


async def drill(
    scenario: str,
    *,
    wait_replicas: int = 0,
    sessions: int = 5000,
    rate: float = 1500,
    **options: object,
) -> DrillReport:
    with LocalCluster(**{**cluster_options(scenario), **options}) as cl:
        report = await run_drill(
            scenario, cl, sessions=sessions, rate=rate, wait_replicas=wait_replicas, settle=1.5
        )
    print(report.summary())
    assert not [n for n in report.fault_notes if "failed" in n], report.fault_notes
    assert report.calls > rate * 3  # the load really ran through the whole drill
    assert report.resurrected == 0  # never, in any drill: fail closed
    return report


async def test_kill_primary_recovers_and_loses_nothing_acknowledged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = await drill("kill-primary", wait_replicas=1)
    assert report.failed_other == 0, "only the dead shard's slots may fail"
    assert report.failed_victim > 0  # fail closed while the shard is down, not "valid"
    assert report.promoted_s is not None and report.recovered_s is not None
    # The engine itself adds little: it serves the promoted replica within 0.6 s of the
    # cluster reporting it. The cluster's own promotion takes node timeout + election.
    assert report.recovered_s <= report.promoted_s + 0.6, report.summary()
    assert report.recovered_s <= NODE_TIMEOUT_S + 2.0 + 1.0, report.summary()
    assert report.lost_creates == 0  # with wait_replicas=1 every acknowledged create survives
    assert set(report.errors_by_type) <= {"EngineUnavailable", "ReplicationIncomplete"}
    assert write_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000


async def test_manual_failover_has_zero_failed_calls() -> None:
    report = await drill("manual-failover", wait_replicas=1)
    assert report.failed_calls == 0, report.summary()
    assert report.lost_creates == 0


async def test_script_flush_has_zero_failed_calls() -> None:
    report = await drill("script-flush")
    assert report.failed_calls == 0, report.summary()


async def test_takeover_recovers_within_five_seconds() -> None:
    report = await drill("takeover", wait_replicas=1)
    assert report.failed_other == 0
    assert report.failed_calls == 0 or (report.recovered_s or 0) <= 5.0, report.summary()


async def test_forced_failover_old_primary_returns_as_replica() -> None:
    report = await drill("forced-failover", wait_replicas=1)
    assert any("now a replica" in n for n in report.fault_notes), report.fault_notes
    assert report.failed_other == 0, report.summary()
    assert report.lost_creates == 0


async def test_replica_down_slows_durable_writes_not_validations() -> None:
    report = await drill("replica-down", wait_replicas=1)
    assert report.failed_other == 0, report.summary()
    # Durable writes on the shard say they are unconfirmed; nothing times out.
    assert set(report.errors_by_type) <= {"ReplicationIncomplete"}, report.summary()
    assert report.lost_creates == 0
    before = report.victim_validate_p99_ms_before
    during = report.victim_validate_p99_ms_during
    assert before is not None and during is not None
    # A validation queued behind a WAIT would take wait_timeout (500 ms).
    assert during < 2 * before + 25, report.summary()


async def test_slow_node_does_not_hurt_other_shards() -> None:
    report = await drill("slow-node")
    assert report.failed_other == 0, report.summary()
    assert report.other_p99_ms_during is not None
    # The slow primary sleeps 300 ms at a time; other shards' calls never wait behind it.
    assert report.other_p99_ms_during < 100, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("full_coverage", [False, True])
async def test_shard_down(full_coverage: bool) -> None:
    extra = cluster_options("shard-down", full_coverage)["extra_config"]
    report = await drill("shard-down", extra_config=extra)
    if not full_coverage:
        assert report.failed_other == 0, report.summary()
    assert report.failed_victim > 0


@pytest.mark.slow
async def test_kill_loop() -> None:
    report = await drill("kill-loop", wait_replicas=1, sessions=10_000)
    assert report.lost_creates == 0


@pytest.mark.slow
async def test_restart_all() -> None:
    report = await drill("restart-all")
    assert report.recovered_s is not None


@pytest.mark.slow
async def test_kill_primary_at_full_scale() -> None:
    report = await drill("kill-primary", sessions=50_000, rate=5000)
    assert report.failed_other == 0


def test_drill_on_a_cluster_it_did_not_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    from helpers import all_keys

    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        base = [sys.executable, "-m", "engine", "drill"]

        def drill_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*base, *args, "--out", str(tmp_path)],
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )

        refused = drill_cli("manual-failover", "--url", cl.url)
        assert refused.returncode == 2 and "--i-own-this-cluster" in refused.stderr
        needs_signals = drill_cli("kill-primary", "--url", cl.url, "--i-own-this-cluster")
        assert needs_signals.returncode == 2 and "process control" in needs_signals.stderr
        ok = drill_cli(
            "manual-failover",
            "--url",
            cl.url,
            "--i-own-this-cluster",
            "--sessions",
            "2000",
            "--rate",
            "800",
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        report = json.loads((tmp_path / "manual-failover-w0.json").read_text())
        assert report["failed_calls"] == 0 and report["calls"] > 2000
        assert all_keys(cl.url, "drill") == []  # the drill removed its own sessions


def test_drill_json_on_stdout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--json`` alone: stdout is the reports as JSON, the human summary goes to stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            *(sys.executable, "-m", "engine", "drill", "script-flush", "--sessions", "300"),
            *("--rate", "200", "--out", str(tmp_path), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)
    assert [r["scenario"] for r in reports] == ["script-flush"]
    assert reports[0]["calls"] > 0 and "resurrected" in reports[0]
    assert "drill script-flush" in proc.stderr
