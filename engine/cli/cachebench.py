"""``python -m engine bench --local-cache``: the local cache (issue 12) against its targets.

Everything in ONE run on one local cluster, so the ratios compare like with like on a
shared, noisy machine:

1. **Tracking cost and revocation delay across processes** (first, on a fresh cluster: the
   server keeps tracked keys of closed connections until the keys change, so earlier
   phases would pollute the tracking table). ``--workers`` processes, each an engine with
   the cache, cache the same ``--tracked`` sessions, started one by one; the primaries'
   ``INFO`` (``tracking_total_keys``, ``tracking_total_items``, ``used_memory``) is read
   before and after each; the primaries' CPU per invalidation message (``--fan-out-writes``
   updates of sessions every worker caches, against as many of sessions nobody caches).
   Then every worker polls ``--revocations`` of those tokens while
   this process revokes them one by one: the delay from the revoke's acknowledgement to
   the first ``None`` each worker sees (wall clock, ``time.time()``, one machine).
2. **Hits**: one process, hot tokens, a cached engine against an uncached one, alternating
   rounds: sequential awaits, ``--tasks`` long-lived tasks, and gathers of ``--tasks``
   concurrent validations; the latency
   of each hit (``perf_counter`` around each await).
3. **A realistic mix**: Zipf (``--zipf-s``) over ``--zipf-tokens`` sessions, every
   ``1 / --write-fraction``-th operation a write (update, rotate, revoke + create in turn),
   ``--mix-tasks`` concurrent tasks: throughput and hit rate, with and without the cache.
4. **Bytes per cache entry**: ``tracemalloc`` while the Zipf set fills an empty cache.
5. **The uncached path before and after the cache**: the commit before the cache
   (``--baseline-commit``, extracted with ``git archive``) and this checkout, each in a
   process of its own against the same cluster, alternating rounds; with ``--callgrind``
   also the instructions per validate (scripts/hotpath_instructions.py under valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

from rich.table import Column

from .._engine import SessionEngine
from .._errors import EngineError
from .._local_cache import LocalCache
from .._run import run
from .._settings import EngineSettings
from ..testing import until_tracking_ready
from . import CHECKOUT
from ._proc import cpu_seconds
from .bench import _machine
from .console import (
    Cell,
    Progress,
    add_json_option,
    add_markdown_option,
    markdown_table,
    print_table,
    report_stream,
    right,
    write_json,
)

__all__ = ["main", "worker_main"]

BEFORE_THE_CACHE = "6efbc59"
"""The last commit of main before the local cache (b9a3a4d)."""

_PREFIX = "cachebench"
_PAGE = 4096


# -- helpers ----------------------------------------------------------------------------


def _settings(url: str, cache_size: int, memo: int, **more: Any) -> EngineSettings:
    return EngineSettings(
        url=url,
        key_prefix=_PREFIX,
        idle_ttl=3600,
        absolute_ttl=7200,
        local_cache_size=cache_size,
        token_memo_size=memo,
        command_timeout=10,
        **more,
    )


def _cache(eng: SessionEngine) -> LocalCache:
    cache = eng._cache
    if cache is None:
        raise EngineError("this engine has no local cache")
    return cache


async def _fill(eng: SessionEngine, tokens: Sequence[str], within: float = 30.0) -> int:
    """Validate ``tokens`` until every live one is cached; the number of live ones."""
    cache = _cache(eng)
    deadline = time.monotonic() + within
    while True:
        live = 0
        for start in range(0, len(tokens), 5000):
            got = await eng.validate_many(tokens[start : start + 5000])
            live += sum(1 for s in got if s is not None)
        if len(cache.entries) >= min(live, cache.size) or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.05)


async def _create(eng: SessionEngine, count: int, user: str) -> list[str]:
    tokens: list[str] = []
    for start in range(0, count, 2000):
        batch = range(start, min(count, start + 2000))
        news = await asyncio.gather(
            *(eng.create(user_id=f"{user}{i}", data={"i": i, "role": "user"}) for i in batch)
        )
        tokens += [n.token for n in news]
    return tokens


def _pct_us(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile of durations in seconds, in microseconds."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = -(-len(ordered) * q // 100)
    return ordered[int(min(len(ordered), max(rank, 1))) - 1] * 1e6


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _rss() -> int:
    """Resident set size of this process in bytes (0 where /proc cannot tell)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


# -- 2. hits against the uncached path ------------------------------------------------


async def _sequential(eng: SessionEngine, tokens: Sequence[str], seconds: float) -> dict[str, Any]:
    """One caller awaiting validate after validate: calls/s and client CPU per call."""
    validate = eng.validate
    n = len(tokens)
    perf = time.perf_counter
    done = bad = 0
    i = 0
    stop = perf() + seconds
    cpu0 = time.process_time()
    start = perf()
    while True:
        for _ in range(256):
            if await validate(tokens[i]) is None:
                bad += 1
            i = i + 1 if i + 1 < n else 0
        done += 256
        if perf() >= stop:
            break
        # A hit never yields to the loop: without this, the cache's liveness probe would
        # not run and every entry would be dropped as "silent" after max_staleness (as it
        # should be: nothing vouches for them). A server yields between requests anyway.
        await asyncio.sleep(0)
    elapsed = perf() - start
    cpu = time.process_time() - cpu0
    return {"ops_per_s": done / elapsed, "cpu_us_per_op": cpu / done * 1e6, "none": bad}


async def _gathered(
    eng: SessionEngine, tokens: Sequence[str], seconds: float, tasks: int
) -> dict[str, Any]:
    """``tasks`` validations at once (``asyncio.gather``, as concurrent requests), again
    and again: calls/s and client CPU per call."""
    validate = eng.validate
    batches = [tokens[i : i + tasks] for i in range(0, len(tokens) - tasks + 1, tasks)]
    perf = time.perf_counter
    done = bad = 0
    stop = perf() + seconds
    cpu0 = time.process_time()
    start = perf()
    for batch in itertools.cycle(batches):
        got = await asyncio.gather(*[validate(t) for t in batch])
        bad += got.count(None)
        done += len(batch)
        if perf() >= stop:
            break
    elapsed = perf() - start
    cpu = time.process_time() - cpu0
    return {"ops_per_s": done / elapsed, "cpu_us_per_op": cpu / done * 1e6, "none": bad}


async def _tasks(
    eng: SessionEngine, tokens: Sequence[str], seconds: float, tasks: int
) -> dict[str, Any]:
    """``tasks`` long-lived tasks, each validating then yielding to the loop (as request
    handlers do between requests): calls/s and client CPU per call, without the cost of
    creating a task per call that ``gather`` pays."""
    validate = eng.validate
    n = len(tokens)
    perf = time.perf_counter
    done = bad = 0
    stop = perf() + seconds

    async def task(w: int) -> None:
        nonlocal done, bad
        i = w
        while perf() < stop:
            for _ in range(16):
                if await validate(tokens[i]) is None:
                    bad += 1
                i = (i + tasks) % n
                await asyncio.sleep(0)
            done += 16

    cpu0 = time.process_time()
    start = perf()
    await asyncio.gather(*(task(w) for w in range(tasks)))
    elapsed = perf() - start
    cpu = time.process_time() - cpu0
    return {"ops_per_s": done / elapsed, "cpu_us_per_op": cpu / done * 1e6, "none": bad}


async def _latencies(eng: SessionEngine, tokens: Sequence[str], count: int) -> dict[str, Any]:
    """``perf_counter`` around each of ``count`` sequential awaits (includes the timer's own
    ~0.1 us)."""
    validate = eng.validate
    perf = time.perf_counter
    n = len(tokens)
    samples = [0.0] * count
    for k in range(count):
        t = tokens[k % n]
        t0 = perf()
        await validate(t)
        samples[k] = perf() - t0
        if k % 256 == 255:
            await asyncio.sleep(0)  # let the liveness probe run (see _sequential)
    return {
        "samples": count,
        "p50_us": _pct_us(samples, 50),
        "p99_us": _pct_us(samples, 99),
        "p999_us": _pct_us(samples, 99.9),
        "max_us": max(samples) * 1e6 if samples else None,
    }


async def _hits(
    args: argparse.Namespace, url: str, base: SessionEngine, progress: Progress
) -> dict[str, Any]:
    hot = await _create(base, args.hot, "hot")
    memo = 4 * args.hot
    async with (
        SessionEngine(_settings(url, 2 * args.hot, memo)) as cached,
        SessionEngine(_settings(url, 0, memo)) as uncached,
    ):
        await until_tracking_ready(cached)
        await _fill(cached, hot)
        await uncached.validate_many(hot)  # connections and token memo warm alike
        cache = _cache(cached)
        modes: dict[str, Callable[[SessionEngine], Awaitable[dict[str, Any]]]] = {
            "sequential": lambda e: _sequential(e, hot, args.seconds),
            f"gather x{args.tasks}": lambda e: _gathered(e, hot, args.seconds, args.tasks),
            f"{args.tasks} tasks": lambda e: _tasks(e, hot, args.seconds, args.tasks),
        }
        rounds: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for mode, measure in modes.items():
                # Alternate which side goes first, so a trend of the machine hits both.
                order = [("cached", cached), ("uncached", uncached)]
                if r % 2:
                    order.reverse()
                for label, eng in order:
                    hits0, misses0 = cache.hits, cache.misses
                    row = await measure(eng)
                    if label == "cached":
                        looked = cache.hits - hits0 + cache.misses - misses0
                        row["hit_fraction"] = (cache.hits - hits0) / looked if looked else None
                    rounds.setdefault(f"{mode}|{label}", []).append(row)
                    progress.done(f"hits round {r + 1}, {mode}, {label}: {row['ops_per_s']:,.0f}/s")
        drops = dict(cache.drops)
        hits0 = cache.hits
        latency = await _latencies(cached, hot, args.latency_samples)
        latency["hit_fraction"] = (cache.hits - hits0) / args.latency_samples
        uncached_latency = await _latencies(
            uncached, hot, max(1, min(args.latency_samples, 20_000))
        )
    rows = []
    for key, measured in rounds.items():
        mode, label = key.split("|")
        cpu = _median([m["cpu_us_per_op"] for m in measured])
        rows.append(
            {
                "mode": mode,
                "engine": label,
                "ops_per_s": _median([m["ops_per_s"] for m in measured]),
                "cpu_us_per_op": cpu,
                # What one process would do on a core of its own: the figure that a busy,
                # shared machine disturbs least (its wall-clock rate is split with others).
                "ops_per_cpu_second": 1e6 / cpu if cpu else None,
                "hit_fraction": _median([m.get("hit_fraction") for m in measured]),
                "none": sum(m["none"] for m in measured),
                "all_rounds_ops_per_s": [m["ops_per_s"] for m in measured],
            }
        )
    by = {(row["mode"], row["engine"]): row for row in rows}
    ratios = {
        mode: by[(mode, "cached")]["ops_per_s"] / by[(mode, "uncached")]["ops_per_s"]
        for mode in modes
    }
    best_hit = max(by[(m, "cached")]["ops_per_s"] for m in modes)
    best_uncached = max(by[(m, "uncached")]["ops_per_s"] for m in modes)
    return {
        "hot_tokens": args.hot,
        "rows": rows,
        "ratio_by_mode": ratios,
        "best_hit_ops_per_s": best_hit,
        "best_uncached_ops_per_s": best_uncached,
        "ratio_best_hit_to_best_uncached": best_hit / best_uncached,
        "hit_latency": latency,
        "drops_during_rounds": {k: v for k, v in drops.items() if v},
        "uncached_latency": uncached_latency,
        "targets": {
            "hits_per_s_300k": best_hit >= 300_000,
            "ratio_10x": best_hit / best_uncached >= 10,
            "p99_hit_under_20us": (latency["p99_us"] or 1e9) < 20,
        },
    }


# -- 3. the realistic mix --------------------------------------------------------------


def _zipf_samples(n: int, s: float, count: int, seed: int = 12) -> list[int]:
    """``count`` indexes in ``range(n)``, rank r drawn with weight 1 / (r + 1) ** s; ranks
    mapped to shuffled indexes so the hot sessions are spread over the slots."""
    rnd = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))
    ranks = rnd.choices(range(n), cum_weights=cum, k=count)
    where = list(range(n))
    rnd.shuffle(where)
    return [where[r] for r in ranks]


async def _mix_round(
    eng: SessionEngine,
    tokens: list[str],
    samples: list[int],
    args: argparse.Namespace,
    offset: int,
) -> dict[str, Any]:
    write_every = max(1, round(1 / args.write_fraction)) if args.write_fraction > 0 else 0
    counter = itertools.count(offset)
    total = len(samples)
    counts = {"validations": 0, "none": 0, "unexplained_none": 0, "writes": 0, "write_errors": 0}
    # Writes in flight per session, and writes started so far: a None answer when neither
    # a write was in flight nor one started meanwhile (and the token stayed current) is a
    # live session refused, which must never happen.
    inflight: dict[int, int] = {}
    started: dict[int, int] = {}
    kinds = ("update", "rotate", "revoke+create")
    perf = time.perf_counter
    stop = perf() + args.seconds

    async def task() -> None:
        validate = eng.validate
        while perf() < stop:
            for _ in range(64):
                j = next(counter)
                idx = samples[j % total]
                if write_every and j % write_every == 0:
                    kind = kinds[(j // write_every) % 3]
                    counts["writes"] += 1
                    token = tokens[idx]
                    inflight[idx] = inflight.get(idx, 0) + 1
                    started[idx] = started.get(idx, 0) + 1
                    try:
                        if kind == "update":
                            await eng.update(token, data={"i": idx, "j": j})
                        elif kind == "rotate":
                            tokens[idx] = (await eng.rotate(token)).token
                        else:
                            await eng.revoke(token)
                            tokens[idx] = (
                                await eng.create(user_id=f"z{idx}", data={"i": idx})
                            ).token
                    except EngineError:  # a concurrent task changed it first
                        counts["write_errors"] += 1
                    finally:
                        inflight[idx] -= 1
                    continue
                counts["validations"] += 1
                token = tokens[idx]
                quiet = not inflight.get(idx)
                before = started.get(idx, 0)
                if await validate(token) is None:
                    counts["none"] += 1
                    if (
                        quiet
                        and not inflight.get(idx)
                        and started.get(idx, 0) == before
                        and tokens[idx] == token
                    ):
                        counts["unexplained_none"] += 1
            await asyncio.sleep(0)  # hits never yield: let the others and the probe run

    cache = eng._cache
    hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
    cpu0 = time.process_time()
    start = perf()
    await asyncio.gather(*(task() for _ in range(args.mix_tasks)))
    elapsed = perf() - start
    ops = counts["validations"] + counts["writes"]
    row: dict[str, Any] = {
        **counts,
        "ops_per_s": ops / elapsed,
        "validations_per_s": counts["validations"] / elapsed,
        "cpu_us_per_op": (time.process_time() - cpu0) / ops * 1e6 if ops else None,
        "hit_rate": None,
        "next_offset": next(counter),
    }
    if cache is not None:
        hits, misses = cache.hits - hits0, cache.misses - misses0
        row["hit_rate"] = hits / (hits + misses) if hits + misses else None
    return row


async def _mix(
    args: argparse.Namespace, url: str, base: SessionEngine, progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    n = args.zipf_tokens
    progress.done(f"mix: creating {n:,} sessions ...")
    tokens = await _create(base, n, "z")
    samples = _zipf_samples(n, args.zipf_s, args.mix_samples)
    memo = 2 * n + 1000
    rounds: dict[str, list[dict[str, Any]]] = {}
    offset = 0
    async with (
        SessionEngine(_settings(url, n + 1000, memo)) as cached,
        SessionEngine(_settings(url, 0, memo)) as uncached,
    ):
        await until_tracking_ready(cached)
        await _fill(cached, tokens)
        await uncached.validate_many(tokens)
        for r in range(args.rounds):
            order = [("cached", cached), ("uncached", uncached)]
            if r % 2:
                order.reverse()
            for label, eng in order:
                row = await _mix_round(eng, tokens, samples, args, offset)
                offset = row.pop("next_offset")
                rounds.setdefault(label, []).append(row)
                hit = f", hit rate {row['hit_rate']:.3f}" if row["hit_rate"] is not None else ""
                progress.done(f"mix round {r + 1}, {label}: {row['ops_per_s']:,.0f} ops/s{hit}")
        entries = len(_cache(cached).entries)
        drops = dict(_cache(cached).drops)
        invalidations = _cache(cached).invalidations
    rows = {
        label: {
            "ops_per_s": _median([m["ops_per_s"] for m in measured]),
            "validations_per_s": _median([m["validations_per_s"] for m in measured]),
            "cpu_us_per_op": _median([m["cpu_us_per_op"] for m in measured]),
            "hit_rate": _median([m["hit_rate"] for m in measured]),
            "writes": sum(m["writes"] for m in measured),
            "write_errors": sum(m["write_errors"] for m in measured),
            "none": sum(m["none"] for m in measured),
            "unexplained_none": sum(m["unexplained_none"] for m in measured),
            "validations": sum(m["validations"] for m in measured),
            "all_rounds_ops_per_s": [m["ops_per_s"] for m in measured],
        }
        for label, measured in rounds.items()
    }
    return (
        {
            "tokens": n,
            "zipf_s": args.zipf_s,
            "write_fraction": args.write_fraction,
            "tasks": args.mix_tasks,
            "rows": rows,
            "ratio": rows["cached"]["ops_per_s"] / rows["uncached"]["ops_per_s"],
            "cached_engine": {
                "entries_at_end": entries,
                "invalidations": invalidations,
                "drops": drops,
            },
        },
        tokens,
    )


# -- 4. bytes per entry ----------------------------------------------------------------


async def _entry_bytes(args: argparse.Namespace, url: str, tokens: list[str]) -> dict[str, Any]:
    """What the cache adds per entry: traced allocations while an empty cache fills."""
    count = min(args.memory_entries, len(tokens))
    subset = tokens[:count]
    async with SessionEngine(_settings(url, count + 1000, 2 * count + 1000)) as eng:
        await until_tracking_ready(eng)
        for t in subset:  # the token memo is not the cache's: fill it first
            eng._derive(t)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await _fill(eng, subset)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        entries = len(_cache(eng).entries)
    return {
        "entries": entries,
        "traced_bytes": after - before,
        "bytes_per_entry": (after - before) / entries if entries else None,
        "session_data": "{'i': N, 'role': 'user'} (30 bytes of JSON)",
    }


# -- 1. tracking cost and revocation across processes -----------------------------------

_WORKER_CODE = "import sys; from engine.cli.cachebench import worker_main; sys.exit(worker_main())"


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A cached engine in a process of its own (the revocation and tracking phases).

    Reads its configuration (JSON: url, tokens file, cache size) from the first argument,
    caches every token, prints one JSON line when ready, then obeys one JSON command per
    stdin line: ``{"poll": [indexes], ...}`` (validate them until each is ``None``, print
    when each was first seen so) or ``{"quit": true}``.
    """
    config = json.loads((list(sys.argv[1:]) if argv is None else list(argv))[0])
    config["token_list"] = json.loads(Path(config["tokens"]).read_text())
    return run(_worker(config))


async def _worker(config: dict[str, Any]) -> int:
    tokens: list[str] = config["token_list"]
    settings = _settings(config["url"], len(tokens) + 1000, 2 * len(tokens) + 1000)
    async with SessionEngine(settings) as eng:
        await until_tracking_ready(eng)
        cache = _cache(eng)
        print(json.dumps({"connected": True, "pid": os.getpid()}), flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            command = json.loads(line)
            if command.get("quit"):
                break
            if command.get("fill"):
                gc.collect()
                rss0 = _rss()
                live = await _fill(eng, tokens)
                gc.collect()
                ready = {"ready": True, "live": live, "entries": len(cache.entries)}
                print(json.dumps({**ready, "rss_before": rss0, "rss_after": _rss()}), flush=True)
                continue
            pending = set(command["poll"])
            seen: dict[int, float] = {}
            pause = command["poll_ms"] / 1000.0
            deadline = time.monotonic() + command["timeout"]
            hits0 = cache.hits
            polls = 0
            while pending and time.monotonic() < deadline:
                for i in list(pending):
                    if await eng.validate(tokens[i]) is None:
                        seen[i] = time.time()
                        pending.discard(i)
                polls += 1
                await asyncio.sleep(pause)
            reply = {"seen": seen, "polls": polls, "hits": cache.hits - hits0}
            print(json.dumps(reply), flush=True)
    return 0


def _tracking_info(cluster: Any) -> dict[str, int]:
    """The primaries' tracking table and memory, summed."""
    total = {"tracking_total_keys": 0, "tracking_total_items": 0, "used_memory": 0}
    for node in cluster.primaries():
        info = cluster.client(node.port).info("all")
        for name in total:
            total[name] += int(info.get(name, 0))
    return total


class _Worker:
    """One worker process and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not raw:
            raise EngineError(f"worker {self.proc.pid} ended early (exit {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.send({"quit": True})
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _start_worker(config: dict[str, Any]) -> _Worker:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER_CODE,
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    return _Worker(proc)


async def _processes(
    args: argparse.Namespace, cluster: Any, base: SessionEngine, progress: Progress
) -> dict[str, Any]:
    m = args.tracked
    progress.done(f"processes: creating {m:,} sessions ...")
    tokens = await _create(base, m, "t")
    workers: list[_Worker] = []
    with tempfile.TemporaryDirectory(prefix="cachebench-") as tmp:
        path = Path(tmp) / "tokens.json"
        path.write_text(json.dumps(tokens))
        config = {"url": cluster.url, "tokens": str(path)}
        steps = [{"processes": 0, **await asyncio.to_thread(_tracking_info, cluster)}]
        rss: list[dict[str, Any]] = []
        try:
            for k in range(args.workers):
                worker = await _start_worker(config)
                workers.append(worker)
                await worker.line(args.worker_timeout)  # connected, tracking on, nothing cached
                connected = await asyncio.to_thread(_tracking_info, cluster)
                worker.send({"fill": True})
                ready = await worker.line(args.worker_timeout)
                rss.append(ready)
                info = await asyncio.to_thread(_tracking_info, cluster)
                steps.append(
                    {"processes": k + 1, **info, "used_memory_connected": connected["used_memory"]}
                )
                progress.done(
                    f"process {k + 1} caches {ready['entries']:,} sessions: "
                    f"tracking_total_items {info['tracking_total_items']:,}"
                )
            revoke = list(range(min(args.revocations, m)))
            fan_out = await _fan_out_cost(args, cluster, base, tokens[len(revoke) :], progress)
            for w in workers:
                w.send({"poll": revoke, "poll_ms": args.poll_ms, "timeout": args.worker_timeout})
            await asyncio.sleep(0.2)  # every worker is polling
            sent: list[float] = []
            acked: list[float] = []
            for i in revoke:
                sent.append(time.time())
                await base.revoke(tokens[i])
                acked.append(time.time())
                await asyncio.sleep(args.revoke_gap_ms / 1000.0)
            replies = [await w.line(args.worker_timeout + 10) for w in workers]
        finally:
            for w in workers:
                await w.stop()
    from_ack: list[float] = []
    from_send: list[float] = []
    unseen = 0
    for reply in replies:
        seen = {int(i): t for i, t in reply["seen"].items()}
        for n, i in enumerate(revoke):
            if i not in seen:
                unseen += 1
                continue
            from_ack.append(seen[i] - acked[n])
            from_send.append(seen[i] - sent[n])
    # What filling the caches added, without what connecting added (each worker's two
    # connections per primary): the tracking table, key -> the ids of the clients.
    first = steps[1]
    first_cost = first["used_memory"] - first["used_memory_connected"]
    added_items = steps[-1]["tracking_total_items"] - first["tracking_total_items"]
    added_cost = sum(s["used_memory"] - s["used_memory_connected"] for s in steps[2:])
    per_entry_rss = [
        (r["rss_after"] - r["rss_before"]) / r["entries"] for r in rss if r.get("entries")
    ]
    return {
        "fan_out": fan_out,
        "tracking": {
            "sessions": m,
            "processes": args.workers,
            "steps": steps,
            "bytes_per_tracked_key_first_process": first_cost
            / max(1, first["tracking_total_keys"]),
            "bytes_per_item_each_further_process": added_cost / added_items
            if added_items
            else None,
            "worker_rss_bytes_per_entry": _median(per_entry_rss),
            "note": "used_memory after filling minus after connecting, per worker",
        },
        "revocation": {
            "processes": args.workers,
            "revocations": len(revoke),
            "poll_ms": args.poll_ms,
            "samples": len(from_ack),
            "unseen": unseen,
            "from_ack_p50_ms": _ms(from_ack, 50),
            "from_ack_p99_ms": _ms(from_ack, 99),
            "from_ack_max_ms": max(from_ack) * 1000 if from_ack else None,
            "from_send_p50_ms": _ms(from_send, 50),
            "from_send_p99_ms": _ms(from_send, 99),
            "from_send_max_ms": max(from_send) * 1000 if from_send else None,
        },
    }


async def _fan_out_cost(
    args: argparse.Namespace,
    cluster: Any,
    base: SessionEngine,
    tracked: list[str],
    progress: Progress,
) -> dict[str, Any]:
    """The primaries' CPU per update of a session every worker caches (one invalidation
    message to each) against an update of a session nobody caches: the cost of fan-out.
    The workers are idle meanwhile, so no re-read follows the invalidations."""
    count = min(args.fan_out_writes, len(tracked))
    untracked = await _create(base, count, "u")
    pids = [n.pid for n in cluster.primaries() if n.pid is not None]

    async def update_all(tokens: list[str]) -> float:
        cpu0 = cpu_seconds(pids)
        for start in range(0, len(tokens), 100):
            await asyncio.gather(
                *(base.update(t, data={"v": 2}) for t in tokens[start : start + 100])
            )
        return cpu_seconds(pids) - cpu0

    items0 = (await asyncio.to_thread(_tracking_info, cluster))["tracking_total_items"]
    alone = await update_all(untracked)
    watched = await update_all(tracked[:count])
    items1 = (await asyncio.to_thread(_tracking_info, cluster))["tracking_total_items"]
    messages = items0 - items1  # each invalidation removes one (key, client) item
    per_message = (watched - alone) / messages if messages > 0 else None
    progress.done(
        f"fan-out: {count:,} updates, {messages:,} invalidation messages, server CPU "
        f"{alone * 1e6 / count:.1f} us per update unwatched, {watched * 1e6 / count:.1f} watched"
    )
    return {
        "updates": count,
        "holders_per_key": args.workers,
        "invalidation_messages": messages,
        "server_cpu_us_per_update_unwatched": alone * 1e6 / count,
        "server_cpu_us_per_update_watched": watched * 1e6 / count,
        "server_cpu_us_per_message": None if per_message is None else per_message * 1e6,
        "note": "primaries' utime + stime from /proc, 10 ms ticks",
    }


def _ms(samples: list[float], q: float) -> float | None:
    us = _pct_us(samples, q)
    return None if us is None else us / 1000.0


# -- 5. the uncached path before and after ---------------------------------------------

_UNCACHED_CODE = r"""
import asyncio, itertools, json, sys, time
import engine
from engine import EngineSettings, SessionEngine

async def main(url, prefix, count, seconds, tasks):
    s = EngineSettings(url=url, key_prefix=prefix, idle_ttl=3600, absolute_ttl=7200)
    async with SessionEngine(s) as eng:
        tokens = [n.token for n in await asyncio.gather(
            *(eng.create(user_id=f"b{i}") for i in range(count)))]
        await eng.validate_many(tokens)
        out = {"engine": engine.__file__}
        validate = eng.validate
        for mode in ("sequential", "gather"):
            done = 0
            stop = time.perf_counter() + seconds
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            batches = [tokens[i:i + tasks] for i in range(0, count - tasks + 1, tasks)]
            for batch in itertools.cycle(batches):
                if mode == "sequential":
                    for t in batch:
                        await validate(t)
                else:
                    await asyncio.gather(*[validate(t) for t in batch])
                done += len(batch)
                if time.perf_counter() >= stop:
                    break
            elapsed = time.perf_counter() - t0
            out[mode] = {"ops_per_s": done / elapsed,
                         "cpu_us_per_op": (time.process_time() - cpu0) / done * 1e6}
    print(json.dumps(out))

try:
    import uvloop
    run = uvloop.run
except ImportError:
    run = asyncio.run
run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
"""


def _extract(commit: str, into: Path) -> Path:
    """The library of ``commit`` (engine/ and lua/) from this checkout's git history."""
    out = subprocess.run(
        ["git", "-C", str(CHECKOUT), "archive", "--format=tar", commit, "engine", "lua"],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_uncached(checkout: Path, url: str, prefix: str, args: argparse.Namespace) -> Any:
    code = [sys.executable, "-c", _UNCACHED_CODE, url, prefix]
    code += [str(args.hot), str(args.seconds), str(args.tasks)]
    done = subprocess.run(
        code,
        capture_output=True,
        text=True,
        timeout=60 + 4 * args.seconds,
        check=True,
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _callgrind(checkout: Path, url: str, n: int, tmp: Path) -> int:
    """Instructions of one run of scripts/hotpath_instructions.py (all of the process)."""
    out = tmp / f"cg.{checkout.name}.{n}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(CHECKOUT / "scripts" / "hotpath_instructions.py"),
            url,
            "validate",
            str(n),
        ],
        capture_output=True,
        timeout=1800,
        check=True,
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    match = re.search(r"^(?:summary|totals):\s*(\d+)", out.read_text(), re.M)
    if match is None:
        raise EngineError(f"no instruction total in {out}")
    return int(match.group(1))


async def _before_after(args: argparse.Namespace, url: str, progress: Progress) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cachebench-old-") as tmp:
        old = await asyncio.to_thread(_extract, args.baseline_commit, Path(tmp) / "old")
        sides = {"before": old, "after": CHECKOUT}
        rounds: dict[str, list[Any]] = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for label in order:
                prefix = f"{_PREFIX}-{label}-{r}"
                got = await asyncio.to_thread(_run_uncached, sides[label], url, prefix, args)
                rounds[label].append(got)
                progress.done(
                    f"uncached round {r + 1}, {label}: "
                    f"{got['sequential']['ops_per_s']:,.0f}/s sequential, "
                    f"{got['gather']['ops_per_s']:,.0f}/s gathered"
                )
        instructions: dict[str, Any] | None = None
        if args.callgrind:
            instructions = {}
            low, high = args.callgrind
            for label, checkout in sides.items():
                progress.done(f"callgrind, {label} ...")
                lo = await asyncio.to_thread(_callgrind, checkout, url, low, Path(tmp))
                hi = await asyncio.to_thread(_callgrind, checkout, url, high, Path(tmp))
                instructions[label] = {
                    "low": lo,
                    "high": hi,
                    "per_validate": (hi - lo) / (high - low),
                }
            instructions["after_over_before"] = (
                instructions["after"]["per_validate"] / instructions["before"]["per_validate"]
            )
    summary: dict[str, Any] = {"baseline_commit": args.baseline_commit, "engines": {}}
    for label, measured in rounds.items():
        summary["engines"][label] = measured[0]["engine"]
        for mode in ("sequential", "gather"):
            summary[f"{mode}|{label}"] = {
                "ops_per_s": _median([m[mode]["ops_per_s"] for m in measured]),
                "cpu_us_per_op": _median([m[mode]["cpu_us_per_op"] for m in measured]),
                "all_rounds_ops_per_s": [m[mode]["ops_per_s"] for m in measured],
            }
    for mode in ("sequential", "gather"):
        b, a = summary[f"{mode}|before"], summary[f"{mode}|after"]
        summary[f"{mode}|after_over_before_ops"] = a["ops_per_s"] / b["ops_per_s"]
        summary[f"{mode}|after_over_before_cpu"] = a["cpu_us_per_op"] / b["cpu_us_per_op"]
    summary["instructions"] = instructions
    return summary


# -- the whole run ---------------------------------------------------------------------


async def _bench(args: argparse.Namespace, cluster: Any) -> dict[str, Any]:
    progress = Progress()
    url = cluster.url
    result: dict[str, Any] = {}
    async with SessionEngine(_settings(url, 0, 65_536)) as base:
        procs = await _processes(args, cluster, base, progress)
        result.update(procs)
        result["hits"] = await _hits(args, url, base, progress)
        mix, tokens = await _mix(args, url, base, progress)
        result["mix"] = mix
        progress.done("bytes per entry (tracemalloc) ...")
        result["entry_memory"] = await _entry_bytes(args, url, tokens)
    result["uncached_before_after"] = await _before_after(args, url, progress)
    return result


Table = tuple[str, Sequence[str | Column], list[list[Cell]], list[str]]


def _tables(result: dict[str, Any]) -> list[Table]:
    """Every figure: (title, columns, rows, notes) per table."""
    h = result["hits"]
    lat = h["hit_latency"]
    ratios = ", ".join(f"{m} {r:.1f}x" for m, r in h["ratio_by_mode"].items())
    hits: Table = (
        "hits against the uncached validate",
        [
            "mode",
            "engine",
            right("validations/s"),
            right("client CPU us/op"),
            right("per CPU-second"),
            right("hit fraction"),
        ],
        [
            [
                row["mode"],
                row["engine"],
                f"{row['ops_per_s']:,.0f}",
                f"{row['cpu_us_per_op']:.2f}",
                f"{row['ops_per_cpu_second']:,.0f}",
                None if row["hit_fraction"] is None else f"{row['hit_fraction']:.3f}",
            ]
            for row in h["rows"]
        ],
        [
            f"cached / uncached: {ratios}; best hit / best uncached "
            f"{h['ratio_best_hit_to_best_uncached']:.1f}x. "
            f"Hit latency ({lat['samples']:,} samples): p50 {lat['p50_us']:.2f} us, "
            f"p99 {lat['p99_us']:.2f} us, p99.9 {lat['p999_us']:.2f} us, "
            f"max {lat['max_us']:.0f} us."
        ],
    )
    mix = result["mix"]
    mixed: Table = (
        f"Zipf s={mix['zipf_s']} over {mix['tokens']:,} sessions, "
        f"{mix['write_fraction']:.0%} writes, {mix['tasks']} tasks",
        [
            "engine",
            right("ops/s"),
            right("validations/s"),
            right("hit rate"),
            right("client CPU us/op"),
            right("None answers (unexplained)"),
        ],
        [
            [
                label,
                f"{row['ops_per_s']:,.0f}",
                f"{row['validations_per_s']:,.0f}",
                None if row["hit_rate"] is None else f"{row['hit_rate']:.3f}",
                f"{row['cpu_us_per_op']:.2f}",
                f"{row['none']:,} ({row['unexplained_none']})",
            ]
            for label, row in mix["rows"].items()
        ],
        [],
    )
    rev = result["revocation"]
    fo = result["fan_out"]
    tr = result["tracking"]
    em = result["entry_memory"]
    tracking: Table = (
        "processes caching the same sessions: the primaries' tracking table",
        [
            right("processes"),
            right("tracking_total_keys"),
            right("tracking_total_items"),
            right("used_memory"),
        ],
        [
            [
                step["processes"],
                f"{step['tracking_total_keys']:,}",
                f"{step['tracking_total_items']:,}",
                f"{step['used_memory']:,}",
            ]
            for step in tr["steps"]
        ],
        [
            f"Revocation seen by {rev['processes']} processes ({rev['samples']} samples, "
            f"{rev['unseen']} unseen, polling every {rev['poll_ms']} ms): from the "
            f"acknowledged revoke p50 {rev['from_ack_p50_ms']:.2f} ms, "
            f"p99 {rev['from_ack_p99_ms']:.2f} ms, max {rev['from_ack_max_ms']:.2f} ms.",
            f"Fan-out: {fo['updates']:,} updates of sessions cached by {fo['holders_per_key']} "
            f"processes sent {fo['invalidation_messages']:,} invalidations; primaries' CPU per "
            f"update {fo['server_cpu_us_per_update_unwatched']:.1f} us unwatched, "
            f"{fo['server_cpu_us_per_update_watched']:.1f} us watched: "
            f"{_num2(fo['server_cpu_us_per_message'])} us per message.",
            f"Server: {tr['bytes_per_tracked_key_first_process']:.0f} B per tracked key (first "
            f"process), {_num(tr['bytes_per_item_each_further_process'])} B per further "
            f"(key, process). Client: {_num(em['bytes_per_entry'])} B per cache entry "
            f"(tracemalloc, {em['entries']:,} entries); worker RSS "
            f"{_num(tr['worker_rss_bytes_per_entry'])} B per entry (incl. the token memo).",
        ],
    )
    ba = result["uncached_before_after"]
    ins = ba["instructions"]
    before_after: Table = (
        f"the uncached validate before the cache ({ba['baseline_commit']}) and now",
        [
            "mode",
            right("before /s"),
            right("after /s"),
            right("after / before ops"),
            right("after / before CPU"),
        ],
        [
            [
                mode,
                f"{ba[f'{mode}|before']['ops_per_s']:,.0f}",
                f"{ba[f'{mode}|after']['ops_per_s']:,.0f}",
                f"{ba[f'{mode}|after_over_before_ops']:.3f}",
                f"{ba[f'{mode}|after_over_before_cpu']:.3f}",
            ]
            for mode in ("sequential", "gather")
        ],
        [
            f"Instructions per validate: before {ins['before']['per_validate']:,.0f}, after "
            f"{ins['after']['per_validate']:,.0f} ({ins['after_over_before']:.3f}x)."
        ]
        if ins
        else [],
    )
    m = result["machine"]
    last = [
        f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, Redis {m['redis']}, "
        f"{m['loop']}; load average {result['load_average']['start']} at the start, "
        f"{result['load_average']['end']} at the end."
    ]
    if "command" in result:
        last.append(f"command: {result['command']}")
    before_after[3].extend(last)
    return [hits, mixed, tracking, before_after]


def render(result: dict[str, Any]) -> str:
    """Markdown tables of every figure (what bench.md records)."""
    return "\n\n".join(
        "\n\n".join([markdown_table(columns, rows), *notes])
        for _, columns, rows, notes in _tables(result)
    )


def report(result: dict[str, Any], *, markdown: bool = False, file: IO[str] | None = None) -> None:
    """The tables (rich, or Markdown for bench.md) with their notes."""
    for title, columns, rows, notes in _tables(result):
        print_table(title, columns, rows, notes=notes, markdown=markdown, file=file)
        (file or sys.stdout).write("\n")


def _num2(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        pair = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError("expected LOW,HIGH (e.g. 640,3200)") from None
    if not 0 < pair[0] < pair[1]:
        raise argparse.ArgumentTypeError("expected 0 < LOW < HIGH")
    return pair


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine bench --local-cache``."""
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--hot", type=int, default=1000, help="hot tokens of the hit phase")
    parser.add_argument("--tasks", type=int, default=64, help="validations per gather")
    parser.add_argument("--latency-samples", type=int, default=200_000, help="timed hits")
    parser.add_argument("--zipf-tokens", type=int, default=100_000)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--write-fraction", type=float, default=0.01)
    parser.add_argument("--mix-tasks", type=int, default=32)
    parser.add_argument("--mix-samples", type=int, default=1 << 20, help="Zipf draws, cycled")
    parser.add_argument("--memory-entries", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=4, help="cached processes")
    parser.add_argument("--tracked", type=int, default=20_000, help="sessions each caches")
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument(
        "--fan-out-writes", type=int, default=10_000, help="updates of cached sessions"
    )
    parser.add_argument("--revoke-gap-ms", type=float, default=10.0)
    parser.add_argument("--poll-ms", type=float, default=1.0, help="workers' polling period")
    parser.add_argument("--worker-timeout", type=float, default=60.0)
    parser.add_argument("--baseline-commit", default=BEFORE_THE_CACHE)
    parser.add_argument(
        "--callgrind",
        type=_pair,
        metavar="LOW,HIGH",
        help="also count instructions per validate under valgrind (e.g. 640,3200; slow)",
    )
    parser.add_argument("--primaries", type=int, default=3)
    add_json_option(parser)
    add_markdown_option(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine bench --local-cache ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["bench", "--local-cache", *(sys.argv[3:] if argv is None else argv)])


def _is_commit(ref: str) -> bool:
    """``ref`` names a commit of this checkout (False without git or outside a checkout)."""
    if shutil.which("git") is None or ref.startswith("-"):
        return False
    cmd = ["git", "-C", str(CHECKOUT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"]
    return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0


def _check(args: argparse.Namespace) -> None:
    positive = [
        *("seconds", "rounds", "hot", "tasks", "latency_samples", "zipf_tokens"),
        *("mix_tasks", "mix_samples", "memory_entries", "workers", "tracked"),
        *("revocations", "fan_out_writes", "poll_ms", "worker_timeout"),
    ]
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    if args.hot < args.tasks:
        raise SystemExit("--hot must be >= --tasks")
    if not 0 <= args.write_fraction < 1:
        raise SystemExit("--write-fraction must be in [0, 1)")
    if args.callgrind and shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    if args.callgrind and not (CHECKOUT / "scripts" / "hotpath_instructions.py").exists():
        raise SystemExit(f"--callgrind needs a checkout: no scripts/ in {CHECKOUT}")
    # The baseline comes from git history: refuse now, not after minutes of measuring.
    if not _is_commit(args.baseline_commit):
        raise SystemExit(
            f"--baseline-commit {args.baseline_commit!r} is not a commit of {CHECKOUT} "
            "(the comparison needs a git checkout with that history)"
        )


def execute(args: argparse.Namespace) -> int:
    """Start a cluster, measure, print the tables (and JSON with ``--json``)."""
    from ..testing import LocalCluster  # noqa: PLC0415

    _check(args)
    load0 = os.getloadavg()
    started = time.time()
    print(f"starting a local cluster ({args.primaries} primaries) ...", file=sys.stderr)
    with LocalCluster(primaries=args.primaries, replicas_per_primary=0) as cluster:
        result = run(_bench(args, cluster))
    result["machine"] = _machine()
    result["load_average"] = {
        "start": [round(x, 2) for x in load0],
        "end": [round(x, 2) for x in os.getloadavg()],
    }
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    result["seconds_taken"] = round(time.time() - started, 1)
    result["command"] = "python -m engine " + " ".join(args.argv)
    report(result, markdown=args.markdown, file=report_stream(args))
    write_json(args.json, result)
    return 0
