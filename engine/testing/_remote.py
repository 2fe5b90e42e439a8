"""A cluster the drills did not start: driven by Redis commands only, never by signals.

``python -m engine drill SCENARIO --url URL --i-own-this-cluster`` uses it for the
scenarios that need no process control (failovers on a replica's request, SCRIPT FLUSH,
DEBUG SLEEP). It offers the subset of ``LocalCluster`` those scenarios use.
"""

from __future__ import annotations

import time
from typing import Any, Literal
from urllib.parse import urlparse

import redis

from ._cluster import ClusterNode
from ._constants import TOTAL_SLOTS, HarnessError
from ._keyspace import delete_prefix
from ._topology import _parse_cluster_nodes

__all__ = ["RemoteCluster"]


class RemoteCluster:
    """Control-plane access to an existing cluster, by command, from one seed URL."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        parsed = urlparse(url)
        self.url = url
        self._seed = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self._password = parsed.password
        self._username = parsed.username
        self._timeout = timeout
        self._last: list[ClusterNode] = []  # last view, asked first if the seed is gone

    def client(self, host: str, port: int) -> redis.Redis:
        return redis.Redis(
            host=host,
            port=port,
            username=self._username,
            password=self._password,
            socket_timeout=self._timeout,
            decode_responses=True,
        )

    def _nodes_text(self) -> str:
        errors = []
        for host, port in [self._seed, *[(n.host, n.port) for n in self._last]]:
            try:
                with self.client(host, port) as c:
                    return str(c.execute_command("CLUSTER", "NODES"))
            except redis.RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
        raise HarnessError("no node answered CLUSTER NODES: " + "; ".join(errors))

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node the cluster knows, with its role and slots as the seed sees them."""
        out = [
            ClusterNode(
                host=line.host or self._seed[0],
                port=line.port,
                pid=None,
                role=line.role,
                node_id=line.node_id,
                alive=not line.failing,
                master_id=line.master_id,
                slots=line.slots,
            )
            for line in _parse_cluster_nodes(self._nodes_text())
        ]
        self._last = out
        return out

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def primaries(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "primary" and n.alive and n.slots]

    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "replica" and n.alive]

    def node(self, port: int) -> ClusterNode:
        for n in self.nodes:
            if n.port == port:
                return n
        raise HarnessError(f"no node on port {port}")

    def run(self, port: int, *args: Any) -> Any:
        node = self.node(port)
        with self.client(node.host, node.port) as c:
            return c.execute_command(*args)

    def failover(self, replica_port: int, mode: Literal["force", "takeover"] | None = None) -> None:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica; waits for its promotion."""
        self.run(replica_port, "CLUSTER", "FAILOVER", *([mode.upper()] if mode else []))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.node(replica_port).role == "primary":
                return
            time.sleep(0.05)
        raise HarnessError(f"replica {replica_port} was not promoted within 15 s")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every slot served by a live primary, every live node ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while time.monotonic() < deadline:
            nodes = self.nodes
            covered = sum(b - a + 1 for n in nodes if n.alive for a, b in n.slots)
            states = []
            for n in nodes:
                if n.alive:
                    with self.client(n.host, n.port) as c:
                        info = str(c.execute_command("CLUSTER", "INFO"))
                    states.append("cluster_state:ok" in info)
            if covered == TOTAL_SLOTS and all(states):
                return
            problem = f"{covered} slots covered, {states.count(False)} node(s) not ok"
            time.sleep(0.1)
        raise HarnessError(f"cluster not healthy after {timeout:.0f}s: {problem}")

    def delete_prefix(self, prefix: str) -> int:
        """UNLINK every key under ``prefix`` on every primary (the drill's own keys)."""
        return delete_prefix(self.url, prefix)

    def _refuse(self, what: str) -> None:
        raise HarnessError(f"{what} needs process control: run the drill on a LocalCluster")

    def kill(self, port: int) -> None:
        self._refuse("kill")

    def pause(self, port: int) -> None:
        self._refuse("pause")

    def resume(self, port: int) -> None:
        self._refuse("resume")

    def restart(self, port: int) -> None:
        self._refuse("restart")
