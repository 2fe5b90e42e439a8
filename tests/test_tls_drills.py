"""The failover drills on a cluster that speaks only TLS: the same bars as in plaintext
(tests/test_drills.py), with every reconnect paying a TLS handshake."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_drills import NODE_TIMEOUT_S, drill

pytestmark = [pytest.mark.cluster, pytest.mark.drill]


async def test_kill_primary_over_tls(tmp_path: Path) -> None:
    report = await drill("kill-primary", wait_replicas=1, tls=True)
    assert report.failed_other == 0, "only the dead shard's slots may fail"
    assert report.failed_victim > 0  # fail closed while the shard is down, not "valid"
    assert report.promoted_s is not None and report.recovered_s is not None
    assert report.recovered_s <= report.promoted_s + 0.6, report.summary()
    assert report.recovered_s <= NODE_TIMEOUT_S + 2.0 + 1.0, report.summary()
    assert report.lost_creates == 0
    assert report.resurrected == 0
    assert set(report.errors_by_type) <= {"EngineUnavailable", "ReplicationIncomplete"}


async def test_manual_failover_over_tls_has_zero_failed_calls() -> None:
    report = await drill("manual-failover", wait_replicas=1, tls=True)
    assert report.failed_calls == 0, report.summary()
    assert report.lost_creates == 0
