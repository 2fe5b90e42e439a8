"""Nodes as separate hosts (``LocalCluster(netns=True)``), partitions, and the partition drills.

Root and Linux only (network namespaces): skipped elsewhere with the reason. The short
drills run in CI; the full forms are ``slow`` and recorded in bench.md (section 4d).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.drill import DrillReport, cluster_options, run_drill
from engine.testing import NETNS_SUBNET, HarnessError, LocalCluster, netns_unavailable
from engine.testing._netns import CLIENT, HostNetwork, NetnsUnavailable

pytestmark = [
    pytest.mark.drill,
    pytest.mark.skipif(netns_unavailable() is not None, reason=f"{netns_unavailable()}"),
]

BREAKER_CAP_S = 2.0  # engine/_transport/_node.py: the longest a breaker stays open
CONNECT_TIMEOUT_S = 1.0  # EngineSettings.connect_timeout's default, which the drills use


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line}


def _reaches(cl: LocalCluster, from_port: int, to_port: int) -> bool:
    """Whether node ``from_port``'s namespace can open a TCP connection to ``to_port``."""
    net = cl._net
    assert net is not None
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({cl.node(to_port).host!r}, {to_port}), 0.5).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    argv = [*net.exec_prefix(cl._index_of(from_port)), sys.executable, "-c", probe]
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


def _client_reaches(cl: LocalCluster, port: int) -> bool:
    try:
        return bool(cl.run(port, "PING"))
    except Exception:
        return False


def test_nodes_are_separate_hosts_and_leave_nothing_behind() -> None:
    before = _namespaces()
    with LocalCluster(netns=True) as cl:
        hosts = [n.host for n in cl.nodes]
        assert len(set(hosts)) == 6
        subnet = ipaddress.ip_network(NETNS_SUBNET)
        assert all(ipaddress.ip_address(h) in subnet for h in hosts)
        assert cl.client_address is not None
        assert ipaddress.ip_address(cl.client_address) in subnet
        assert cl.url == f"redis://{hosts[0]}:{cl.ports[0]}"
        net = cl._net
        assert net is not None
        assert set(net.namespaces) <= _namespaces() - before
        assert all(name.startswith("rse-") for name in net.namespaces)
        # Every node announces its own address: that is what clients are sent to.
        slots = cl.run(cl.ports[0], "CLUSTER", "SLOTS")
        assert {entry[2][0] for entry in slots} <= set(hosts)
        interface = net.client_interface
    assert _namespaces() == before
    shown = subprocess.run(["ip", "link", "show", interface], capture_output=True, check=False)
    assert shown.returncode != 0, "the client's veth outlived the cluster"


def test_partition_api_cuts_and_heals() -> None:
    with LocalCluster(netns=True) as cl:
        p0, p1, p2 = (n.port for n in cl.primaries())
        parts = cl.partitions
        parts.cut_client(p0)
        assert not _client_reaches(cl, p0)
        assert _client_reaches(cl, p1)
        assert _reaches(cl, p1, p0), "a client cut must leave the nodes connected"
        parts.heal()
        assert _client_reaches(cl, p0)

        parts.isolate(p0)
        assert _client_reaches(cl, p0), "isolate keeps the client's path"
        assert not _reaches(cl, p0, p1) and not _reaches(cl, p2, p0)
        assert _reaches(cl, p1, p2)
        parts.heal()
        assert _reaches(cl, p0, p1)

        rest = [p for p in cl.ports if p not in (p0, p1)]
        parts.split([p0, p1], rest)
        assert _reaches(cl, p0, p1) and not _reaches(cl, p0, p2) and not _reaches(cl, p2, p1)
        assert all(_client_reaches(cl, p) for p in cl.ports)
        assert frozenset((CLIENT, 0)) not in parts.cuts
        with pytest.raises(HarnessError, match="exactly one group"):
            parts.split([p0, p1], [p1, *rest])
        with pytest.raises(HarnessError, match="exactly one group"):
            parts.split([p0], [p1])
        parts.heal()
        assert not parts.cuts
        cl.wait_healthy(30.0)


def test_loopback_cluster_has_no_partitions() -> None:
    with LocalCluster(primaries=1, replicas_per_primary=0) as cl:
        with pytest.raises(HarnessError, match="netns=True"):
            cl.partitions  # noqa: B018
        assert cl.client_address is None


def test_a_failed_start_removes_what_it_built() -> None:
    before = _namespaces()
    cl = LocalCluster(netns=True, extra_config={"no-such-directive": "1"}, startup_timeout=10)
    with pytest.raises(HarnessError, match="did not start"):
        cl.start()
    assert _namespaces() == before


def test_refuses_names_it_did_not_create() -> None:
    with pytest.raises(HarnessError, match="refusing namespace"):
        HostNetwork.attach(0, 6, ["netns-of-someone-else"])
    with pytest.raises(HarnessError, match="refusing namespace"):
        HostNetwork.attach(1, 6, ["rse-2-n0"])
    # A block whose name is taken by something we did not make: skipped, never touched.
    foreign = None
    for block in range(16):
        name = f"rse-{block}-sw"
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
        if made.returncode == 0:
            foreign = (block, name)
            break
    assert foreign is not None, "no free block for the test"
    try:
        with pytest.raises(HarnessError, match="mark"):
            HostNetwork.attach(foreign[0], 6, [foreign[1]])
        net = HostNetwork.create(2)
        try:
            assert net.block != foreign[0]
        finally:
            net.destroy()
        assert foreign[1] in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", foreign[1]], check=False)


def test_without_root_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (netns_unavailable() or "")
    with pytest.raises(NetnsUnavailable, match="root"):
        LocalCluster(primaries=1, replicas_per_primary=0, netns=True).start()


def test_cli_cluster_up_netns(tmp_path: Path) -> None:
    before = _namespaces()
    state = tmp_path / "state.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "cluster", *args, "--state-file", str(state)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    up = cli("up", "--netns")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "redis://10.213.0." in up.stdout and "network namespaces" in up.stdout
        recorded = json.loads(state.read_text())["netns"]
        assert len(recorded["namespaces"]) == 7  # the switch and six nodes
        status = cli("status")
        assert status.returncode == 0 and "cluster_state: ok" in status.stdout, status.stdout
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert _namespaces() == before


# ---------------------------------------------------------------------------- drills


async def _drill(
    scenario: str, *, wait_replicas: int, sessions: int = 5000, rate: float = 1500
) -> DrillReport:
    with LocalCluster(**cluster_options(scenario)) as cl:
        report = await run_drill(
            scenario, cl, sessions=sessions, rate=rate, wait_replicas=wait_replicas, settle=1.5
        )
    print(report.summary())
    assert not [n for n in report.fault_notes if "failed" in n], report.fault_notes
    assert report.calls > rate * 3
    assert report.healed_s is not None
    # Fail closed AND bounded: no call hangs on a silent network past its deadline
    # (command_timeout 0.5 s, plus 2 x wait_timeout 0.5 s for a durable write), + slack.
    assert report.slowest_failure_s <= 0.5 + 2 * 0.5 + 0.5, report.summary()
    return report


async def test_minority_primary_durable_writes_lose_nothing() -> None:
    report = await _drill("minority-primary", wait_replicas=1)
    # A write the isolated primary could not replicate is never reported done.
    assert report.lost_creates == 0, report.summary()
    assert report.resurrected == 0, report.summary()
    assert report.failed_other == 0, report.summary()
    assert report.errors_by_type.get("ReplicationIncomplete", 0) > 0, report.summary()
    assert any("now a replica" in n for n in report.fault_notes), report.fault_notes


async def test_minority_primary_without_wait_only_its_shard_fails() -> None:
    report = await _drill("minority-primary", wait_replicas=0)
    assert report.failed_other == 0, report.summary()
    assert report.promoted_s is not None
    # It took writes until it noticed: counted (the table in bench.md), not asserted zero.
    assert report.acked_creates > 0


async def test_client_cut_fails_one_shard_and_recovers_on_heal() -> None:
    report = await _drill("client-cut", wait_replicas=0)
    assert report.failed_other == 0, report.summary()
    assert report.failed_victim > 0
    assert report.lost_creates == 0 and report.resurrected == 0
    assert report.healed_s is not None and report.recovered_s is not None
    # Back once the breaker's next probe connects: a probe under way when the network
    # healed may still time out (its SYN was dropped: connect_timeout, 1 s), then the
    # breaker waits at most its cap (+20 % jitter) before the next one.
    bound = CONNECT_TIMEOUT_S + BREAKER_CAP_S * 1.2 + 0.2
    assert report.recovered_s <= report.healed_s + bound, report.summary()


async def test_partition_heal_converges_and_loses_nothing_durable() -> None:
    report = await _drill("partition-heal", wait_replicas=1)
    assert report.lost_creates == 0, report.summary()
    assert report.resurrected == 0, report.summary()
    assert report.recovered_s is not None and report.promoted_s is not None


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["minority-primary", "client-cut", "partition-heal"])
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_partition_drill_full_scale(scenario: str, wait_replicas: int) -> None:
    report = await _drill(scenario, wait_replicas=wait_replicas, sessions=50_000, rate=5000)
    if scenario != "partition-heal":
        assert report.failed_other == 0, report.summary()
    if wait_replicas:
        assert report.lost_creates == 0 and report.resurrected == 0, report.summary()


def test_bench_network_measures_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "net.json"
    small = ["--sessions", "500", "--seconds", "0.5", "--rounds", "1", "--rate", "500"]
    small += ["--concurrency", "8", "--json", str(out), "--markdown"]
    done = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--network", *small],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| validate, 1 in flight |" in done.stdout
    result = json.loads(out.read_text())
    assert result["netns_url"].startswith("redis://10.213.0.")
    assert result["loopback_url"].startswith("redis://127.0.0.1:")
    for label in ("loopback", "netns"):
        assert [r["name"] for r in result[label]] == [
            "redis-benchmark PING, 1 connection",
            "validate, 1 in flight",
            "validate, 8 in flight",
            "validate @ 500/s",
        ]
        assert all(r["ops_per_s"] and r["ops_per_s"] > 0 for r in result[label])
