"""``python -m engine bench --network``: the validate hot path over loopback and over a real
kernel network path, in ONE run.

Two clusters of the same shape run side by side: one on loopback (the usual harness) and
one whose nodes are separate hosts (``LocalCluster(netns=True)``: each node in a network
namespace of its own, reached from this process through a veth pair and a bridge). The same
measurements run against each, alternating (each measurement on one, then on the other):

* ``redis-benchmark`` PING over one connection (the bare round trip, C client),
* one validation at a time (the round trip a request pays when the service is idle),
* ``--concurrency`` validations in flight (throughput, auto-pipelined),
* fixed offered loads (``--rate``; open loop, latency from the call).

Each measurement runs in ``--rounds`` short rounds that alternate between the two clusters
(``--seconds`` is split between them); a row is the median of its rounds, so a burst of
load from elsewhere on a shared machine hits one round, not one network.

What the namespace path adds is the kernel's real network stack (veth, bridge, netfilter
hooks, no loopback shortcuts); there is no wire and no propagation delay, so the gap is a
lower bound of what a LAN adds (netem delay is not available on this kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import IO, Any, Final
from urllib.parse import urlsplit

from .._engine import SessionEngine
from .._settings import EngineSettings
from ..testing import LocalCluster
from ..testing._netns import netns_unavailable
from .bench import Row, _closed_loop, _machine, _machine_note, _open_loop
from .console import Progress, markdown_table, print_table, right

__all__ = ["bench_networks", "render_networks", "report_networks"]


async def _measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, list[Row]]:
    """Each measurement on every cluster in turn, so drift on a shared machine hits both."""
    progress = Progress()
    rows: dict[str, list[Row]] = {label: [] for label in urls}
    ops: dict[str, Callable[[int], Awaitable[Any]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for label, url in urls.items():
            settings = EngineSettings(
                url=url, key_prefix="netbench", idle_ttl=3600, absolute_ttl=7200
            )
            eng = await stack.enter_async_context(SessionEngine(settings))
            progress.done(f"[{label}] creating {args.sessions:,} sessions ...")
            ops[label] = await _validate_op(eng, args.sessions)
        measurements = [(f"validate, {c} in flight", c, None) for c in (1, args.concurrency)]
        measurements += [(f"validate @ {rate:,}/s", None, rate) for rate in args.rate]
        rounds = max(1, args.rounds)
        for name, concurrency, rate in [(_PING_ROW, None, None), *measurements]:
            seen: dict[str, list[Row]] = {label: [] for label in ops}
            secs = args.seconds / rounds
            for _ in range(rounds):
                for label, op in ops.items():
                    if name == _PING_ROW:
                        row = await asyncio.to_thread(_ping_rtt, urls[label], 20_000)
                    elif concurrency is not None:
                        row = await _closed_loop(
                            name, op, concurrency=concurrency, seconds=secs, progress=progress
                        )
                    else:
                        row = await _open_loop(
                            name, op, rate=float(rate or 0), seconds=secs, progress=progress
                        )
                    seen[label].append(row)
            for label, runs in seen.items():
                rows[label].append(_median_row(name, runs))
    return rows


_PING_ROW = "redis-benchmark PING, 1 connection"


def _ping_rtt(url: str, requests: int) -> Row:
    """The bare round trip to the first primary: C client, one connection, no pipelining."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return Row(_PING_ROW, None, note="redis-benchmark not installed")
    address = urlsplit(url)
    cmd = [exe, "-h", address.hostname or "", "-p", str(address.port), "-c", "1"]
    cmd += ["-n", str(requests), "--csv", "-t", "ping_mbulk"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95..","p99..","max.."
    fields = out.strip().splitlines()[-1].replace('"', "").split(",") if out.strip() else []
    try:
        rps, p50, p99 = float(fields[1]), float(fields[4]), float(fields[6])
    except (IndexError, ValueError):
        return Row(_PING_ROW, None, note=f"unexpected redis-benchmark output: {out[:80]!r}")
    return Row(_PING_ROW, rps, p50, p99, None, None)


def _median_row(name: str, runs: list[Row]) -> Row:
    """One row from several short rounds: the median of each figure (noise-resistant)."""

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    return Row(
        name,
        med([r.ops_per_s for r in runs]),
        med([r.p50_ms for r in runs]),
        med([r.p99_ms for r in runs]),
        med([r.p999_ms for r in runs]),
        med([r.cpu_us_per_op for r in runs]),
        note=f"median of {len(runs)} alternating rounds",
    )


async def _validate_op(eng: SessionEngine, sessions: int) -> Callable[[int], Awaitable[Any]]:
    tokens: list[str] = []
    for start in range(0, sessions, 2000):
        batch = range(start, min(sessions, start + 2000))
        news = await asyncio.gather(*(eng.create(user_id=f"nb-{i}") for i in batch))
        tokens += [n.token for n in news]
    rnd = random.Random(1)
    order = [rnd.randrange(len(tokens)) for _ in range(1 << 16)]
    mask = len(order) - 1

    async def validate(i: int) -> Any:
        return await eng.validate(tokens[order[i & mask]])

    return validate


def bench_networks(args: argparse.Namespace) -> dict[str, Any]:
    """Both clusters, the same measurements; ``{"loopback": rows, "netns": rows, ...}``."""
    from .._run import run  # noqa: PLC0415

    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(f"bench --network: cannot run here: {reason}")
    shape = {"primaries": args.primaries, "replicas_per_primary": args.replicas}
    result: dict[str, Any] = {"machine": _machine(), "args": vars(args)}
    print("starting a loopback and a netns cluster ...", file=sys.stderr)
    with LocalCluster(**shape) as lo, LocalCluster(**shape, netns=True) as ns:
        urls = {"loopback": lo.url, "netns": ns.url}
        for label, rows in run(_measure(urls, args)).items():
            result[label] = [vars(r) for r in rows]
            result[f"{label}_url"] = urls[label]
    return result


NETWORK_COLUMNS: Final = (
    "what",
    right("loopback ops/s"),
    right("netns ops/s"),
    right("loopback p50 / p99 ms"),
    right("netns p50 / p99 ms"),
    right("p50 added by the network path"),
)


def network_rows(result: dict[str, Any]) -> list[list[str | None]]:
    """Loopback and namespace figures of each measurement side by side."""

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows: list[list[str | None]] = []
    for lo, ns in zip(result["loopback"], result["netns"], strict=True):
        added = (
            None
            if lo["p50_ms"] is None or ns["p50_ms"] is None
            else (ns["p50_ms"] - lo["p50_ms"]) * 1000
        )
        rows.append(
            [
                lo["name"],
                f(lo["ops_per_s"], ",.0f"),
                f(ns["ops_per_s"], ",.0f"),
                f"{f(lo['p50_ms'], '.3f')} / {f(lo['p99_ms'], '.3f')}",
                f"{f(ns['p50_ms'], '.3f')} / {f(ns['p99_ms'], '.3f')}",
                f"{f(added, '+.0f')} us",
            ]
        )
    return rows


def _network_note(result: dict[str, Any]) -> str:
    return f"{_machine_note(result)} Clusters: {result['loopback_url']} and {result['netns_url']}."


def render_networks(result: dict[str, Any]) -> str:
    """Loopback and namespace rows side by side as Markdown (what bench.md records)."""
    return markdown_table(NETWORK_COLUMNS, network_rows(result)) + "\n\n" + _network_note(result)


def report_networks(
    result: dict[str, Any], *, markdown: bool = False, file: IO[str] | None = None
) -> None:
    """The table (rich, or Markdown for bench.md) and the machine it ran on."""
    print_table(
        "python -m engine bench --network",
        NETWORK_COLUMNS,
        network_rows(result),
        notes=[_network_note(result)],
        markdown=markdown,
        file=file,
    )
