"""``python -m engine demo``: the engine on a real local six-node cluster, in about a minute.

Starts a ``LocalCluster`` (or uses ``--url``), creates sessions for many users, validates at
full speed, does a bulk lookup, rotates and revokes, shows a revocation crossing processes,
appends chat history, then kills a primary under load and shows the engine riding through
the failover. Prints a report and stops everything it started.

The engine runs with its local cache (``--local-cache-size``, 0 turns it off): the report
gives its hit rate, and a second process (a peer engine with the cache, started by the
demo) holds tokens in its cache while this one revokes them; the peer polls them and the
report gives how long each revocation took to reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .._engine import SessionEngine
from .._errors import EngineUnavailable
from .._keys import slot_of_tag
from .._run import run
from .._settings import EngineSettings
from .._tokens import parse_token
from .console import (
    Progress,
    add_json_option,
    percentile_ms,
    print_table,
    report_stream,
    write_json,
)

__all__ = ["main", "peer_main"]

_PEER_TOKENS = 20  # revoked one by one while the peer process polls them
_PEER_GAP = 0.02  # seconds between two revocations
_PEER_POLL = 0.001  # the peer's poll period: the resolution of the delays shown
_PEER_SCRIPT = "from engine.cli.demo import peer_main; peer_main()"


@dataclass
class Report:
    """The demo's report: a line per figure for the table, the numbers for ``--json``."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, float | int | None] = field(default_factory=dict)

    def add(self, name: str, value: str, **figures: float | int | None) -> None:
        self.lines.append((name, value))
        self.figures.update(figures)

    def print(self, out: IO[str]) -> None:
        print_table("report", ["figure", "value"], self.lines, file=out)

    def as_json(self) -> dict[str, Any]:
        return {"figures": self.figures, "report": dict(self.lines)}


async def _create_sessions(
    eng: SessionEngine, sessions: int, users: int, progress: Progress
) -> list[str]:
    tokens: list[str] = []
    next_i = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_i
        while next_i < sessions:
            i = next_i
            next_i += 1
            new = await eng.create(user_id=f"user-{i % users}", data={"n": i, "plan": "pro"})
            tokens.append(new.token)
            progress.update(
                f"creating sessions {len(tokens):>7,}/{sessions:,} "
                f"({len(tokens) / (time.perf_counter() - start):,.0f}/s)"
            )

    await asyncio.gather(*(worker() for _ in range(256)))
    return tokens


async def _validate_for(
    eng: SessionEngine, tokens: Sequence[str], seconds: float, progress: Progress
) -> tuple[int, int, list[float], float]:
    count = 0
    hits = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    cpu0 = time.process_time()

    async def worker(seed: int) -> None:
        nonlocal count, hits
        rnd = random.Random(seed)
        n = len(tokens)
        perf = time.perf_counter
        while perf() < stop_at:
            t0 = perf()
            if await eng.validate(tokens[rnd.randrange(n)]) is not None:
                hits += 1
            latencies.append(perf() - t0)
            count += 1
            if count % 32 == 0:
                # A local-cache hit returns without yielding to the loop: without this, a
                # task with a run of hits holds the loop, the others' latency soars and
                # the cache's liveness probe starves (its node's entries drop as silent).
                await asyncio.sleep(0)
            if count % 512 == 0:
                progress.update(
                    f"validating {count:>9,} ({count / (perf() - start):,.0f}/s, hits {hits:,})"
                )

    await asyncio.gather(*(worker(i) for i in range(256)))
    cpu = time.process_time() - cpu0
    return count, hits, latencies, cpu


# -- a revocation crossing processes ----------------------------------------------------


def peer_main() -> None:
    """The peer process: a second engine with the local cache (settings as JSON on stdin)."""
    run(_peer(json.loads(sys.stdin.readline())))


async def _peer(cfg: dict[str, Any]) -> None:
    settings = EngineSettings(url=cfg["url"], key_prefix=cfg["prefix"], local_cache_size=1000)
    tokens: list[str] = cfg["tokens"]
    async with SessionEngine(settings) as eng:
        # Validate until one whole round is answered from the local cache (tracking is set
        # up in the background after the first validation connects).
        deadline = time.monotonic() + 15
        while True:
            hits = (await eng.stats()).local_hits
            assert all(await eng.validate_many(tokens)), "the demo's tokens must be live"
            if (await eng.stats()).local_hits - hits == len(tokens):
                break
            if time.monotonic() > deadline:
                print(json.dumps({"error": "the tokens never got into the local cache"}))
                return
            await asyncio.sleep(0.05)
        print("cached", flush=True)
        gone: dict[int, float] = {}
        end = time.monotonic() + 15
        while len(gone) < len(tokens) and time.monotonic() < end:
            answers = await eng.validate_many(tokens)  # local hits until invalidated
            now = time.monotonic()
            for i, session in enumerate(answers):
                if session is None and i not in gone:
                    gone[i] = now
            await asyncio.sleep(_PEER_POLL)
        stats = await eng.stats()
        print(
            json.dumps(
                {
                    "gone": gone,
                    "local_hits": stats.local_hits,
                    "local_invalidations": stats.local_invalidations,
                }
            ),
            flush=True,
        )


async def _revocation_across_processes(
    eng: SessionEngine, url: str, prefix: str, tokens: list[str], progress: Progress, report: Report
) -> None:
    """A peer process caches ``tokens``; this one revokes them; how long until it sees it."""
    progress.update(f"starting a peer process that caches {len(tokens)} tokens ...")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    peer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PEER_SCRIPT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(json.dumps({"url": url, "prefix": prefix, "tokens": tokens}).encode())
        peer.stdin.write(b"\n")
        await peer.stdin.drain()
        line = await asyncio.wait_for(peer.stdout.readline(), 60)
        if line.strip() != b"cached":
            report.add("revocation across processes", f"peer failed: {line.decode()[:200]}")
            return
        acked: list[float] = []
        for token in tokens:
            await eng.revoke(token)
            acked.append(time.monotonic())
            await asyncio.sleep(_PEER_GAP)
        result = json.loads(await asyncio.wait_for(peer.stdout.readline(), 60))
    finally:
        if peer.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(peer.wait(), 10)
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
    gone = {int(i): t for i, t in result.get("gone", {}).items()}
    # The peer may see the invalidation before this process reads the revoke's reply.
    delays = sorted(max(0.0, gone[i] - acked[i]) * 1000 for i in gone)
    missed = len(tokens) - len(delays)
    text = (
        f"{len(delays)}/{len(tokens)} revocations seen by the peer process: "
        f"p50 {delays[len(delays) // 2]:.1f} ms, max {delays[-1]:.1f} ms after the revoke "
        f"returned (it polls every {_PEER_POLL * 1000:.0f} ms; it answered "
        f"{result.get('local_hits', 0):,} validations from its cache)"
        if delays
        else "the peer saw none of the revocations"
    )
    progress.done(f"revocation across processes: {text}")
    report.add("revocation across processes", text + (f"; {missed} NOT seen" if missed else ""))


@dataclass
class _Timeline:
    start: float
    buckets: dict[int, list[int]] = field(default_factory=dict)  # 100 ms -> [ok, err]
    first_error: float | None = None
    last_error: float | None = None
    other_errors: int = 0
    victim_errors: int = 0
    ok: int = 0

    def record(self, ok: bool, victim: bool) -> None:
        now = time.monotonic()
        bucket = self.buckets.setdefault(int((now - self.start) * 10), [0, 0])
        if ok:
            self.ok += 1
            bucket[0] += 1
            return
        bucket[1] += 1
        if victim:
            self.victim_errors += 1
        else:
            self.other_errors += 1
        self.first_error = self.first_error or now
        self.last_error = now

    def sparkline(self) -> Iterator[str]:
        if not self.buckets:
            return
        last = max(self.buckets)
        row = []
        for b in range(last + 1):
            ok, err = self.buckets.get(b, [0, 0])
            row.append("x" if err and not ok else ("!" if err else "."))
        for i in range(0, len(row), 60):
            yield f"{i / 10:5.1f}s {''.join(row[i : i + 60])}"


async def _failover(
    eng: SessionEngine, cl: object, tokens: Sequence[str], progress: Progress, report: Report
) -> None:
    from ..testing import LocalCluster  # noqa: PLC0415 - only when the demo owns a cluster

    assert isinstance(cl, LocalCluster)
    victim_tag = parse_token(tokens[0])[0]  # type: ignore[index]
    victim = cl.primary_for_key("{" + victim_tag + "}")
    timeline = _Timeline(start=time.monotonic())
    killed_at: float | None = None
    recovered_at: float | None = None
    stop = asyncio.Event()
    by_victim = [
        parse_token(t) is not None
        and eng.transport.node_for_slot(slot_of_tag(parse_token(t)[0])).port == victim.port  # type: ignore[index]
        for t in tokens
    ]
    victim_tokens = [t for t, v in zip(tokens, by_victim, strict=True) if v]
    other_tokens = [t for t, v in zip(tokens, by_victim, strict=True) if not v]

    async def load(seed: int, pool: list[str], victim_pool: bool) -> None:
        nonlocal recovered_at
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                ok = await eng.validate(pool[rnd.randrange(len(pool))]) is not None
            except EngineUnavailable:
                ok = False
            timeline.record(ok, victim_pool)
            if (
                ok
                and victim_pool
                and killed_at is not None
                and recovered_at is None
                and timeline.last_error is not None
            ):
                recovered_at = time.monotonic()
            await asyncio.sleep(0.002)  # bounded rate: ~500/s per task

    tasks = [asyncio.create_task(load(i, victim_tokens, True)) for i in range(4)]
    tasks += [asyncio.create_task(load(100 + i, other_tokens, False)) for i in range(4)]
    await asyncio.sleep(1.0)
    progress.done(f"killing primary 127.0.0.1:{victim.port} (SIGKILL) under load ...")
    killed_at = time.monotonic()
    await asyncio.to_thread(cl.kill, victim.port)
    limit = killed_at + 20.0
    while recovered_at is None and time.monotonic() < limit:
        gap = time.monotonic() - killed_at
        progress.update(
            f"failover: {gap:4.1f}s since kill, errors on its slots {timeline.victim_errors:,}, "
            f"elsewhere {timeline.other_errors}"
        )
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    if recovered_at is None:
        progress.done("the shard did not recover within 20 s", style="bold red")
        report.add("failover", "NOT recovered within 20 s")
    else:
        first = timeline.first_error or recovered_at
        progress.done(f"recovered: {recovered_at - killed_at:.2f}s after the kill")
        report.add(
            "failover gap",
            f"{recovered_at - first:.2f}s of errors on the killed shard's slots "
            f"({recovered_at - killed_at:.2f}s kill -> first success; node timeout 2 s)",
        )
    report.add(
        "errors during failover",
        f"{timeline.victim_errors:,} on the dead shard, {timeline.other_errors} elsewhere "
        f"(of {timeline.ok + timeline.victim_errors + timeline.other_errors:,} calls)",
    )
    progress.chart(
        "timeline (100 ms per mark: '.' ok, '!' some errors, 'x' only errors):",
        timeline.sparkline(),
    )
    progress.done("restarting the killed node: it rejoins as a replica")
    await asyncio.to_thread(cl.restart, victim.port)
    await asyncio.to_thread(cl.wait_healthy, 30.0)


async def _demo(args: argparse.Namespace, url: str, cl: object | None) -> int:
    progress = Progress()
    report = Report()
    out = report_stream(args)
    settings = EngineSettings(
        url=url, key_prefix=args.prefix, local_cache_size=args.local_cache_size
    )
    async with SessionEngine(settings) as eng:
        before = await eng.stats()
        mem0 = sum(before.used_memory_bytes.values())
        mode = before.mode
        print(f"engine open: {mode}, {before.primaries} primaries", file=out)

        t0 = time.perf_counter()
        tokens = await _create_sessions(eng, args.sessions, args.users, progress)
        dt = time.perf_counter() - t0
        progress.done(f"created {len(tokens):,} sessions for {args.users:,} users in {dt:.1f}s")
        report.add("create", f"{len(tokens) / dt:,.0f} sessions/s", create_per_s=len(tokens) / dt)

        count, hits, lat, cpu = await _validate_for(eng, tokens, args.seconds, progress)
        rate = count / args.seconds
        progress.done(f"validated {count:,} tokens in {args.seconds:.0f}s")
        cached = f", local cache of {args.local_cache_size:,}" if args.local_cache_size else ""
        report.add(
            "validate",
            f"{rate:,.0f}/s with 256 concurrent tasks, one process{cached}",
            validate_per_s=rate,
        )
        p50, p99, p999 = (percentile_ms(lat, q) for q in (50, 99, 99.9))
        report.add(
            "validate latency",
            f"p50 {p50 or 0:.2f} ms, p99 {p99 or 0:.2f} ms, p99.9 {p999 or 0:.2f} ms",
            validate_p50_ms=p50,
            validate_p99_ms=p99,
            validate_p999_ms=p999,
        )
        report.add(
            "client CPU",
            f"{cpu / count * 1e6:.1f} us per validation",
            client_cpu_us_per_validation=cpu / count * 1e6,
        )

        sample = random.sample(tokens, min(10_000, len(tokens)))
        t0 = time.perf_counter()
        found = await eng.validate_many(sample)
        dt = time.perf_counter() - t0
        progress.done(f"bulk lookup: {len(sample):,} tokens in {dt * 1e3:.0f} ms")
        report.add(
            "validate_many",
            f"{len(sample) / dt:,.0f} sessions/s (batch {len(sample):,})",
            validate_many_per_s=len(sample) / dt,
        )
        assert all(s is not None for s in found)

        rotated = [await eng.rotate(t) for t in tokens[:500]]
        dead_after_rotate = sum(1 for s in await eng.validate_many(tokens[:500]) if s is None)
        revoked = sum([await eng.revoke(n.token) for n in rotated[:250]])
        dead_after_revoke = sum(
            1 for s in await eng.validate_many([n.token for n in rotated[:250]]) if s is None
        )
        tokens = [n.token for n in rotated[250:]] + tokens[500:]
        n_users = await eng.revoke_user("user-1")
        progress.done(
            f"rotated 500 (old tokens dead: {dead_after_rotate}), revoked {revoked} "
            f"(dead: {dead_after_revoke}), revoke_user('user-1') ended {n_users} sessions"
        )
        alive = [s is not None for s in await eng.validate_many(tokens)]
        tokens = [t for t, ok in zip(tokens, alive, strict=True) if ok]
        if args.local_cache_size and len(tokens) > _PEER_TOKENS:
            doomed, tokens = tokens[:_PEER_TOKENS], tokens[_PEER_TOKENS:]
            await _revocation_across_processes(eng, url, args.prefix, doomed, progress, report)

        for i in range(200):
            await eng.chat_append(f"user-{i % 20}", "support", {"role": "user", "text": f"#{i}"})
        history = await eng.chat_history("user-0", "support", limit=5)
        progress.done(f"chat: 200 messages in 20 rooms; user-0's last: {history[-1]['text']}")

        after = await eng.stats()
        mem1 = sum(after.used_memory_bytes.values())
        per = (mem1 - mem0) / max(1, len(tokens))
        report.add("active sessions", f"{after.active_sessions:,} (estimate)")
        report.add("memory", f"~{per:,.0f} bytes per session, primaries only, incl. indexes")
        report.add(
            "hit rate",
            f"{hits / max(1, count):.1%} in the full-speed phase; engine stats: "
            f"{after.validations:,} validations, misses: unknown {after.misses.unknown} "
            "(the rotated/revoked tokens the demo checked), "
            f"malformed {after.misses.malformed}",
        )
        if args.local_cache_size:
            looked_up = after.local_hits + after.local_misses
            drops = ", ".join(f"{k} {v:,}" for k, v in after.local_drops.items() if v)
            report.add(
                "local cache",
                f"hit rate {after.local_hits / max(1, looked_up):.1%} "
                f"({after.local_hits:,} hits, {after.local_misses:,} misses), "
                f"{after.local_entries:,} entries, {after.local_invalidations:,} "
                f"invalidations received; drops: {drops or 'none'}",
            )
        else:
            report.add("local cache", "off (--local-cache-size 0)")

        if cl is not None and mode == "cluster" and not args.no_failover:
            await _failover(eng, cl, tokens, progress, report)
        elif args.no_failover:
            report.add("failover", "skipped (--no-failover)")
        else:
            report.add("failover", "skipped (not a cluster this demo started)")
    print(file=out)
    report.print(out)
    write_json(args.json, report.as_json())
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine demo`` (on the one parser of the CLI)."""
    parser.add_argument("--url", help="use this cluster instead of starting one")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="full-speed validation time")
    parser.add_argument("--prefix", default="demo", help="key prefix (default: demo)")
    parser.add_argument("--no-failover", action="store_true", help="skip killing a primary")
    parser.add_argument(
        "--local-cache-size",
        type=int,
        default=100_000,
        help="the engine's local cache, in sessions (0: off)",
    )
    add_json_option(parser, "the report's figures")


def execute(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    if args.local_cache_size < 0:
        print("error: --local-cache-size must be >= 0", file=sys.stderr)
        return 2
    if args.url:
        return run(_demo(args, args.url, None))
    from ..testing import LocalCluster  # noqa: PLC0415

    out = report_stream(args)
    print("starting a local cluster: 3 primaries + 3 replicas ...", file=out, flush=True)
    t0 = time.perf_counter()
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        print(f"cluster up in {time.perf_counter() - t0:.1f}s at {cl.url}", file=out)
        with contextlib.suppress(KeyboardInterrupt):
            return run(_demo(args, cl.url, cl))
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine demo ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["demo", *(sys.argv[2:] if argv is None else argv)])
