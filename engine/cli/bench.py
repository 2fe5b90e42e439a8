"""``python -m engine bench``: our hot path against the baselines, in ONE run.

Same cluster, same keys, same concurrency for every row:

1. ``SessionEngine.validate`` (auto-pipelined transport)
2. ``SessionEngine.validate_many`` in batches of 100 and 10,000
3. redis-py asyncio ``RedisCluster``: naive GET + PEXPIRE per validation
4. redis-py asyncio ``RedisCluster``: EVALSHA of the same validate script per call (the ratio base)
5. valkey-glide GET, when installed
6. ``redis-benchmark -P 16`` EVALSHA of the same script on one primary (the server's limit)

plus latency at a fixed offered load (open loop, measured from the scheduled send time, so
queueing is not hidden) and the client's CPU time per validation. The machine is shared and
noisy: read the ratios, which are measured minutes apart on the same cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, Final

from .._engine import SessionEngine
from .._errors import EngineError
from .._keys import slot_of_tag
from .._run import run
from .._scripts import scripts
from .._settings import EngineSettings
from .._tokens import parse_token
from .console import (
    Progress,
    add_json_option,
    add_markdown_option,
    markdown_table,
    print_table,
    report_stream,
    right,
    write_json,
)
from .console import percentile_ms as _pct

__all__ = ["main"]


@dataclass
class Row:
    """One measured line of the table."""

    name: str
    ops_per_s: float | None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    cpu_us_per_op: float | None = None
    note: str = ""
    ratio: float | None = None


async def _closed_loop(
    name: str,
    op: Callable[[int], Awaitable[Any]],
    *,
    concurrency: int,
    seconds: float,
    progress: Progress,
    per_call: int = 1,
) -> Row:
    """``concurrency`` tasks call ``op`` back to back for ``seconds``; throughput + latency."""
    latencies: list[float] = []
    done = 0
    warm_until = time.perf_counter() + min(1.0, seconds / 5)
    while time.perf_counter() < warm_until:  # warm connections, scripts, caches
        await asyncio.gather(*(op(i) for i in range(min(concurrency, 64))))
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    cpu0 = time.process_time()

    async def worker(w: int) -> None:
        nonlocal done
        perf = time.perf_counter
        i = w
        while perf() < stop_at:
            t0 = perf()
            await op(i)
            latencies.append(perf() - t0)
            done += per_call
            i += concurrency
            if done % 4096 < per_call:
                progress.update(f"{name}: {done / (perf() - start):,.0f}/s")

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    progress.done(f"{name}: {done / elapsed:,.0f}/s")
    return Row(
        name,
        done / elapsed,
        _pct(latencies, 50),
        _pct(latencies, 99),
        _pct(latencies, 99.9),
        cpu / done * 1e6 if done else None,
    )


async def _open_loop(
    name: str,
    op: Callable[[int], Awaitable[Any]],
    *,
    rate: float,
    seconds: float,
    progress: Progress,
) -> Row:
    """Offer ``rate`` calls/s whatever the replies do; latency from the scheduled time."""
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    total = int(rate * seconds)
    tick = 0.001

    errors = 0
    cpu0 = time.process_time()

    lags: list[float] = []

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await op(i)
        except EngineError:
            errors += 1  # counted, not hidden: a timeout is a latency of "too long"
            return
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        lags.append(t1 - scheduled)

    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate))
        while sent < due:
            scheduled = start + sent / rate
            task = asyncio.create_task(one(sent, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        progress.update(f"{name}: offered {sent:,}/{total:,}")
        await asyncio.sleep(tick)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    progress.done(f"{name}: p99 {_pct(latencies, 99) or 0:.2f} ms at {rate:,.0f}/s offered")
    return Row(
        name,
        len(latencies) / elapsed,
        _pct(latencies, 50),
        _pct(latencies, 99),
        _pct(latencies, 99.9),
        cpu / max(1, total) * 1e6,
        note=(
            f"open loop, {rate:,.0f}/s offered, {errors} errors; latency from the call; "
            f"from its scheduled time (incl. the generator's ~1 ms timer) p99 "
            f"{_pct(lags, 99) or 0:.2f} ms"
        ),
    )


def _redis_benchmark(host: str, port: int, sha: str, key: str, requests: int) -> Row:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return Row("redis-benchmark -P 16 EVALSHA (one primary)", None, note="not installed")
    cmd = [exe, "-h", host, "-p", str(port), "-n", str(requests), "-c", "32", "-P", "16"]
    cmd += ["--csv", "EVALSHA", sha, "1", key, "a", "1", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    match = re.search(r'"[^"]*","([0-9.]+)"', out)
    rate = float(match.group(1)) if match else None
    return Row(
        "redis-benchmark -P 16 EVALSHA (one primary)",
        rate,
        note="C client, 32 conns x 16 pipelined: the server-side limit of ONE primary",
    )


async def _bench(args: argparse.Namespace, url: str) -> dict[str, Any]:
    progress = Progress()
    rows: list[Row] = []
    settings = EngineSettings(url=url, key_prefix="bench", idle_ttl=3600, absolute_ttl=7200)
    async with SessionEngine(settings) as eng:
        progress.done(f"creating {args.sessions:,} sessions ...")
        tokens: list[str] = []
        keys: list[str] = []  # the same sessions' keys, for the baselines
        for start in range(0, args.sessions, 2000):
            batch = range(start, min(args.sessions, start + 2000))
            news = await asyncio.gather(
                *(eng.create(user_id=f"bench-{i}", data={"i": i, "role": "user"}) for i in batch)
            )
            tokens += [n.token for n in news]
            keys += [
                eng.keys.session(eng.keys.user_tag(f"bench-{i}"), n.session.session_id)
                for i, n in zip(batch, news, strict=True)
            ]
        n = len(tokens)
        rnd = random.Random(1)
        order = [rnd.randrange(n) for _ in range(1 << 16)]
        mask = len(order) - 1

        async def ours(i: int) -> Any:
            return await eng.validate(tokens[order[i & mask]])

        rows.append(
            await _closed_loop(
                "engine validate",
                ours,
                concurrency=args.concurrency,
                seconds=args.seconds,
                progress=progress,
            )
        )
        for batch_size in (100, 10_000):
            batches = [
                [tokens[order[(b * batch_size + j) & mask]] for j in range(batch_size)]
                for b in range(8)
            ]

            async def many(i: int, _b: list[list[str]] = batches) -> Any:
                return await eng.validate_many(_b[i % len(_b)])

            conc = max(1, min(args.concurrency, 200_000 // batch_size // 8))
            row = await _closed_loop(
                f"engine validate_many x{batch_size:,}",
                many,
                concurrency=conc,
                seconds=args.seconds,
                progress=progress,
                per_call=batch_size,
            )
            row.note = f"{conc} concurrent batches; latency is per batch"
            rows.append(row)

        validate = scripts()["validate"]
        slack = str(round(settings.refresh_slack * settings.idle_ttl * 1000))
        idle_ms = round(settings.idle_ttl * 1000)
        from redis.asyncio import Redis  # noqa: PLC0415
        from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415

        # Enough connections that redis-py never runs out (its default is 100 per node).
        pool = 4 * args.concurrency + 64
        rp: Any = (
            RedisCluster.from_url(url, max_connections=pool)
            if eng.is_cluster
            else Redis.from_url(url, max_connections=pool)
        )
        try:
            await rp.initialize() if eng.is_cluster else await rp.ping()
            await rp.script_load(validate.source)  # RedisCluster sends it to every primary

            async def naive(i: int) -> Any:
                key = keys[order[i & mask]]
                value = await rp.get(key)
                if value is not None:
                    await rp.pexpire(key, idle_ms)
                return value

            rows.append(
                await _closed_loop(
                    "redis-py GET + PEXPIRE",
                    naive,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    progress=progress,
                )
            )
            sha = validate.sha.decode()

            async def evalsha(i: int) -> Any:
                return await rp.evalsha(sha, 1, keys[order[i & mask]], "a", "1", slack)

            base = await _closed_loop(
                "redis-py EVALSHA",
                evalsha,
                concurrency=args.concurrency,
                seconds=args.seconds,
                progress=progress,
            )
            base.note = "ratio base"
            rows.append(base)
        finally:
            await rp.aclose()

        rows.append(await _glide(url, keys, order, args, progress, eng.is_cluster))

        primary = eng.transport.node_for_slot(slot_of_tag(parse_token(tokens[0])[0]))  # type: ignore[index]
        progress.done("redis-benchmark ...")
        rows.append(
            await asyncio.to_thread(
                _redis_benchmark,
                primary.host,
                primary.port,
                validate.sha.decode(),
                keys[0],
                args.server_requests,
            )
        )

        for rate in args.rate:
            rows.append(
                await _open_loop(
                    f"engine validate @ {rate:,}/s",
                    ours,
                    rate=rate,
                    seconds=args.seconds,
                    progress=progress,
                )
            )

    base_rate = base.ops_per_s or 0
    for row in rows:
        if row.ops_per_s and base_rate and not row.note.startswith("open loop"):
            row.ratio = row.ops_per_s / base_rate
    return {"rows": [asdict(r) for r in rows], "machine": _machine(), "args": vars(args)}


async def _glide(
    url: str,
    keys: Sequence[str],
    order: Sequence[int],
    args: argparse.Namespace,
    progress: Progress,
    cluster: bool,
) -> Row:
    try:
        import glide  # noqa: PLC0415
    except ImportError:
        return Row("valkey-glide GET", None, note="skipped: valkey-glide not installed")
    from urllib.parse import urlparse  # noqa: PLC0415

    u = urlparse(url)
    addr = [glide.NodeAddress(u.hostname or "127.0.0.1", u.port or 6379)]
    if cluster:
        client: Any = await glide.GlideClusterClient.create(
            glide.GlideClusterClientConfiguration(addr)
        )
    else:
        client = await glide.GlideClient.create(glide.GlideClientConfiguration(addr))
    mask = len(order) - 1

    async def get(i: int) -> Any:
        return await client.get(keys[order[i & mask]])

    try:
        row = await _closed_loop(
            "valkey-glide GET",
            get,
            concurrency=args.concurrency,
            seconds=args.seconds,
            progress=progress,
        )
    finally:
        await client.close()
    row.note = "plain GET, no refresh"
    return row


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    with (
        open("/proc/cpuinfo", encoding="utf-8")
        if os.path.exists("/proc/cpuinfo")
        else open(os.devnull, encoding="utf-8") as f
    ):
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = "unknown"
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
        m = re.search(r"v=(\S+)", out.stdout)
        redis_version = m.group(1) if m else out.stdout.strip()
    try:
        import uvloop  # noqa: PLC0415

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis": redis_version,
        "loop": loop,
        "platform": platform.platform(),
    }


def _fmt(v: float | None, spec: str) -> str | None:
    return None if v is None else format(v, spec)


COLUMNS: Final = (
    "what",
    right("ops/s"),
    right("x redis-py EVALSHA"),
    right("p50 ms"),
    right("p99 ms"),
    right("p99.9 ms"),
    right("CPU us/op"),
    "note",
)


def table_rows(result: dict[str, Any]) -> list[list[str | None]]:
    """One row per measurement, formatted, in ``COLUMNS`` order."""
    return [
        [
            r["name"],
            _fmt(r["ops_per_s"], ",.0f"),
            _fmt(r["ratio"], ".2f"),
            _fmt(r["p50_ms"], ".2f"),
            _fmt(r["p99_ms"], ".2f"),
            _fmt(r["p999_ms"], ".2f"),
            _fmt(r["cpu_us_per_op"], ".1f"),
            r["note"],
        ]
        for r in result["rows"]
    ]


def _machine_note(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, Redis {m['redis']}, "
        f"{m['loop']}."
    )


def render(result: dict[str, Any]) -> str:
    """The result as a Markdown table (what bench.md records)."""
    return markdown_table(COLUMNS, table_rows(result)) + "\n\n" + _machine_note(result)


def report(result: dict[str, Any], *, markdown: bool = False, file: IO[str] | None = None) -> None:
    """The table (rich, or Markdown for bench.md) and the machine it ran on."""
    print_table(
        "python -m engine bench",
        COLUMNS,
        table_rows(result),
        notes=[_machine_note(result)],
        markdown=markdown,
        file=file,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine bench`` (``--http``: see httpbench.py)."""
    parser.add_argument(
        "--http",
        action="store_true",
        help="GET /bare and /me under wrk for the engine and its peers "
        "(python -m engine bench --http --help)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="validate over TLS against plaintext, in one run (python -m engine bench --tls "
        "--help)",
    )
    parser.add_argument("--url", help="benchmark this cluster instead of starting one")
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument(
        "--rate",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[5_000, 20_000],
        help="fixed offered loads, calls/s, comma-separated (default 5000,20000)",
    )
    parser.add_argument("--server-requests", type=int, default=300_000)
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    add_json_option(parser)
    add_markdown_option(parser)
    parser.add_argument(
        "--network",
        action="store_true",
        help="validate over loopback and over network namespaces (veth + bridge) in one "
        "run (Linux, root; see engine/cli/netbench.py)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="--network: alternating rounds per measurement"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine bench ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["bench", *(sys.argv[2:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark; prints the table, the JSON with ``--json``."""
    if args.network:
        from .netbench import bench_networks, report_networks  # noqa: PLC0415

        result = bench_networks(args)
        result["command"] = "python -m engine " + " ".join(args.argv)
        report_networks(result, markdown=args.markdown, file=report_stream(args))
        write_json(args.json, result)
        return 0
    if args.url:
        result = run(_bench(args, args.url))
    else:
        from ..testing import LocalCluster  # noqa: PLC0415

        print(f"starting a local cluster ({args.primaries} primaries) ...", file=sys.stderr)
        with LocalCluster(primaries=args.primaries, replicas_per_primary=args.replicas) as cl:
            result = run(_bench(args, cl.url))
    result["command"] = "python -m engine " + " ".join(args.argv)
    report(result, markdown=args.markdown, file=report_stream(args))
    write_json(args.json, result)
    return 0
