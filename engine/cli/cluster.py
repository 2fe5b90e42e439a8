"""``python -m engine cluster up|down|status``: a local cluster in the background."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Final

import redis

from ..testing import (
    DEFAULT_STATE_FILE,
    ClusterNode,
    HarnessError,
    LocalCluster,
    RedisServerNotFound,
)
from ..testing._cluster import _ping
from ..testing._topology import _parse_info
from .console import add_json_option, print_table, report_stream, right, write_json

__all__ = ["main"]


def _format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in ranges) or "-"


NODE_COLUMNS: Final = ("ROLE", right("PORT"), right("PID"), "ALIVE", "SLOTS", "NODE ID")


def _node_rows(nodes: Sequence[ClusterNode]) -> list[list[str | None]]:
    return [
        [
            n.role + (" (paused)" if n.paused else ""),
            str(n.port),
            None if n.pid is None else str(n.pid),
            "yes" if n.alive else "no",
            _format_ranges(n.slots),
            n.node_id,
        ]
        for n in nodes
    ]


def _print_nodes(nodes: Sequence[ClusterNode], notes: Sequence[str], file: IO[str]) -> None:
    print_table(None, NODE_COLUMNS, _node_rows(nodes), notes=notes, file=file)


def _node_json(node: ClusterNode) -> dict[str, Any]:
    """A node for ``--json``: its snapshot, slot ranges as ``[lo, hi]`` pairs."""
    return {**asdict(node), "slots": [list(r) for r in node.slots]}


def _cluster_state(cl: LocalCluster) -> str:
    for snap in cl.nodes:
        if snap.alive and not snap.paused:
            if not cl.cluster_mode:
                return (
                    "ok (standalone)"
                    if _ping(cl.host, snap.port, tls=cl.tls_files)
                    else "unreachable"
                )
            try:
                info = _parse_info(cl.run(snap.port, "CLUSTER", "INFO"))
            except (redis.RedisError, OSError):
                continue
            return info.get("cluster_state", "unknown")
    return "down (no live node)"


def _cli_up(args: argparse.Namespace) -> int:
    state_file: Path = args.state_file
    if state_file.exists():
        try:
            old = LocalCluster.from_state_file(state_file)
        except HarnessError as exc:
            print(f"error: {exc}; remove it if no cluster is running", file=sys.stderr)
            return 1
        if any(old._alive(n) for n in old._nodes):
            print(
                f"error: a cluster from {state_file} is still running ({old.url}); "
                "run `python -m engine cluster down` first",
                file=sys.stderr,
            )
            return 1
        old.stop()  # all dead already: this only tidies the stale node directories
        state_file.unlink()
    cl = LocalCluster(
        primaries=args.primaries,
        replicas_per_primary=args.replicas,
        startup_timeout=args.timeout,
        die_with_parent=False,
        tls=args.tls,
        netns=args.netns,
    )
    started = time.monotonic()
    try:
        cl.start()
        cl.write_state_file(state_file)
    except HarnessError as exc:
        cl.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        cl.stop()
        raise
    cl.detach()
    took = time.monotonic() - started
    nodes = cl.nodes
    out = report_stream(args)
    # The URL first, alone on its line: scripts read it with `head -1`.
    print(cl.url, file=out)
    if cl.ca_file is not None:
        print(f"CA to trust: {cl.ca_file} (ENGINE_TLS_CA_FILE)", file=out)
    notes = []
    if cl.client_address is not None:
        notes.append(
            "nodes in network namespaces: "
            + ", ".join(f"{n.host}:{n.port}" for n in nodes)
            + f"; this host is {cl.client_address} on their bridge"
        )
    notes.append(f"cluster healthy in {took:.1f}s; state: {state_file}; node dirs: {cl.base_dir}")
    _print_nodes(nodes, notes, out)
    write_json(
        args.json,
        {
            "url": cl.url,
            "ca_file": None if cl.ca_file is None else str(cl.ca_file),
            "client_address": cl.client_address,
            "state_file": str(state_file),
            "base_dir": str(cl.base_dir),
            "startup_seconds": round(took, 3),
            "nodes": [_node_json(n) for n in nodes],
        },
    )
    return 0


def _recorded(state_file: Path) -> LocalCluster | int:
    """The cluster recorded in ``state_file``, or the exit code when there is none."""
    try:
        return LocalCluster.from_state_file(state_file)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cli_down(args: argparse.Namespace) -> int:
    state_file: Path = args.state_file
    if not state_file.exists():
        print(f"no cluster to stop (no state file at {state_file})", file=report_stream(args))
        write_json(args.json, {"stopped": 0, "state_file": None})
        return 0
    cl = _recorded(state_file)
    if isinstance(cl, int):
        return cl
    running = sum(cl._alive(n) for n in cl._nodes)
    cl.stop()
    state_file.unlink()
    if state_file == DEFAULT_STATE_FILE:
        with contextlib.suppress(OSError):
            state_file.parent.rmdir()  # the .engine-cluster/ that `up` created, if now empty
    print(f"stopped {running} node(s); removed {state_file}", file=report_stream(args))
    write_json(args.json, {"stopped": running, "state_file": str(state_file)})
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    state_file: Path = args.state_file
    if not state_file.exists():
        print(f"no cluster (no state file at {state_file})", file=report_stream(args))
        write_json(args.json, {"url": None, "cluster_state": "none", "healthy": False, "nodes": []})
        return 1
    cl = _recorded(state_file)
    if isinstance(cl, int):
        return cl
    nodes = cl.nodes
    state = _cluster_state(cl)
    healthy = state.startswith("ok") and all(n.alive for n in nodes)
    out = report_stream(args)
    print(cl.url, file=out)
    _print_nodes(nodes, [f"cluster_state: {state}"], out)
    write_json(
        args.json,
        {
            "url": cl.url,
            "cluster_state": state,
            "healthy": healthy,
            "nodes": [_node_json(n) for n in nodes],
        },
    )
    return 0 if healthy else 1


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine cluster``."""
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--primaries", type=int, default=3, help="number of primaries (3)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per primary (1)")
    parser.add_argument(
        "--state-file",
        type=Path,
        default=DEFAULT_STATE_FILE,
        help=f"where the running cluster is recorded ({DEFAULT_STATE_FILE})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="startup timeout (30s)")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every link (no plaintext port); prints the CA file to trust",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="each node in its own network namespace on 10.213.0.0/24 (Linux, root)",
    )
    add_json_option(parser, "the cluster's URL and nodes (down: how many stopped)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine cluster ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["cluster", *(sys.argv[2:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Start, stop or show the background cluster."""
    try:
        if args.command == "up":
            return _cli_up(args)
        if args.command == "down":
            return _cli_down(args)
        return _cli_status(args)
    except (RedisServerNotFound, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
