"""``python -m engine drill SCENARIO``: failover drills against a real local cluster.

Each drill starts a ``LocalCluster`` (or uses ``--url`` with ``--i-own-this-cluster``),
loads it with sessions, runs a steady mixed load from the engine (validations, creates,
revokes; a bounded rate) for the whole drill, injects one fault, and reports a per-100 ms
timeline plus the figures a failover rehearsal is judged by:

* time from the fault to the first error, the length of the error window, failed calls,
  split into the faulted shard's slots and everybody else's;
* acknowledged creates that were lost, acknowledged revokes that were lost (the revoked
  token validated again: a resurrection);
* latency of the healthy shards during the fault.

It writes JSON and, when matplotlib is installed, a PNG timeline chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._engine import SessionEngine
from .._errors import EngineError, EngineUnavailable, ReplicationIncomplete
from .._keys import slot_of_tag
from .._run import run
from .._settings import EngineSettings
from .._tokens import parse_token
from ..testing import ClusterNode, LocalCluster, RemoteCluster
from ..testing._netns import Partitions, netns_unavailable
from .console import Progress, add_json_option, percentile_ms, report_stream, write_json

Cluster = LocalCluster | RemoteCluster

__all__ = ["SCENARIOS", "DrillReport", "main", "run_drill"]

BUCKET = 0.1  # seconds per timeline bucket


@dataclass
class Bucket:
    """One 100 ms slice of the drill."""

    t: float
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    victim_errors: int = 0
    victim_read_errors: int = 0  # failed validations on the faulted shard
    other_errors: int = 0
    p99_ms: float | None = None
    latencies: list[float] = field(default_factory=list, repr=False)  # healthy shards' calls
    victim_latencies: list[float] = field(default_factory=list, repr=False)
    victim_validations: list[float] = field(default_factory=list, repr=False)  # reads only


@dataclass
class DrillReport:
    """What a drill measured. Times are seconds from the fault injection."""

    scenario: str
    wait_replicas: int
    sessions: int
    rate: float
    calls: int = 0
    failed_calls: int = 0
    failed_victim: int = 0
    failed_other: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    other_errors_by_type: dict[str, int] = field(default_factory=dict)  # off the faulted shard
    first_error_s: float | None = None
    last_error_s: float | None = None
    error_window_s: float = 0.0
    failed_victim_validations: int = 0
    validate_error_window_s: float = 0.0  # first to last failed validation on the shard
    replica_fallback_after: float | None = None
    recovered_s: float | None = None
    promoted_s: float | None = None
    healed_s: float | None = None  # partition drills: when the network was healed
    slowest_failure_s: float = 0.0  # the longest any failed call took to fail
    slowest_failure: str = ""  # which call that was, and its error
    acked_creates: int = 0
    lost_creates: int = 0
    acked_revokes: int = 0
    resurrected: int = 0
    other_p99_ms_during: float | None = None
    other_p99_ms_before: float | None = None
    victim_validate_p99_ms_before: float | None = None
    victim_validate_p99_ms_during: float | None = None
    fault_notes: list[str] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        return "\n".join(
            [
                f"drill {self.scenario} (wait_replicas={self.wait_replicas}, "
                f"{self.sessions:,} sessions, {self.rate:,.0f} ops/s offered)",
                f"  calls {self.calls:,}, failed {self.failed_calls:,} "
                f"(faulted shard {self.failed_victim:,}, other shards {self.failed_other:,}"
                + (f": {self.other_errors_by_type}" if self.other_errors_by_type else "")
                + ")",
                f"  errors by type: {self.errors_by_type or '{}'}; the slowest failure took "
                f"{self.slowest_failure_s:.2f}s ({self.slowest_failure or '-'})",
                f"  first error {s(self.first_error_s)} after the fault, "
                f"error window {self.error_window_s:.2f}s, recovered {s(self.recovered_s)}"
                + (f" (cluster promoted at {s(self.promoted_s)})" if self.promoted_s else "")
                + (f" (network healed at {s(self.healed_s)})" if self.healed_s else ""),
                f"  validations failed on the faulted shard: {self.failed_victim_validations:,}"
                f" in a window of {self.validate_error_window_s:.2f}s"
                + (
                    f" (replica fallback after {self.replica_fallback_after:g}s)"
                    if self.replica_fallback_after
                    else ""
                ),
                f"  acknowledged creates lost: {self.lost_creates} of {self.acked_creates:,}; "
                f"acknowledged revokes that validated again: {self.resurrected} "
                f"of {self.acked_revokes:,}",
                f"  healthy shards p99: {self.other_p99_ms_before or 0:.2f} ms before, "
                f"{self.other_p99_ms_during or 0:.2f} ms during the fault",
                f"  validations on the faulted shard, p99: "
                f"{self.victim_validate_p99_ms_before or 0:.2f} ms before, "
                f"{self.victim_validate_p99_ms_during or 0:.2f} ms during the fault",
                *[f"  note: {n}" for n in self.fault_notes],
            ]
        )


class _Load:
    """A bounded-rate mixed load and everything it saw."""

    def __init__(
        self, eng: SessionEngine, tokens: list[str], rate: float, victim_port: int | None
    ) -> None:
        self.eng = eng
        self.live = tokens
        self.rate = rate
        self.victim_port = victim_port
        self.victim_slots: set[int] = set()
        self.revoked: list[str] = []
        self.created: list[str] = []
        self.buckets: dict[int, Bucket] = {}
        self.t0 = time.monotonic()
        self.fault_at: float | None = None
        self.calls = 0
        self.rnd = random.Random(7)
        self.resurrected: set[str] = set()
        self.unconfirmed_revokes: set[str] = set()
        self.slowest_failure = 0.0
        self.slowest_failure_what = ""
        self.other_errors_by_type: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def is_victim(self, token: str) -> bool:
        parsed = parse_token(token)
        return parsed is not None and slot_of_tag(parsed[0]) in self.victim_slots

    def _bucket(self) -> Bucket:
        i = int((time.monotonic() - self.t0) / BUCKET)
        b = self.buckets.get(i)
        if b is None:
            b = self.buckets[i] = Bucket(t=i * BUCKET)
        return b

    async def _one(self) -> None:
        rnd = self.rnd
        roll = rnd.random()
        token = self.live[rnd.randrange(len(self.live))]
        victim = self.is_victim(token)
        start = time.monotonic()
        error: str | None = None
        failure: EngineError | None = None
        read = True
        op = "validate"
        try:
            if roll < 0.05 and self.revoked:
                # Revoked tokens must stay dead, whatever happens to the cluster.
                dead = self.revoked[rnd.randrange(len(self.revoked))]
                victim = self.is_victim(dead)
                if await self.eng.validate(dead) is not None:
                    self.resurrected.add(dead)
            elif roll < 0.85:
                await self.eng.validate(token)
            elif roll < 0.93:
                read = False
                op = "create"
                user = f"drill-{rnd.randrange(5000)}"
                victim = slot_of_tag(self.eng.keys.user_tag(user)) in self.victim_slots
                new = await self.eng.create(user_id=user, data={"d": 1})
                self.created.append(new.token)
                self.live.append(new.token)
            else:
                read = False
                op = "revoke"
                try:
                    deleted = await self.eng.revoke(token)
                except EngineError:
                    # ReplicationIncomplete: deleted on the primary, unconfirmed on the
                    # replicas; OutcomeUnknown or a late reply: maybe deleted. Not counted as
                    # acknowledged, and its session may be gone: not a lost create either.
                    self.unconfirmed_revokes.add(token)
                    raise
                if deleted:
                    self.revoked.append(token)
        except ReplicationIncomplete as exc:
            error, failure = "ReplicationIncomplete", exc
        except EngineUnavailable as exc:
            error, failure = "EngineUnavailable", exc
        except EngineError as exc:
            error, failure = type(exc).__name__, exc
        b = self._bucket()
        self.calls += 1
        if error is None:
            b.ok += 1
            took = time.monotonic() - start
            (b.victim_latencies if victim else b.latencies).append(took)
            if victim and read:
                b.victim_validations.append(took)
        else:
            took = time.monotonic() - start
            if took > self.slowest_failure:
                self.slowest_failure = took
                self.slowest_failure_what = f"{op}: {type(failure).__name__}: {failure}"
            b.errors[error] = b.errors.get(error, 0) + 1
            if victim:
                b.victim_errors += 1
                if read:
                    b.victim_read_errors += 1
            else:
                b.other_errors += 1
                self.other_errors_by_type[error] = self.other_errors_by_type.get(error, 0) + 1

    async def run(self) -> None:
        start = time.monotonic()
        sent = 0
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while sent < due:
                task = asyncio.create_task(self._one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _replica_of(cl: Cluster, primary: ClusterNode) -> ClusterNode:
    for node in cl.replicas():
        if node.master_id == primary.node_id:
            return node
    raise RuntimeError(f"no live replica of {primary.port}")


Fault = Callable[[Cluster, ClusterNode, DrillReport], Awaitable[None]]


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def _kill_primary(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    killed = time.monotonic()
    await _in_thread(cl.kill, victim.port)
    await _wait_promoted(cl, victim, report)
    report.promoted_s = time.monotonic() - killed
    await _in_thread(cl.restart, victim.port)
    await _in_thread(cl.wait_healthy, 30.0)
    report.fault_notes.append(
        f"killed primary {victim.port}; its replica was promoted; it rejoined"
    )


async def _wait_promoted(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        nodes = await _in_thread(lambda: cl.nodes)
        covered = sum(
            b - a + 1
            for n in nodes
            if n.role == "primary" and n.alive and n.port != victim.port
            for a, b in n.slots
        )
        if covered == 16384:
            return
        await asyncio.sleep(0.1)
    report.fault_notes.append("no promotion within 20 s")


def _replica_failover(mode: Literal["takeover"] | None) -> Fault:
    """``CLUSTER FAILOVER [TAKEOVER]`` on the victim's replica, the primary still alive."""

    async def fault(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
        replica = _replica_of(cl, victim)
        await _in_thread(cl.failover, replica.port, mode)
        await _in_thread(cl.wait_healthy, 30.0)
        command = "CLUSTER FAILOVER" + (" TAKEOVER" if mode else "")
        report.fault_notes.append(f"{command} on replica {replica.port} of {victim.port}")

    return fault


async def _forced_failover(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    replica = _replica_of(cl, victim)
    await _in_thread(cl.pause, victim.port)
    try:
        await _in_thread(cl.failover, replica.port, "force")
    finally:
        await _in_thread(cl.resume, victim.port)
    await _in_thread(cl.wait_healthy, 30.0)
    old = await _in_thread(cl.node, victim.port)
    report.fault_notes.append(
        f"SIGSTOP {victim.port}, CLUSTER FAILOVER FORCE on {replica.port}, SIGCONT: "
        f"old primary is now a {old.role}"
    )
    if old.role != "replica":
        raise RuntimeError(f"old primary {victim.port} came back as {old.role}")


async def _script_flush(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    for _ in range(3):
        for node in await _in_thread(lambda: cl.nodes):
            if node.alive:
                await _in_thread(cl.run, node.port, "SCRIPT", "FLUSH")
        await asyncio.sleep(0.5)
    report.fault_notes.append("SCRIPT FLUSH on every node, three times, 0.5 s apart")


async def _kill_loop(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    rnd = random.Random(11)
    for round_ in range(10):
        primaries = await _in_thread(cl.primaries)
        target = rnd.choice(primaries)
        await _in_thread(cl.kill, target.port)
        await _wait_promoted(cl, target, report)
        await _in_thread(cl.restart, target.port)
        await _in_thread(cl.wait_healthy, 30.0)
        report.fault_notes.append(f"round {round_ + 1}: killed {target.port}, promoted, restarted")


async def _shard_down(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    replica = _replica_of(cl, victim)
    await _in_thread(cl.kill, replica.port)
    await _in_thread(cl.kill, victim.port)
    await asyncio.sleep(6.0)
    await _in_thread(cl.restart, victim.port)
    await _in_thread(cl.restart, replica.port)
    await _in_thread(cl.wait_healthy, 30.0)
    report.fault_notes.append(
        f"killed primary {victim.port} and its replica {replica.port} for 6 s; restarted "
        "(no persistence: that shard's sessions are gone, reported as lost creates)"
    )


async def _replica_down(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    replica = _replica_of(cl, victim)
    await _in_thread(cl.pause, replica.port)
    try:
        await asyncio.sleep(4.0)
    finally:
        await _in_thread(cl.resume, replica.port)
    await _in_thread(cl.wait_healthy, 30.0)
    report.fault_notes.append(
        f"SIGSTOP replica {replica.port} of primary {victim.port} for 4 s: durable writes "
        "wait wait_timeout for it, validations must not"
    )


async def _restart_all(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    ports = list(cl.ports)
    for port in ports:  # crash-restart, every node, same ports
        await _in_thread(cl.kill, port)
    for port in ports:
        await _in_thread(cl.restart, port)
    await _in_thread(cl.wait_healthy, 60.0)
    report.fault_notes.append(
        "every node killed and restarted on the same ports (the drill cluster runs with AOF, "
        "appendfsync everysec: up to 1 s of writes may be lost)"
    )


async def _slow_node(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    for _ in range(5):
        # DEBUG SLEEP blocks the server; a second connection sends it.
        await _in_thread(cl.run, victim.port, "DEBUG", "SLEEP", 0.3)
        await asyncio.sleep(0.4)
    report.fault_notes.append(f"5 x DEBUG SLEEP 0.3 on primary {victim.port}, 0.4 s apart")


async def _minority_primary(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    """The victim primary loses every other node; the client still reaches it.

    It keeps taking writes until it notices it is in the minority (node timeout), while the
    majority promotes its replica: what it acknowledged in between is lost at the heal.
    """
    parts = _partitions(cl)
    cut = time.monotonic()
    await _in_thread(parts.isolate, victim.port)
    await _wait_promoted(cl, victim, report)
    report.promoted_s = time.monotonic() - cut
    await asyncio.sleep(PARTITION_AFTER_PROMOTION)
    await _heal(cl, cut, report)
    old = await _in_thread(cl.node, victim.port)
    report.fault_notes.append(
        f"isolated primary {victim.port} from every node (the client still reached it); "
        f"its replica was promoted; healed; the old primary is now a {old.role}"
    )


async def _client_cut(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    """The client loses one primary; the cluster itself sees nothing wrong."""
    parts = _partitions(cl)
    cut = time.monotonic()
    await _in_thread(parts.cut_client, victim.port)
    await asyncio.sleep(CLIENT_CUT_SECONDS)
    await _heal(cl, cut, report)
    report.fault_notes.append(
        f"cut the client off primary {victim.port} for {CLIENT_CUT_SECONDS:.0f} s (packets "
        "dropped, no RST); the nodes still reached each other; healed"
    )


async def _partition_heal(cl: Cluster, victim: ClusterNode, report: DrillReport) -> None:
    """Split 3/3: the victim with the other primaries' replicas (a minority of primaries)
    against the other primaries with the victim's replica; heal once the majority promoted."""
    parts = _partitions(cl)
    replica = _replica_of(cl, victim)
    primaries = await _in_thread(cl.primaries)
    replicas = await _in_thread(cl.replicas)
    majority = [p.port for p in primaries if p.port != victim.port] + [replica.port]
    minority = [victim.port] + [r.port for r in replicas if r.port != replica.port]
    cut = time.monotonic()
    await _in_thread(parts.split, majority, minority)
    await _wait_promoted(cl, victim, report)
    report.promoted_s = time.monotonic() - cut
    await asyncio.sleep(PARTITION_AFTER_PROMOTION)
    await _heal(cl, cut, report)
    report.fault_notes.append(
        f"split {majority} | {minority}; the majority promoted {replica.port}; healed"
    )


async def _heal(cl: Cluster, cut: float, report: DrillReport) -> None:
    await _in_thread(_partitions(cl).heal)
    report.healed_s = time.monotonic() - cut
    await _in_thread(cl.wait_healthy, 30.0)


def _partitions(cl: Cluster) -> Partitions:
    if not isinstance(cl, LocalCluster):
        raise RuntimeError("partition drills need a LocalCluster started with netns=True")
    return cl.partitions


PARTITION_AFTER_PROMOTION = 1.0  # seconds the partition lasts once the majority promoted
CLIENT_CUT_SECONDS = 4.0


SCENARIOS: dict[str, Fault] = {
    "kill-primary": _kill_primary,
    "manual-failover": _replica_failover(None),
    "forced-failover": _forced_failover,
    "takeover": _replica_failover("takeover"),
    "script-flush": _script_flush,
    "kill-loop": _kill_loop,
    "shard-down": _shard_down,
    "restart-all": _restart_all,
    "slow-node": _slow_node,
    "replica-down": _replica_down,
    "minority-primary": _minority_primary,
    "client-cut": _client_cut,
    "partition-heal": _partition_heal,
}

PARTITION_SCENARIOS = ("minority-primary", "client-cut", "partition-heal")
"""Drills on a cluster whose nodes are separate hosts (``LocalCluster(netns=True)``)."""


def cluster_options(scenario: str, full_coverage: bool = False) -> dict[str, Any]:
    """LocalCluster arguments a scenario needs."""
    extra = {"cluster-require-full-coverage": "yes" if full_coverage else "no"}
    if scenario == "slow-node":
        extra["enable-debug-command"] = "local"
    opts: dict[str, Any] = {"primaries": 3, "replicas_per_primary": 1, "extra_config": extra}
    if scenario == "restart-all":
        opts["persistence"] = True
    if scenario in PARTITION_SCENARIOS:
        opts["netns"] = True
    return opts


async def run_drill(
    scenario: str,
    cl: Cluster,
    *,
    sessions: int = 50_000,
    rate: float = 5_000,
    wait_replicas: int = 0,
    settle: float = 2.0,
    prefix: str = "drill",
    progress: Progress | None = None,
    replica_fallback_after: float | None = None,
) -> DrillReport:
    """Run one drill on a healthy cluster ``cl`` and return its report."""
    fault = SCENARIOS[scenario]
    progress = progress or Progress()
    report = DrillReport(scenario, wait_replicas, sessions, rate)
    report.replica_fallback_after = replica_fallback_after
    ca_file = getattr(cl, "ca_file", None)  # a TLS LocalCluster's test CA
    settings = EngineSettings(
        url=cl.url,
        tls_ca_file=str(ca_file) if ca_file else None,
        key_prefix=prefix,
        command_timeout=0.5,
        wait_replicas=wait_replicas,
        wait_timeout=0.5,
        idle_ttl=3600,
        absolute_ttl=7200,
        replica_fallback_after=replica_fallback_after,
    )
    async with SessionEngine(settings) as eng:
        progress.done(f"[{scenario}] loading {sessions:,} sessions ...")
        tokens: list[str] = []
        for start in range(0, sessions, 2000):
            news = await asyncio.gather(
                *(
                    eng.create(user_id=f"drill-{i % 5000}")
                    for i in range(start, min(sessions, start + 2000))
                )
            )
            tokens += [n.token for n in news]
        victim = (await asyncio.to_thread(cl.primaries))[0]
        load = _Load(eng, tokens, rate, victim.port)
        load.victim_slots = {s for a, b in victim.slots for s in range(a, b + 1)}
        runner = asyncio.create_task(load.run())
        await asyncio.sleep(settle)
        progress.done(f"[{scenario}] fault on primary {victim.port} ...")
        load.fault_at = time.monotonic()
        try:
            await fault(cl, victim, report)
        except Exception as exc:
            report.fault_notes.append(f"fault step failed: {exc!r}")
        fault_done = time.monotonic()
        await asyncio.sleep(settle)
        await load.stop()
        await runner
        # Afterwards: acknowledged creates must still exist; revoked tokens must stay dead.
        progress.done(f"[{scenario}] checking acknowledged writes ...")
        report.acked_creates = len(load.created)
        alive_revoked = set(load.revoked) | load.unconfirmed_revokes
        created_alive = [t for t in load.created if t not in alive_revoked]
        results = await _validate_all(eng, created_alive)
        report.lost_creates = sum(1 for r in results if r is None)
        report.acked_revokes = len(load.revoked)
        again = await _validate_all(eng, load.revoked)
        load.resurrected.update(t for t, r in zip(load.revoked, again, strict=True) if r)
        report.resurrected = len(load.resurrected)
    _summarise(report, load, fault_done)
    return report


async def _validate_all(eng: SessionEngine, tokens: Sequence[str]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(tokens), 5000):
        chunk = tokens[start : start + 5000]
        for attempt in range(20):
            try:
                out += await eng.validate_many(chunk)
                break
            except EngineUnavailable:
                await asyncio.sleep(0.25 * (attempt + 1))
        else:
            raise EngineUnavailable("cluster did not answer after the drill")
    return out


def _summarise(report: DrillReport, load: _Load, fault_done: float) -> None:
    assert load.fault_at is not None
    fault_bucket = int((load.fault_at - load.t0) / BUCKET)
    first_error: float | None = None
    last_error: float | None = None
    first_read_error: float | None = None
    last_read_error: float | None = None
    before: list[float] = []
    during: list[float] = []
    victim_before: list[float] = []
    victim_during: list[float] = []
    fault_end_bucket = int((fault_done - load.t0) / BUCKET)
    for i in sorted(load.buckets):
        b = load.buckets[i]
        n_err = sum(b.errors.values())
        if b.latencies or b.victim_latencies:
            lat = sorted(b.latencies + b.victim_latencies)
            b.p99_ms = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
        (before if i < fault_bucket else during).extend(b.latencies)
        if i < fault_bucket:
            victim_before.extend(b.victim_validations)
        elif i <= fault_end_bucket:
            victim_during.extend(b.victim_validations)
        t = (i - fault_bucket) * BUCKET
        if n_err:
            first_error = t if first_error is None else first_error
            last_error = t + BUCKET
        if b.victim_read_errors:
            first_read_error = t if first_read_error is None else first_read_error
            last_read_error = t + BUCKET
        report.failed_victim_validations += b.victim_read_errors
        for k, v in b.errors.items():
            report.errors_by_type[k] = report.errors_by_type.get(k, 0) + v
        report.failed_victim += b.victim_errors
        report.failed_other += b.other_errors
        report.timeline.append(
            {
                "t": round(t, 1),
                "ok": b.ok,
                "errors": n_err,
                "victim_errors": b.victim_errors,
                "other_errors": b.other_errors,
                "p99_ms": b.p99_ms,
            }
        )
    report.calls = load.calls
    report.slowest_failure_s = load.slowest_failure
    report.slowest_failure = load.slowest_failure_what
    report.other_errors_by_type = dict(load.other_errors_by_type)
    report.failed_calls = report.failed_victim + report.failed_other
    report.first_error_s = first_error
    report.last_error_s = last_error
    if first_error is not None and last_error is not None:
        report.error_window_s = last_error - first_error
    if first_read_error is not None and last_read_error is not None:
        report.validate_error_window_s = last_read_error - first_read_error
    report.recovered_s = last_error
    report.other_p99_ms_before = _p99_ms(before)
    report.other_p99_ms_during = _p99_ms(during)
    report.victim_validate_p99_ms_before = _p99_ms(victim_before)
    report.victim_validate_p99_ms_during = _p99_ms(victim_during)


def _p99_ms(values: list[float]) -> float | None:
    return percentile_ms(values, 99) if values else None


def write_chart(report: DrillReport, path: Path) -> bool:
    """Timeline PNG: successes and errors per 100 ms, the fault at t=0. False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    t = [p["t"] for p in report.timeline]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    ax.plot(t, [p["ok"] * 10 for p in report.timeline], label="successes/s", color="tab:green")
    ax.bar(
        t,
        [p["victim_errors"] * 10 for p in report.timeline],
        width=0.1,
        color="tab:red",
        label="errors/s, faulted shard",
    )
    ax.bar(
        t,
        [p["other_errors"] * 10 for p in report.timeline],
        width=0.1,
        color="black",
        label="errors/s, other shards",
    )
    ax.axvline(0, color="grey", linestyle="--")
    ax.set_ylabel("calls/s")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(
        f"drill {report.scenario}: error window {report.error_window_s:.2f}s, "
        f"{report.failed_calls} failed, {report.lost_creates} creates lost, "
        f"{report.resurrected} resurrected"
    )
    ax2.plot(t, [p["p99_ms"] or 0 for p in report.timeline], color="tab:blue")
    ax2.set_ylabel("p99 ms (ok calls)")
    ax2.set_xlabel("seconds from the fault")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


REMOTE_SCENARIOS = ("manual-failover", "takeover", "script-flush", "slow-node")
"""What a drill can do to a cluster it did not start: commands only, no signals."""


def _drill_and_report(
    args: argparse.Namespace, name: str, cl: Cluster, prefix: str, reports: list[DrillReport]
) -> bool:
    """Run one scenario, print and write its report; ``True`` if it found no loss."""
    report = run(
        run_drill(
            name,
            cl,
            sessions=args.sessions,
            rate=args.rate,
            wait_replicas=args.wait_replicas,
            prefix=prefix,
            replica_fallback_after=args.replica_fallback,
        )
    )
    reports.append(report)
    out = report_stream(args)
    print(report.summary(), file=out)
    stem = args.out / f"{report.scenario}-w{report.wait_replicas}"
    stem.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2))
    if write_chart(report, stem.with_suffix(".png")):
        print(f"  chart: {stem.with_suffix('.png')}", file=out)
    else:
        print("  chart: skipped (pip install matplotlib, or the 'charts' extra)", file=out)
    print(f"  json: {stem.with_suffix('.json')}", file=out)
    return not (report.resurrected or report.failed_other)


def _remote_refusal(args: argparse.Namespace, names: Sequence[str]) -> str | None:
    if not args.i_own_this_cluster:
        return (
            "refusing: a drill fails over nodes and floods the cluster with sessions; "
            "add --i-own-this-cluster if that is fine for this cluster"
        )
    refused = [n for n in names if n not in REMOTE_SCENARIOS]
    if refused:
        return (
            f"{', '.join(refused)}: needs process control (kill/SIGSTOP) or the nodes' "
            f"network (partitions); with --url only "
            f"{', '.join(REMOTE_SCENARIOS)} run. Use a LocalCluster (drop --url)."
        )
    return None


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine drill`` (on the one parser of the CLI)."""
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--url", help="drill this cluster (needs --i-own-this-cluster)")
    parser.add_argument("--i-own-this-cluster", action="store_true")
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=5_000, help="offered ops/s")
    parser.add_argument("--wait-replicas", type=int, default=0)
    parser.add_argument(
        "--replica-fallback",
        type=float,
        default=None,
        metavar="SECONDS",
        help="validations ask a replica when the primary has not answered in this time "
        "(EngineSettings.replica_fallback_after)",
    )
    parser.add_argument(
        "--full-coverage",
        action="store_true",
        help="cluster-require-full-coverage yes (default no)",
    )
    parser.add_argument("--out", type=Path, default=Path("drill-results"))
    parser.add_argument(
        "--tls", action="store_true", help="the local cluster speaks only TLS (every link)"
    )
    add_json_option(parser, "every scenario's report (a list)")


def execute(args: argparse.Namespace) -> int:
    """``python -m engine drill SCENARIO [...]``."""
    everything = REMOTE_SCENARIOS if args.url else tuple(SCENARIOS)
    names = list(everything) if args.scenario == "all" else [args.scenario]
    if args.url and (refusal := _remote_refusal(args, names)):
        print(refusal, file=sys.stderr)
        return 2
    no_netns = netns_unavailable()
    if args.tls:
        no_netns = "the namespace cluster of the partition drills has no TLS mode (yet)"
    if no_netns and not args.url:
        skipped = [n for n in names if n in PARTITION_SCENARIOS]
        if skipped and len(names) == 1:
            print(f"{names[0]}: cannot run here: {no_netns}", file=sys.stderr)
            return 2
        for name in skipped:
            print(f"{name}: skipped: {no_netns}", file=report_stream(args))
        names = [n for n in names if n not in skipped]
    args.out.mkdir(parents=True, exist_ok=True)
    clean = True
    reports: list[DrillReport] = []
    for name in names:
        if args.url:
            # A cluster we did not start: our own prefix, removed afterwards (roles stay
            # changed: that is what the drill does).
            remote = RemoteCluster(args.url)
            prefix = f"drill-{os.urandom(4).hex()}"
            try:
                clean &= _drill_and_report(args, name, remote, prefix, reports)
            finally:
                remote.delete_prefix(prefix)
        else:
            options = cluster_options(name, args.full_coverage)
            with LocalCluster(**options, tls=args.tls) as local:
                clean &= _drill_and_report(args, name, local, "drill", reports)
    write_json(args.json, [asdict(r) for r in reports])
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine drill ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["drill", *(sys.argv[2:] if argv is None else argv)])
