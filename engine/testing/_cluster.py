"""The cluster object: `LocalCluster` and the snapshots it hands out.

`LocalCluster` starts real ``redis-server`` processes on free loopback ports, joins them into a
cluster with direct ``CLUSTER`` commands (no ``redis-cli --cluster create`` and its sleeps), and
gives tests the knobs a failover drill needs: kill, pause, restart and manual failover.

Example:
    >>> from engine.testing import LocalCluster
    >>> with LocalCluster(primaries=3, replicas_per_primary=1) as cl:  # doctest: +SKIP
    ...     node = cl.primary_for_key("session:abc")
    ...     cl.run(node.port, "SET", "session:abc", "1")
    ...     cl.kill(node.port)
    ...     cl.wait_healthy()

Every node gets its own directory ``<base_dir>/<port>/`` holding a generated ``redis.conf``
(which ``include``s the shared ``engine/redis-node.conf``), ``nodes.conf`` and ``redis.log``.
Process control, ports and the parsing of ``CLUSTER NODES`` live in their own modules.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from ._constants import (
    _BIND_ATTEMPTS,
    _CONTROL_TIMEOUT,
    _STATE_VERSION,
    _STOP_GRACE,
    BUS_PORT_OFFSET,
    DEFAULT_STATE_FILE,
    NODE_CONF,
    TOTAL_SLOTS,
    FailoverMode,
    HarnessError,
    RedisServerNotFound,
    Role,
)
from ._netns import HostNetwork, Partitions
from ._ports import _pick_ports
from ._processes import (
    _bind_failed,
    _find_redis_server,
    _is_our_redis,
    _log_tail,
    _on_long_lived_thread,
    _pdeathsig_preexec,
    _quote,
    _wait_proc_state,
)
from ._tls import CertPair, TlsFiles, make_test_pki
from ._topology import _myself, _NodeLine, _parse_cluster_nodes, _parse_info

__all__ = [
    "BUS_PORT_OFFSET",
    "DEFAULT_STATE_FILE",
    "NODE_CONF",
    "TOTAL_SLOTS",
    "ClusterNode",
    "FailoverMode",
    "HarnessError",
    "LocalCluster",
    "RedisServerNotFound",
    "Role",
]


@dataclass(frozen=True)
class ClusterNode:
    """A snapshot of one harness node.

    Attributes:
        host: Address the node listens on.
        port: Client port (the cluster bus is ``port + 10000``).
        pid: Process id of the ``redis-server`` (``None`` if it never started).
        role: ``"primary"`` or ``"replica"``, as the cluster sees it at snapshot time.
        node_id: Cluster node id; ``None`` for a non-cluster server.
        alive: The process exists (a paused node is still alive).
        paused: The process was stopped with `LocalCluster.pause`.
        master_id: For a replica, the node id of its primary.
        slots: Inclusive slot ranges this node serves (primaries only).
        tls: The node speaks only TLS (``port`` is its ``tls-port``).
    """

    host: str
    port: int
    pid: int | None
    role: Role
    node_id: str | None
    alive: bool
    paused: bool = False
    master_id: str | None = None
    slots: tuple[tuple[int, int], ...] = ()
    tls: bool = False

    @property
    def url(self) -> str:
        """``redis://host:port`` of this node (``rediss://`` for a TLS node)."""
        return _url(self.host, self.port, tls=self.tls)


class _Node:
    """Mutable bookkeeping for one process the harness manages."""

    def __init__(self, port: int, directory: Path, role: Role) -> None:
        self.port = port
        self.dir = directory
        self.role = role  # last known role; the live one comes from the cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.node_id: str | None = None
        self.paused = False

    @property
    def conf(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"


class LocalCluster:
    """A Redis Cluster (or one plain server) made of local ``redis-server`` processes.

    Use it as a context manager, or call `start` and `stop`. While running, `stop` is also
    registered with `atexit`, and by default every node gets ``PR_SET_PDEATHSIG`` so it dies
    with the Python process even on ``SIGKILL``.

    Node order is fixed at creation: the first ``primaries`` nodes are the primaries, then the
    replicas of primary 0, of primary 1, and so on. Roles change with failovers, so read them
    from `nodes`, `primaries` or `replicas`, never from the order.

    Args:
        primaries: Number of primaries; the 16384 slots are split evenly between them.
        replicas_per_primary: Replicas attached to each primary.
        cluster_mode: ``False`` starts a single plain (non-cluster) server and ignores
            ``primaries`` and ``replicas_per_primary``.
        host: Address to bind and announce.
        node_timeout_ms: ``cluster-node-timeout``; failure detection takes about this long.
        persistence: Turn on AOF (``appendonly yes``); off by default, as in production.
        extra_config: More directives, written verbatim after everything else (so they win),
            e.g. ``{"cluster-require-full-coverage": "no"}``.
        redis_server: Path of the ``redis-server`` executable; default: found on ``PATH``.
        base_dir: Directory for the node directories. Default: a fresh temporary directory,
            which `stop` removes (a directory you pass is left in place).
        startup_timeout: Seconds `start` may take before it gives up.
        die_with_parent: Kill the nodes when this process dies (Linux only).
        tls: Speak only TLS, on every link: clients, cluster bus and replication
            (``tls-port``, ``tls-cluster yes``, ``tls-replication yes``, ``port 0``), with a
            test CA and node certificate made by openssl in ``<base_dir>/tls``. `url` is then
            ``rediss://`` and `ca_file` the CA to trust. Clients may present a certificate
            (``tls-auth-clients optional``); ``extra_config`` can make it ``yes``.
        netns: Run every node in its own network namespace, with its own address in
            ``10.213.0.0/24`` on a bridge (separate hosts on a real network path), and make
            `partitions` available. Linux and root only (`NetnsUnavailable` elsewhere);
            ``host`` is then unused. See ``engine/testing/_netns.py``.

    Raises:
        RedisServerNotFound: ``redis-server`` is missing or not executable.
        ValueError: Invalid sizes or configuration.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        cluster_mode: bool = True,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 2000,
        persistence: bool = False,
        extra_config: dict[str, str] | None = None,
        redis_server: str | None = None,
        base_dir: str | None = None,
        startup_timeout: float = 30.0,
        die_with_parent: bool = True,
        tls: bool = False,
        netns: bool = False,
    ) -> None:
        self._configure(
            primaries=primaries,
            replicas_per_primary=replicas_per_primary,
            cluster_mode=cluster_mode,
            host=host,
            node_timeout_ms=node_timeout_ms,
            persistence=persistence,
            extra_config=extra_config,
            base_dir=base_dir,
            startup_timeout=startup_timeout,
            die_with_parent=die_with_parent,
            tls=tls,
            netns=netns,
        )
        self._redis_server = _find_redis_server(redis_server)

    def _configure(
        self,
        *,
        primaries: int,
        replicas_per_primary: int,
        cluster_mode: bool,
        host: str,
        node_timeout_ms: int,
        persistence: bool,
        extra_config: dict[str, str] | None,
        base_dir: str | None,
        startup_timeout: float,
        die_with_parent: bool,
        tls: bool = False,
        netns: bool = False,
    ) -> None:
        if cluster_mode and primaries < 1:
            raise ValueError("primaries must be >= 1")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")
        if node_timeout_ms < 1:
            raise ValueError("node_timeout_ms must be positive")
        if tls and netns:
            # The test certificate names one host; namespace nodes each have their own.
            raise ValueError("tls and netns cannot be combined (yet)")
        for key, value in (extra_config or {}).items():
            # One directive per line: anything that could smuggle in a second line is refused.
            if not key or any(c.isspace() for c in key) or "\n" in value or "\r" in value:
                raise ValueError(f"invalid extra_config entry {key!r}: {value!r}")
        self.cluster_mode = cluster_mode
        self.primaries_count = primaries if cluster_mode else 1
        self.replicas_per_primary = replicas_per_primary if cluster_mode else 0
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.persistence = persistence
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.tls = tls
        self._tls: TlsFiles | None = None  # made in start(), under the base directory
        self._requested_base_dir = base_dir
        self._base_dir: Path | None = Path(base_dir).resolve() if base_dir else None
        self._owns_base_dir = False
        self._attached = False  # re-created from a state file: the processes are not our children
        self._nodes: list[_Node] = []
        self._clients: list[redis.Redis] = []
        self._started = False
        self._stopped = False
        self.netns = netns
        self._net: HostNetwork | None = None
        self._partitions: Partitions | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Start the processes, form the cluster and wait until it is healthy.

        Returns:
            ``self``, for chaining.

        Raises:
            HarnessError: Startup failed or took longer than ``startup_timeout``; everything
                started so far has been stopped again.
        """
        if self._started:
            raise HarnessError("this LocalCluster was already started; create a new one")
        self._started = True
        deadline = time.monotonic() + self.startup_timeout
        # Registered before the first process exists, so a crash half-way still cleans up.
        atexit.register(self.stop)
        try:
            if self._base_dir is None:
                self._base_dir = Path(tempfile.mkdtemp(prefix="engine-cluster-")).resolve()
                self._owns_base_dir = True
            else:
                self._base_dir.mkdir(parents=True, exist_ok=True)
            if self.netns:
                count = self.primaries_count * (1 + self.replicas_per_primary)
                self._net = HostNetwork.create(count)
            if self.tls:
                self._tls = make_test_pki(self._base_dir / "tls", host=self.host)
            self._launch_all(deadline)
            if self.cluster_mode:
                self._form_cluster(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove the base directory if the harness created it.

        Paused nodes are resumed first so they can act on ``SIGTERM``; nodes still running after
        about three seconds are killed. Safe to call more than once, and never raises for
        processes that are already gone.
        """
        atexit.unregister(self.stop)
        if self._stopped:
            return
        self._stopped = True
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        running = [n for n in self._nodes if self._alive(n)]
        for node in running:
            # A stopped process only acts on SIGTERM once continued. Sent to every node, since a
            # node re-attached from a state file may have been paused by another process.
            self._signal(node, signal.SIGCONT)
            node.paused = False
        for node in running:
            self._signal(node, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for node in running:
            if not self._wait_exit(node, max(0.0, deadline - time.monotonic())):
                self._signal(node, signal.SIGKILL)
                self._wait_exit(node, 5.0)
        if self._net is not None:
            self._net.destroy()  # after the processes: nothing may still run inside
        self._remove_dirs()

    def detach(self) -> None:
        """Stop managing the nodes: they keep running after this Python process exits.

        Used by ``python -m engine cluster up``. Only meaningful for a cluster started with
        ``die_with_parent=False``; stop it later via `from_state_file` and `stop`.
        """
        atexit.unregister(self.stop)
        for node in self._nodes:
            # Forget the Popen objects: their pids are re-checked before any later signal.
            node.proc = None
        self._attached = True
        self._stopped = True

    def _remove_dirs(self) -> None:
        base = self._base_dir
        if base is None or not self._owns_base_dir:
            return
        if not self._attached:
            shutil.rmtree(base, ignore_errors=True)
            return
        # The path came from a state file: delete only the node directories it lists, then the
        # base directory if nothing else is in it.
        for node in self._nodes:
            if node.dir.parent == base:
                shutil.rmtree(node.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """``redis://host:port`` of the first primary (a fine seed for cluster clients);
        ``rediss://`` for a TLS cluster."""
        if not self._nodes:
            raise HarnessError("cluster is not started")
        return _url(self._host_of(self._nodes[0].port), self._nodes[0].port, tls=self.tls)

    @property
    def ca_file(self) -> Path | None:
        """The CA a client must trust to reach a TLS cluster (``None`` without TLS)."""
        return self._tls.ca_file if self._tls else None

    @property
    def tls_files(self) -> TlsFiles | None:
        """The test CA and node certificate of a TLS cluster (``None`` without TLS)."""
        return self._tls

    @property
    def ports(self) -> list[int]:
        """Client ports of all nodes, in creation order (cheap: no round trip)."""
        return [n.port for n in self._nodes]

    @property
    def base_dir(self) -> Path | None:
        """The directory holding one sub-directory per node."""
        return self._base_dir

    @property
    def nodes(self) -> list[ClusterNode]:
        """Snapshots of all nodes, in creation order, with roles read live from the cluster.

        A running node reports its own role; for a dead or paused node the view of another
        live node is used, falling back to the last role the harness saw.
        """
        shared: dict[str, _NodeLine] | None = None
        result: list[ClusterNode] = []
        for node in self._nodes:
            alive = self._alive(node)
            line: _NodeLine | None = None
            if self.cluster_mode:
                if alive and not node.paused:
                    line = _myself(self._cluster_nodes_or_none(node.port))
                if line is None and node.node_id is not None:
                    if shared is None:
                        # Nobody may answer (e.g. the only node is paused): keep last role.
                        with contextlib.suppress(HarnessError):
                            shared = self._any_view()
                        shared = shared or {}
                    line = shared.get(node.node_id)
            if line is not None:
                node.role = line.role
            result.append(
                ClusterNode(
                    host=self._host_of(node.port),
                    port=node.port,
                    pid=node.pid,
                    role=node.role,
                    node_id=node.node_id,
                    alive=alive,
                    paused=node.paused,
                    master_id=line.master_id if line else None,
                    slots=line.slots if line else (),
                    tls=self.tls,
                )
            )
        return result

    def primaries(self) -> list[ClusterNode]:
        """Running, un-paused nodes that are currently primaries."""
        return [n for n in self.nodes if n.alive and not n.paused and n.role == "primary"]

    def replicas(self) -> list[ClusterNode]:
        """Running, un-paused nodes that are currently replicas."""
        return [n for n in self.nodes if n.alive and not n.paused and n.role == "replica"]

    def node(self, port: int) -> ClusterNode:
        """Snapshot of the node listening on ``port``.

        Raises:
            HarnessError: No harness node uses that port.
        """
        self._node(port)
        return next(n for n in self.nodes if n.port == port)

    def primary_for_key(self, key: str | bytes) -> ClusterNode:
        """The primary serving ``key``'s hash slot right now (hash tags honoured).

        In non-cluster mode this is the single server.

        Raises:
            HarnessError: No live node could tell, or the slot is unassigned.
        """
        raw = key.encode() if isinstance(key, str) else key
        if not self.cluster_mode:
            return self.nodes[0]
        slot = key_slot(raw)
        view = self._any_view()
        for line in view.values():
            if "slave" in line.flags:
                continue
            if any(lo <= slot <= hi for lo, hi in line.slots):
                for snap in self.nodes:
                    if snap.node_id == line.node_id:
                        return snap
                raise HarnessError(f"slot {slot} is served by unknown node {line.node_id}")
        raise HarnessError(f"no primary serves slot {slot} (key {raw!r})")

    # ------------------------------------------------------------------ convenience clients

    def client(
        self, port: int, *, socket_timeout: float = _CONTROL_TIMEOUT, decode_responses: bool = True
    ) -> redis.Redis:
        """A plain (non-cluster) sync client for one node, without retries.

        The client is closed by `stop`; closing it earlier is fine too.

        Args:
            port: The node's port.
            socket_timeout: Connect and read timeout in seconds.
            decode_responses: Return ``str`` instead of ``bytes``.
        """
        self._node(port)
        host = self._host_of(port)
        client = _client(
            host, port, socket_timeout, decode_responses=decode_responses, tls=self._tls
        )
        self._clients.append(client)
        return client

    def run(self, port: int, *args: Any) -> Any:
        """Send one command to one node and return redis-py's parsed reply.

        Example: ``cl.run(port, "CLUSTER", "INFO")``.
        """
        self._node(port)
        with _client(self._host_of(port), port, _CONTROL_TIMEOUT, tls=self._tls) as client:
            return client.execute_command(*args)

    # ------------------------------------------------------------------ fault injection

    @property
    def partitions(self) -> Partitions:
        """Network partitions between nodes and the client (``netns=True`` clusters only):
        ``isolate(port)``, ``split(group, group, ...)``, ``cut_client(port)``, ``heal()``.

        Raises:
            HarnessError: The cluster does not run in network namespaces.
        """
        if self._net is None:
            raise HarnessError("partitions need a cluster started with netns=True")
        if self._partitions is None:
            self._partitions = Partitions(self._net, self._index_of)
        return self._partitions

    @property
    def client_address(self) -> str | None:
        """This process's address on the nodes' network (``netns=True``), else ``None``."""
        return self._net.client_address if self._net is not None else None

    def kill(self, port: int) -> None:
        """``SIGKILL`` the node on ``port`` and wait until the process is gone."""
        node = self._node(port)
        if self._alive(node):
            self._signal(node, signal.SIGKILL)
            if not self._wait_exit(node, 10.0):
                raise HarnessError(f"node {port} (pid {node.pid}) survived SIGKILL")
        node.paused = False

    def pause(self, port: int) -> None:
        """Freeze the node with ``SIGSTOP``: it keeps its sockets but answers nothing."""
        node = self._running_node(port)
        self._signal(node, signal.SIGSTOP)
        node.paused = True
        _wait_proc_state(node.pid, stopped=True)

    def resume(self, port: int) -> None:
        """Undo `pause` with ``SIGCONT``."""
        node = self._running_node(port)
        self._signal(node, signal.SIGCONT)
        node.paused = False
        _wait_proc_state(node.pid, stopped=False)

    def restart(self, port: int) -> None:
        """Start the node again from its own directory, so it keeps its node id.

        A node that is still running is killed first (a crash-restart). Returns once the node
        answers ``PING``; call `wait_healthy` to wait until it has rejoined the cluster.

        Raises:
            HarnessError: The node did not come back within ``startup_timeout``.
        """
        node = self._node(port)
        self.kill(port)
        self._spawn(node)
        deadline = time.monotonic() + self.startup_timeout
        failed = self._await_ping([node], deadline)
        if failed:
            raise HarnessError(f"node {port} did not restart: {_log_tail(node.log)}")

    def failover(
        self, replica_port: int, mode: FailoverMode | None = None, *, timeout: float = 15.0
    ) -> None:
        """Run ``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica and wait for its promotion.

        Args:
            replica_port: Port of a running replica.
            mode: ``None`` (coordinated with the primary), ``"force"`` (no primary handshake)
                or ``"takeover"`` (no election either).
            timeout: Seconds to wait until the replica reports itself primary.

        Raises:
            HarnessError: Not a cluster, not a replica, or no promotion within ``timeout``.
        """
        if not self.cluster_mode:
            raise HarnessError("failover needs cluster_mode=True")
        if mode not in (None, "force", "takeover"):
            raise ValueError(f"mode must be None, 'force' or 'takeover', not {mode!r}")
        node = self._running_node(replica_port)
        own = _myself(self._cluster_nodes_or_none(replica_port))
        if own is None or own.role != "replica":
            raise HarnessError(f"node {replica_port} is not a replica")
        args = ["CLUSTER", "FAILOVER"] + ([mode.upper()] if mode else [])
        self.run(replica_port, *args)
        deadline = time.monotonic() + timeout
        while True:
            own = _myself(self._cluster_nodes_or_none(replica_port))
            if own is not None and own.role == "primary":
                node.role = "primary"
                return
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"replica {replica_port} not promoted {timeout:.1f}s after "
                    f"{' '.join(args)}: {_log_tail(node.log)}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ health

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until the cluster is fully healthy as seen from every live node.

        Healthy means, on every running, un-paused node: ``cluster_state:ok``; all 16384
        slots assigned, each to a live primary; the same slot map and the same role/primary
        for every live node; no live node flagged as failing; and ``master_link_status:up``
        on every replica. In non-cluster mode: the server answers ``PING``.

        Raises:
            HarnessError: Not healthy after ``timeout`` seconds; the message lists what was
                still wrong.
        """
        deadline = time.monotonic() + timeout
        while True:
            problems = self._health_problems()
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"cluster not healthy after {timeout:.1f}s: " + "; ".join(problems)
                )
            time.sleep(0.05)

    def _health_problems(self) -> list[str]:
        live = [n for n in self._nodes if self._alive(n) and not n.paused]
        if not live:
            return ["no running, un-paused node"]
        if not self.cluster_mode:
            first = live[0].port
            return (
                [] if _ping(self._host_of(first), first, tls=self._tls) else [f"{first}: no PONG"]
            )
        live_ids = {n.node_id for n in live}
        problems: list[str] = []
        reference: tuple[Any, ...] | None = None
        for node in live:
            try:
                host = self._host_of(node.port)
                with _client(host, node.port, _CONTROL_TIMEOUT, tls=self._tls) as client:
                    info = _parse_info(client.execute_command("CLUSTER", "INFO"))
                    lines = _parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
                    repl = client.info("replication")
            except (redis.RedisError, OSError) as exc:
                problems.append(f"{node.port}: {exc!r}")
                continue
            where = f"{node.port}"
            if info.get("cluster_state") != "ok":
                problems.append(f"{where}: cluster_state:{info.get('cluster_state')}")
            view = {line.node_id: line for line in lines}
            missing = live_ids - view.keys()
            if missing:
                problems.append(f"{where}: does not know {sorted(str(m) for m in missing)}")
            for line in lines:
                if line.node_id in live_ids and line.failing:
                    problems.append(f"{where}: sees {line.port} as {','.join(sorted(line.flags))}")
            slot_map = sorted(
                (lo, hi, line.node_id)
                for line in lines
                if line.role == "primary"
                for lo, hi in line.slots
            )
            covered = sum(hi - lo + 1 for lo, hi, _ in slot_map)
            if covered != TOTAL_SLOTS:
                problems.append(f"{where}: {covered}/{TOTAL_SLOTS} slots assigned")
            dead_owners = {owner for _, _, owner in slot_map if owner not in live_ids}
            if dead_owners:
                problems.append(f"{where}: slots owned by non-live nodes {sorted(dead_owners)}")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                problems.append(f"{where}: master_link_status:{repl.get('master_link_status')}")
            topology = tuple(
                sorted(
                    (line.node_id, line.role, line.master_id)
                    for line in lines
                    if line.node_id in live_ids
                )
            )
            signature = (tuple(slot_map), topology)
            if reference is None:
                reference = signature
            elif signature != reference:
                problems.append(f"{where}: slot map or roles differ from {live[0].port}'s view")
        return problems

    # ------------------------------------------------------------------ state file

    def write_state_file(self, path: str | os.PathLike[str]) -> None:
        """Record the running nodes as JSON, so `from_state_file` can re-attach later."""
        state = {
            "version": _STATE_VERSION,
            "url": self.url,
            "host": self.host,
            "cluster_mode": self.cluster_mode,
            "primaries": self.primaries_count,
            "replicas_per_primary": self.replicas_per_primary,
            "node_timeout_ms": self.node_timeout_ms,
            "persistence": self.persistence,
            "extra_config": self.extra_config,
            "redis_server": self._redis_server,
            "base_dir": str(self._base_dir),
            "owns_base_dir": self._owns_base_dir,
            "ports": [n.port for n in self._nodes],
            "netns": self._net.state() if self._net is not None else None,
            "tls_dir": str(self._tls.ca.cert.parent) if self._tls else None,
            "pids": [n.pid for n in self._nodes],
            "nodes": [
                {
                    "port": n.port,
                    "pid": n.pid,
                    "node_id": n.node_id,
                    "role": n.role,
                    "dir": str(n.dir),
                }
                for n in self._nodes
            ],
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(target)  # atomic: a concurrent `status` never reads half a file

    @classmethod
    def from_state_file(cls, path: str | os.PathLike[str]) -> LocalCluster:
        """Re-attach to nodes recorded by `write_state_file` (e.g. by ``cluster up``).

        The returned object supports everything a started cluster does; `stop` stops exactly
        the recorded processes, after checking each pid still is that ``redis-server``.

        Raises:
            HarnessError: The file is missing or malformed.
        """
        try:
            state = json.loads(Path(path).read_text())
            if state.get("version") != _STATE_VERSION:
                raise HarnessError(f"unsupported state file version {state.get('version')!r}")
            obj = cls.__new__(cls)
            obj._configure(
                primaries=int(state["primaries"]),
                replicas_per_primary=int(state["replicas_per_primary"]),
                cluster_mode=bool(state["cluster_mode"]),
                host=str(state["host"]),
                node_timeout_ms=int(state["node_timeout_ms"]),
                persistence=bool(state["persistence"]),
                extra_config={str(k): str(v) for k, v in state["extra_config"].items()},
                base_dir=str(state["base_dir"]),
                startup_timeout=30.0,
                die_with_parent=False,
            )
            obj._redis_server = str(state["redis_server"])
            obj._owns_base_dir = bool(state["owns_base_dir"])
            if state.get("tls_dir"):  # absent in files written before TLS clusters
                obj.tls = True
                obj._tls = _tls_files_in(Path(state["tls_dir"]))
            for entry in state["nodes"]:
                node = _Node(int(entry["port"]), Path(entry["dir"]), entry["role"])
                node.pid = int(entry["pid"]) if entry["pid"] is not None else None
                node.node_id = entry["node_id"]
                obj._nodes.append(node)
            if state.get("netns"):
                net = state["netns"]
                obj.netns = True
                obj._net = HostNetwork.attach(
                    int(net["block"]), int(net["nodes"]), [str(n) for n in net["namespaces"]]
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HarnessError(f"cannot read cluster state file {path}: {exc!r}") from exc
        obj._attached = True
        obj._started = True
        return obj

    # ------------------------------------------------------------------ process handling

    def _host_of(self, port: int) -> str:
        """The address node ``port`` listens on: its namespace's, or the shared ``host``."""
        if self._net is None:
            return self.host
        return self._net.address(self._index_of(port))

    def _index_of(self, port: int) -> int:
        for i, node in enumerate(self._nodes):
            if node.port == port:
                return i
        raise HarnessError(f"no harness node on port {port} (ports: {self.ports})")

    def _node(self, port: int) -> _Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise HarnessError(f"no harness node on port {port} (ports: {self.ports})")

    def _running_node(self, port: int) -> _Node:
        node = self._node(port)
        if not self._alive(node):
            raise HarnessError(f"node {port} is not running")
        return node

    def _alive(self, node: _Node) -> bool:
        if node.proc is not None:
            return node.proc.poll() is None
        return node.pid is not None and _is_our_redis(node.pid, node.port)

    def _signal(self, node: _Node, sig: signal.Signals) -> None:
        if node.proc is not None:
            # Popen refuses to signal a child it has already reaped, so a recycled pid is safe.
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(sig)
        elif node.pid is not None and _is_our_redis(node.pid, node.port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, sig)

    def _wait_exit(self, node: _Node, timeout: float) -> bool:
        if node.proc is not None:
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while node.pid is not None and _is_our_redis(node.pid, node.port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _write_conf(self, node: _Node) -> None:
        lines = [
            "# Generated by engine.cluster. Shared settings come from the include; everything",
            "# below is specific to this node and overrides it.",
            f"include {_quote(NODE_CONF)}",
            *self._port_lines(node),
            f"bind {self._host_of(node.port)}",
            f"dir {_quote(node.dir)}",
            f"logfile {_quote(node.log)}",
        ]
        if self.cluster_mode:
            lines += [
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
            ]
        else:
            lines.append("cluster-enabled no")
        if self._net is not None:
            # Gossip and CLUSTER SLOTS must carry the address the other hosts reach.
            lines.append(f"cluster-announce-ip {self._host_of(node.port)}")
        if self.persistence:
            lines.append("appendonly yes")
        lines += [f"{key} {value}" for key, value in self.extra_config.items()]
        node.conf.write_text("\n".join(lines) + "\n")

    def _port_lines(self, node: _Node) -> list[str]:
        if self._tls is None:
            return [f"port {node.port}"]
        tls = self._tls
        # No plaintext port at all; every link (clients, bus, replication) is TLS.
        return [
            "port 0",
            f"tls-port {node.port}",
            f"tls-cert-file {_quote(tls.cert_file)}",
            f"tls-key-file {_quote(tls.key_file)}",
            f"tls-ca-cert-file {_quote(tls.ca_file)}",
            "tls-auth-clients optional",
            "tls-replication yes",
            *(["tls-cluster yes"] if self.cluster_mode else []),
        ]

    def _spawn(self, node: _Node) -> None:
        preexec = _pdeathsig_preexec() if self.die_with_parent else None
        cmd = [self._redis_server, str(node.conf)]
        if self._net is not None:
            cmd = self._net.exec_prefix(self._nodes.index(node)) + cmd

        def popen() -> subprocess.Popen[bytes]:
            # Early errors (bad config) go to stderr before the logfile is open: keep them too.
            with node.log.open("ab") as log:
                return subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=node.dir,
                    # Own session: a Ctrl-C meant for pytest must not hit the nodes mid-cleanup.
                    start_new_session=True,
                    # Only a prctl call; forks come from one thread (see _on_long_lived_thread).
                    preexec_fn=preexec,  # noqa: PLW1509
                )

        node.proc = _on_long_lived_thread(popen) if preexec else popen()
        node.pid = node.proc.pid
        node.paused = False

    def _launch_all(self, deadline: float) -> None:
        assert self._base_dir is not None
        primary: Role = "primary"
        replica: Role = "replica"
        roles = [primary] * self.primaries_count + [replica] * (
            self.primaries_count * self.replicas_per_primary
        )
        if self._net is not None:
            # Each node has a network namespace of its own: fixed ports cannot collide.
            ports = [_NETNS_FIRST_PORT + i for i in range(len(roles))]
        else:
            ports = _pick_ports(self.host, len(roles), set())
        self._nodes = [
            _Node(p, self._base_dir / str(p), r) for p, r in zip(ports, roles, strict=True)
        ]
        pending = list(self._nodes)
        for attempt in range(_BIND_ATTEMPTS):
            for node in pending:
                node.dir.mkdir()
                self._write_conf(node)
                self._spawn(node)
            failed = self._await_ping(pending, deadline)
            if not failed:
                return
            collided = [n for n in failed if _bind_failed(n.log)]
            if len(collided) < len(failed) or attempt == _BIND_ATTEMPTS - 1:
                bad = failed[0]
                raise HarnessError(
                    f"redis-server on port {bad.port} did not start: {_log_tail(bad.log)}"
                )
            # Someone grabbed the port between our probe and the server's bind: move the
            # affected nodes to fresh ports and try again.
            taken = {n.port for n in self._nodes}
            fresh = _pick_ports(self.host, len(collided), taken)
            for node, port in zip(collided, fresh, strict=True):
                shutil.rmtree(node.dir, ignore_errors=True)
                node.port = port
                node.dir = self._base_dir / str(port)
            pending = collided

    def _await_ping(self, nodes: Sequence[_Node], deadline: float) -> list[_Node]:
        """Wait until each node answers PING; return the ones that died or timed out."""
        waiting = list(nodes)
        failed: list[_Node] = []
        while waiting:
            for node in list(waiting):
                if not self._alive(node):
                    if node.proc is not None:
                        node.proc.wait()
                    waiting.remove(node)
                    failed.append(node)
                elif _ping(self._host_of(node.port), node.port, tls=self._tls):
                    waiting.remove(node)
            if waiting and time.monotonic() >= deadline:
                for node in waiting:
                    self._signal(node, signal.SIGKILL)
                    self._wait_exit(node, 5.0)
                return failed + waiting
            if waiting:
                time.sleep(0.02)
        return failed

    def _form_cluster(self, deadline: float) -> None:
        nodes = self._nodes
        for epoch, node in enumerate(nodes, start=1):
            node.node_id = str(self.run(node.port, "CLUSTER", "MYID"))
            # Distinct config epochs up front, as redis-cli does: otherwise the nodes spend
            # a while resolving epoch collisions before failovers behave.
            self.run(node.port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        n = self.primaries_count
        for i, node in enumerate(nodes[:n]):
            first, last = i * TOTAL_SLOTS // n, (i + 1) * TOTAL_SLOTS // n - 1
            self.run(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
        # Meeting every pair directly skips waiting for gossip to spread the introductions.
        for i, node in enumerate(nodes):
            for other in nodes[i + 1 :]:
                self.run(node.port, "CLUSTER", "MEET", self._host_of(other.port), other.port)
        self._wait_mesh(deadline)
        for i, replica in enumerate(nodes[n:]):
            primary = nodes[i // self.replicas_per_primary]
            self.run(replica.port, "CLUSTER", "REPLICATE", primary.node_id)
        self.wait_healthy(max(0.0, deadline - time.monotonic()))

    def _wait_mesh(self, deadline: float) -> None:
        """Wait until every node knows every other one by its real id (handshakes done)."""
        ids = {n.node_id for n in self._nodes}
        while True:
            lagging = []
            for node in self._nodes:
                lines = self._cluster_nodes_or_none(node.port) or []
                known = {line.node_id for line in lines if not line.flags & {"handshake", "noaddr"}}
                if not ids <= known:
                    lagging.append(node.port)
            if not lagging:
                return
            if time.monotonic() >= deadline:
                raise HarnessError(f"nodes {lagging} did not learn about all peers in time")
            time.sleep(0.02)

    def _cluster_nodes_or_none(self, port: int) -> list[_NodeLine] | None:
        try:
            with _client(self._host_of(port), port, _CONTROL_TIMEOUT, tls=self._tls) as client:
                return _parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
        except (redis.RedisError, OSError):
            return None

    def _any_view(self) -> dict[str, _NodeLine]:
        """The cluster as seen by the first live node that answers."""
        for node in self._nodes:
            if self._alive(node) and not node.paused:
                lines = self._cluster_nodes_or_none(node.port)
                if lines is not None:
                    return {line.node_id: line for line in lines}
        raise HarnessError("no live node answers CLUSTER NODES")


# ---------------------------------------------------------------------- helpers


_NETNS_FIRST_PORT = 7000  # node i of a namespace cluster listens on 7000 + i


def _url(host: str, port: int, *, tls: bool = False) -> str:
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _tls_files_in(directory: Path) -> TlsFiles:
    """The files `make_test_pki` wrote into ``directory``."""
    return TlsFiles(
        ca=CertPair(directory / "ca.crt", directory / "ca.key"),
        node=CertPair(directory / "node.crt", directory / "node.key"),
    )


def _client(
    host: str,
    port: int,
    timeout: float,
    *,
    decode_responses: bool = True,
    tls: TlsFiles | None = None,
) -> redis.Redis:
    # No retries: redis-py retries 10 times by default, which turns "node is down/paused"
    # into a multi-second hang instead of a quick, clear error.
    tls_options: dict[str, Any] = {}
    if tls is not None:
        # The node certificate doubles as the admin's client certificate, so the harness
        # still works when a test turns tls-auth-clients to yes.
        tls_options = {
            "ssl": True,
            "ssl_ca_certs": str(tls.ca_file),
            "ssl_certfile": str(tls.cert_file),
            "ssl_keyfile": str(tls.key_file),
        }
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=decode_responses,
        **tls_options,
    )


def _ping(host: str, port: int, timeout: float = 0.5, *, tls: TlsFiles | None = None) -> bool:
    try:
        with _client(host, port, timeout, tls=tls) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):  # refused, timed out, or still LOADING
        return False
