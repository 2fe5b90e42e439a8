"""Tests of the LocalCluster harness against real redis-server processes.

Tests that kill, pause or fail over nodes each start their own cluster; read-only checks share
one module-scoped 3+3 cluster to keep the file fast.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from engine.testing import (
    ClusterNode,
    HarnessError,
    LocalCluster,
    RedisServerNotFound,
)

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[1]


def _running(pid: int | None) -> bool:
    """True if the process exists and is not a zombie (a zombie is dead for our purposes)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _by_port(cl: LocalCluster) -> dict[int, ClusterNode]:
    return {n.port: n for n in cl.nodes}


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[LocalCluster, float]]:
    """One 3 primaries + 3 replicas cluster for non-destructive checks, with its startup time."""
    started = time.monotonic()
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        yield cl, time.monotonic() - started


# --------------------------------------------------------------------- shared, read-only


def test_three_by_three_comes_up_healthy_fast(shared: tuple[LocalCluster, float]) -> None:
    cl, startup = shared
    assert startup < 15.0, f"startup took {startup:.1f}s"
    cl.wait_healthy(timeout=5.0)

    nodes = cl.nodes
    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(primaries) == 3
    assert len(replicas) == 3
    assert all(n.alive and not n.paused and n.host == "127.0.0.1" for n in nodes)
    assert len({n.node_id for n in nodes}) == 6
    assert all(n.node_id and len(n.node_id) == 40 for n in nodes)
    assert len({n.port for n in nodes}) == 6
    # Each replica follows a different primary.
    assert sorted(r.master_id or "" for r in replicas) == sorted(p.node_id or "" for p in primaries)
    # The slot ranges split 0..16383 without gaps or overlap.
    ranges = sorted(r for p in primaries for r in p.slots)
    assert ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))

    assert cl.url == f"redis://127.0.0.1:{nodes[0].port}"
    assert [n.port for n in cl.primaries()] == [n.port for n in primaries]
    assert [n.port for n in cl.replicas()] == [n.port for n in replicas]
    assert cl.run(nodes[0].port, "PING") is True
    info = cl.run(nodes[0].port, "CLUSTER", "INFO")
    assert "cluster_state:ok" in info


def test_primary_for_key_serves_the_key(shared: tuple[LocalCluster, float]) -> None:
    cl, _ = shared
    owners = set()
    for i in range(30):
        key = f"session:{i}"
        node = cl.primary_for_key(key)
        assert node.role == "primary"
        owners.add(node.port)
        client = cl.client(node.port)
        assert client.set(key, f"v{i}") is True
        assert client.get(key) == f"v{i}"
        client.close()
    assert len(owners) == 3  # 30 keys spread over all primaries

    # Hash tags pin keys to one slot, hence one primary.
    assert cl.primary_for_key("{user:1}:a").port == cl.primary_for_key(b"{user:1}:b").port

    # Any other node redirects instead of serving it.
    key = "session:0"
    owner = cl.primary_for_key(key).port
    other = next(n.port for n in cl.primaries() if n.port != owner)
    with pytest.raises(redis.exceptions.MovedError, match=f":{owner}$"):
        cl.run(other, "GET", key)


def test_unknown_port_and_bad_failover_target(shared: tuple[LocalCluster, float]) -> None:
    cl, _ = shared
    with pytest.raises(HarnessError):
        cl.kill(1)
    with pytest.raises(HarnessError, match="not a replica"):
        cl.failover(cl.primaries()[0].port)


# --------------------------------------------------------------------- destructive, own clusters


def test_kill_primary_promotes_replica_and_restart_rejoins() -> None:
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        victim = cl.primary_for_key("session:kill")
        replica = next(r for r in cl.replicas() if r.master_id == victim.node_id)
        cl.run(victim.port, "SET", "session:kill", "alive")
        assert cl.run(victim.port, "WAIT", 1, 2000) == 1  # replicated before the crash

        cl.kill(victim.port)
        assert not _running(victim.pid)
        assert not _by_port(cl)[victim.port].alive
        _wait_until(lambda: _by_port(cl)[replica.port].role == "primary", 15.0, "promotion")
        cl.wait_healthy(timeout=15.0)  # healthy without the dead node

        # Every live node agrees on the promotion, and the session survived it.
        for node in cl.nodes:
            if node.alive:
                view = cl.run(node.port, "CLUSTER", "NODES")
                line = next(ln for ln in view.splitlines() if ln.startswith(replica.node_id or "?"))
                assert "master" in line.split()[2]
        assert cl.primary_for_key("session:kill").port == replica.port
        assert cl.run(replica.port, "GET", "session:kill") == "alive"

        cl.restart(victim.port)
        cl.wait_healthy(timeout=20.0)
        back = _by_port(cl)[victim.port]
        assert back.alive
        assert back.pid != victim.pid
        assert back.node_id == victim.node_id  # same nodes.conf, same identity
        assert back.role == "replica"
        assert back.master_id == replica.node_id


def test_pause_and_resume() -> None:
    with LocalCluster(primaries=1, replicas_per_primary=0) as cl:
        port = cl.ports[0]
        cl.pause(port)
        assert _by_port(cl)[port].paused
        assert _by_port(cl)[port].alive
        assert cl.primaries() == []  # paused nodes are not counted as live
        client = cl.client(port, socket_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2.0
        client.close()

        cl.resume(port)
        assert not _by_port(cl)[port].paused
        assert cl.client(port, socket_timeout=0.5).ping() is True
        cl.wait_healthy(timeout=10.0)


def test_failover_default_force_and_takeover() -> None:
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        first = cl.primaries()[0]
        second = next(r for r in cl.replicas() if r.master_id == first.node_id)
        cl.run(first.port, "SET", "{f}k", "1")

        # Ping-pong the same shard: each failover promotes the current replica.
        current_primary, current_replica = first, second
        for mode in (None, "force", "takeover"):
            cl.failover(current_replica.port, mode)
            nodes = _by_port(cl)
            assert nodes[current_replica.port].role == "primary", mode
            cl.wait_healthy(timeout=20.0)
            nodes = _by_port(cl)
            assert nodes[current_replica.port].role == "primary", mode
            assert nodes[current_primary.port].role == "replica", mode
            assert nodes[current_primary.port].master_id == current_replica.node_id, mode
            current_primary, current_replica = (
                nodes[current_replica.port],
                nodes[current_primary.port],
            )
        assert cl.run(current_primary.port, "GET", "{f}k") == "1"


def test_single_node_cluster_and_cleanup_on_normal_exit() -> None:
    with LocalCluster(primaries=1, replicas_per_primary=0) as cl:
        (node,) = cl.nodes
        assert node.role == "primary" and node.node_id is not None
        assert node.slots == ((0, 16383),)
        assert cl.primary_for_key("anything").port == node.port
        assert cl.run(node.port, "SET", "k", "v") is True
        assert cl.run(node.port, "GET", "k") == "v"
        pids, base = [n.pid for n in cl.nodes], cl.base_dir
        assert base is not None and base.is_dir()
    assert not any(_running(p) for p in pids)
    assert not base.exists()
    cl.stop()  # idempotent


def test_standalone_mode() -> None:
    with LocalCluster(cluster_mode=False) as cl:
        (node,) = cl.nodes
        assert node.role == "primary" and node.node_id is None
        cl.wait_healthy(timeout=5.0)
        assert cl.run(node.port, "SET", "k", "v") is True
        assert cl.client(node.port).get("k") == "v"
        assert cl.run(node.port, "INFO", "cluster")["cluster_enabled"] == 0
        assert cl.primary_for_key("k").port == node.port
        with pytest.raises(HarnessError):
            cl.failover(node.port)
        pids, base = [node.pid], cl.base_dir
    assert not any(_running(p) for p in pids)
    assert base is not None and not base.exists()


def test_cleanup_when_body_raises_with_a_paused_node() -> None:
    cl = LocalCluster(primaries=1, replicas_per_primary=1)
    with pytest.raises(ZeroDivisionError), cl:
        cl.pause(cl.replicas()[0].port)
        pids = [n.pid for n in cl.nodes]
        assert all(_running(p) for p in pids)
        _ = 1 / 0
    assert not any(_running(p) for p in pids)
    assert cl.base_dir is not None and not cl.base_dir.exists()


def test_missing_redis_server() -> None:
    with pytest.raises(RedisServerNotFound, match="apt-get install redis-server redis-tools"):
        LocalCluster(redis_server="/nonexistent")
    assert issubclass(RedisServerNotFound, HarnessError)


def test_cli_up_status_down(tmp_path: Path) -> None:
    state_file = tmp_path / "state" / "cluster.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "cluster", *args, "--state-file", str(state_file)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    up = cli("up", "--primaries", "1", "--replicas", "1")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        pids, base_dir = state["pids"], Path(state["base_dir"])
        assert up.stdout.splitlines()[0] == state["url"]
        assert len(pids) == 2 and len(state["ports"]) == 2
        # The nodes outlive the `up` process.
        assert all(_running(p) for p in pids)
        assert base_dir.is_dir()

        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "cluster_state: ok" in status.stdout
        assert "replica" in status.stdout and "0-16383" in status.stdout

        again = cli("up")
        assert again.returncode == 1
        assert "still running" in again.stderr

        down = cli("down")
        assert down.returncode == 0, down.stderr
        assert not any(_running(p) for p in pids)
        assert not base_dir.exists()
        assert not state_file.exists()
        assert cli("down").returncode == 0  # nothing left to stop
        assert cli("status").returncode == 1
    finally:
        if state_file.exists():  # a failed assertion must not leak servers
            LocalCluster.from_state_file(state_file).stop()
