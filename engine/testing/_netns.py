"""Nodes as separate hosts: one network namespace per ``redis-server``, joined by a bridge.

Used by ``LocalCluster(netns=True)``. Linux and root only (``ip netns``, veth pairs and
``nft``); `netns_unavailable` says why not elsewhere.

The layout of one cluster (a *block*, ``k`` in 0-15) inside the fixed private range
``10.213.0.0/24``, one ``/28`` per block so up to 16 such clusters can run side by side::

    root namespace (the test process, the client)
      rse<k>c  10.213.0.(16k+1)/28 ──veth──┐
                                           │  namespace rse-<k>-sw: bridge br0, and the
    rse-<k>-n0  eth0 10.213.0.(16k+2) ──veth─┤  nftables table that makes partitions
    rse-<k>-n1  eth0 10.213.0.(16k+3) ──veth─┤
    ...                                    ┘

The bridge sits in a namespace of its own (``rse-<k>-sw``), not in the root namespace: with
``br_netfilter`` loaded (Docker loads it) bridged packets in the root namespace go through
the root ``iptables`` FORWARD chain, where Docker's DROP policy would cut the nodes off from
each other. In a namespace we own, the only rules are ours.

Partitions are ``drop`` rules on that bridge (``nft``, table ``bridge rse_partition``): packets
vanish as on a real network (no RST, no ICMP), so the far side learns only by timeout. The
whole rule set is replaced in one nft transaction on every change, and `heal` deletes it.

Ownership: a block is claimed by creating ``rse-<k>-sw`` (which fails if the name exists)
and marked with an alias on its bridge. Only names this module created, or recorded in a
state file and still carrying the mark, are ever deleted; a block left behind by a crashed
run (marked, older than `_STALE_AFTER`, no process in any of its namespaces) is reclaimed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from ._constants import HarnessError

__all__ = [
    "MAX_NODES",
    "NETNS_SUBNET",
    "HostNetwork",
    "NetnsUnavailable",
    "Partitions",
    "netns_unavailable",
]

NETNS_SUBNET: Final = ipaddress.IPv4Network("10.213.0.0/24")
"""The only addresses the namespace mode ever uses (documented in the README)."""

_BLOCK: Final = 16  # addresses per cluster: a /28
_BLOCKS: Final = NETNS_SUBNET.num_addresses // _BLOCK
MAX_NODES: Final = _BLOCK - 3  # minus network, broadcast and the client's address
_PREFIX: Final = "rse-"
_NAME: Final = re.compile(r"^rse-(\d{1,2})-(sw|n\d{1,2})$")
_MARK: Final = "redis-session-engine netns block"
_TABLE: Final = "rse_partition"
_STALE_AFTER: Final = 120.0  # seconds: a marked block with no process that old is a leftover
_IP_TIMEOUT: Final = 10.0

CLIENT: Final = "client"
"""The test process's end of the network, as an endpoint of a cut."""

Endpoint = int | str  # a node index, or CLIENT


class NetnsUnavailable(HarnessError):
    """Network namespaces cannot be used here (not Linux, not root, no ``ip``/``nft``)."""


def netns_unavailable() -> str | None:
    """Why ``LocalCluster(netns=True)`` cannot run here, or ``None`` if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {package})"
    return None


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"`{' '.join(argv)}` failed: {exc!r}") from exc
    if check and done.returncode != 0:
        raise HarnessError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout if done.returncode == 0 else ""


def _existing_namespaces() -> set[str]:
    return {line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line}


class HostNetwork:
    """One block: the namespaces, veths and bridge of one cluster, and its partition rules.

    Build it with `create` (or `attach` for one recorded in a state file); `destroy` removes
    exactly what it owns.
    """

    def __init__(self, block: int, nodes: int) -> None:
        if not 0 <= block < _BLOCKS:
            raise ValueError(f"block must be in 0..{_BLOCKS - 1}, not {block}")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"the namespace mode holds 1..{MAX_NODES} nodes, not {nodes}")
        self.block = block
        self.nodes = nodes
        self._owned: list[str] = []  # namespaces we created (or were handed), in order

    # -- names and addresses --------------------------------------------------------------

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        return f"{_PREFIX}{self.block}-sw"

    def namespace(self, index: int) -> str:
        """The namespace of node ``index``."""
        self._check_index(index)
        return f"{_PREFIX}{self.block}-n{index}"

    @property
    def client_interface(self) -> str:
        """The root namespace's end of the client veth."""
        return f"rse{self.block}c"

    def _base(self) -> int:
        return int(NETNS_SUBNET.network_address) + self.block * _BLOCK

    @property
    def client_address(self) -> str:
        """The root namespace's (the client's) address on the bridge."""
        return str(ipaddress.IPv4Address(self._base() + 1))

    def address(self, index: int) -> str:
        """Node ``index``'s address (its namespace's only non-loopback address)."""
        self._check_index(index)
        return str(ipaddress.IPv4Address(self._base() + 2 + index))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.nodes:
            raise HarnessError(f"no node {index} in this network (0..{self.nodes - 1})")

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this object owns (what `destroy` removes)."""
        return list(self._owned)

    def exec_prefix(self, index: int) -> list[str]:
        """The argv prefix that runs a program inside node ``index``'s namespace.

        ``ip netns exec`` execs the program in place, so the pid ``Popen`` reports is the
        program's own (and ``PR_SET_PDEATHSIG`` set before the exec still applies).
        """
        return ["ip", "netns", "exec", self.namespace(index)]

    # -- building and tearing down -----------------------------------------------------------

    @classmethod
    def create(cls, nodes: int) -> HostNetwork:
        """Claim a free block and build its namespaces, bridge and veths.

        Raises:
            NetnsUnavailable: Not Linux/root, or ``ip``/``nft`` missing.
            HarnessError: Every block is taken, or building failed (what was built is gone).
        """
        reason = netns_unavailable()
        if reason is not None:
            raise NetnsUnavailable(reason)
        taken: list[str] = []
        for block in range(_BLOCKS):
            net = cls(block, nodes)
            if not net._claim():
                taken.append(net.switch)
                continue
            try:
                net._build()
            except BaseException:
                net.destroy()
                raise
            return net
        raise HarnessError(
            f"every block of {NETNS_SUBNET} is in use ({', '.join(taken)}); "
            "stop the other namespace clusters first"
        )

    def _claim(self) -> bool:
        """Create the switch namespace (atomic: fails if the name exists). False if taken."""
        for _ in range(2):
            done = subprocess.run(
                ["ip", "netns", "add", self.switch],
                capture_output=True,
                text=True,
                timeout=_IP_TIMEOUT,
                check=False,
            )
            if done.returncode == 0:
                self._owned.append(self.switch)
                return True
            if not self._reclaim_stale():
                return False
        return False

    def _marked_at(self) -> float | None:
        """When our mark says this block was created; ``None`` if it is not ours."""
        text = _run(["ip", "-n", self.switch, "-o", "link", "show", "br0"], check=False)
        match = re.search(rf"alias {re.escape(_MARK)} (\d+)", text)
        return float(match.group(1)) if match else None

    def _reclaim_stale(self) -> bool:
        """Delete this block if a crashed run of ours left it behind; True if it did."""
        marked = self._marked_at()
        if marked is None or time.time() - marked < _STALE_AFTER:
            return False  # not ours, or maybe still being built by a sibling process
        names = sorted(
            n
            for n in _existing_namespaces()
            if (m := _NAME.match(n)) is not None and int(m.group(1)) == self.block
        )
        if any(_run(["ip", "netns", "pids", n], check=False).strip() for n in names):
            return False  # something still runs in it: a live cluster
        for name in names:
            _run(["ip", "netns", "del", name], check=False)
        return True

    def _build(self) -> None:
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "link", "set", "br0", "alias", f"{_MARK} {int(time.time())}"])
        _run([*sw, "link", "set", "br0", "up"])
        block_net = f"{self._base_address()}/28"
        if _run(["ip", "-o", "addr", "show", "to", block_net]).strip():
            raise HarnessError(f"{block_net} is already used in the root namespace; not ours")
        if _run(["ip", "-o", "link", "show", self.client_interface], check=False).strip():
            raise HarnessError(f"interface {self.client_interface} exists and is not ours")
        client_if = self.client_interface
        _run(["ip", "link", "add", client_if, "type", "veth", "peer", "name", "c", "netns", sw[2]])
        _run([*sw, "link", "set", "c", "master", "br0", "up"])
        _run(["ip", "addr", "add", f"{self.client_address}/28", "dev", self.client_interface])
        _run(["ip", "link", "set", self.client_interface, "up"])
        for i in range(self.nodes):
            ns = f"{_PREFIX}{self.block}-n{i}"
            _run(["ip", "netns", "add", ns])
            self._owned.append(ns)
            _run([*sw, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run([*sw, "link", "set", f"n{i}", "master", "br0", "up"])
            inside = ["ip", "-n", ns]
            _run([*inside, "addr", "add", f"{self.address(i)}/28", "dev", "eth0"])
            _run([*inside, "link", "set", "eth0", "up"])
            _run([*inside, "link", "set", "lo", "up"])

    def _base_address(self) -> str:
        return str(ipaddress.IPv4Address(self._base()))

    @classmethod
    def attach(cls, block: int, nodes: int, namespaces: Iterable[str]) -> HostNetwork:
        """The block recorded in a state file, after checking the names are ours.

        Raises:
            HarnessError: A name is not one this module makes for that block, or the block
                does not carry our mark (it was not made by us).
        """
        net = cls(block, nodes)
        names = list(namespaces)
        for name in names:
            match = _NAME.match(name)
            if match is None or int(match.group(1)) != block:
                raise HarnessError(f"refusing namespace {name!r}: not one of block {block}")
        existing = _existing_namespaces() if netns_unavailable() is None else set()
        if net.switch in existing and net._marked_at() is None:
            raise HarnessError(f"namespace {net.switch} does not carry our mark; not touching it")
        net._owned = [n for n in names if n in existing]
        return net

    def destroy(self) -> None:
        """Delete the namespaces this object owns (their veths, the bridge and the rules go
        with them). Never raises; safe twice. Stop the processes inside first."""
        owned_switch = self.switch in self._owned
        for name in reversed(self._owned):
            _run(["ip", "netns", "del", name], check=False)
        self._owned.clear()
        # The kernel tears veths down asynchronously: wait, so the block can be reused at once.
        deadline = time.monotonic() + 3.0
        while owned_switch and time.monotonic() < deadline:
            if not _run(["ip", "-o", "link", "show", self.client_interface], check=False):
                break
            time.sleep(0.02)

    # -- partitions ---------------------------------------------------------------------

    def apply_cuts(self, cuts: Iterable[frozenset[Endpoint]]) -> None:
        """Replace the partition rules: for each pair, no packet passes either way."""
        rules = []
        for pair in sorted(cuts, key=lambda p: sorted(map(str, p))):
            a, b = sorted(pair, key=str)
            for src, dst in ((a, b), (b, a)):
                rules.append(f"    ip saddr {self._ip(src)} ip daddr {self._ip(dst)} drop")
        # "add table" then "delete table" makes the delete safe when there is none; all of
        # it is one transaction, so no packet ever sees a half-written rule set.
        script = "\n".join(
            [
                f"add table bridge {_TABLE}",
                f"delete table bridge {_TABLE}",
                f"table bridge {_TABLE} {{",
                "  chain forward {",
                "    type filter hook forward priority 0; policy accept;",
                *rules,
                "  }",
                "}",
                "",
            ]
        )
        _run(["ip", "netns", "exec", self.switch, "nft", "-f", "-"], stdin=script)

    def _ip(self, endpoint: Endpoint) -> str:
        if endpoint == CLIENT:
            return self.client_address
        if isinstance(endpoint, int):
            return self.address(endpoint)
        raise HarnessError(f"unknown endpoint {endpoint!r}")

    def state(self) -> dict[str, object]:
        """What a state file records to `attach` later."""
        return {"block": self.block, "nodes": self.nodes, "namespaces": list(self._owned)}


class Partitions:
    """The partition API of a namespace cluster (``LocalCluster.partitions``).

    Nodes are named by port, as everywhere in the harness. Cuts accumulate until `heal`;
    a cut stops packets both ways, silently (a real partition, not a refused connection).
    """

    def __init__(self, network: HostNetwork, index_of: Callable[[int], int]) -> None:
        self._net = network
        self._index_of = index_of
        self._cuts: set[frozenset[Endpoint]] = set()

    @property
    def cuts(self) -> frozenset[frozenset[Endpoint]]:
        """The pairs cut now: node indexes, and `CLIENT` for the test process."""
        return frozenset(self._cuts)

    def isolate(self, port: int) -> None:
        """Cut the node from every other node; the client still reaches it."""
        me = self._index_of(port)
        self._apply({frozenset((me, other)) for other in range(self._net.nodes) if other != me})

    def split(self, *groups: Iterable[int]) -> None:
        """Cut the cluster into groups of ports: no node reaches a node of another group.

        Every node must be in exactly one group. The client reaches every node.

        Raises:
            HarnessError: A port is in two groups, or a node is in none.
        """
        index_groups = [[self._index_of(p) for p in g] for g in groups]
        flat = [i for g in index_groups for i in g]
        if len(flat) != len(set(flat)) or set(flat) != set(range(self._net.nodes)):
            raise HarnessError("split: every node must be in exactly one group")
        cuts: set[frozenset[Endpoint]] = set()
        for gi, group in enumerate(index_groups):
            for other in index_groups[gi + 1 :]:
                cuts |= {frozenset[Endpoint]((a, b)) for a in group for b in other}
        self._apply(cuts)

    def cut_client(self, port: int) -> None:
        """Cut the client (this process's namespace) from one node; the nodes still talk."""
        self._apply({frozenset((CLIENT, self._index_of(port)))})

    def heal(self) -> None:
        """Remove every cut."""
        self._cuts.clear()
        self._net.apply_cuts(())

    def _apply(self, more: set[frozenset[Endpoint]]) -> None:
        self._net.apply_cuts(self._cuts | more)
        self._cuts |= more
