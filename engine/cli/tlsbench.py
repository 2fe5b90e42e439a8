"""``python -m engine bench --tls``: what TLS costs, plaintext and TLS clusters in ONE run.

Two local clusters of the same shape, one plaintext and one speaking only TLS (every link),
the same sessions on each. Measurements alternate (plain, TLS, plain, TLS, ...) so a noisy
shared machine hits both alike; the table shows the median of the rounds for each figure. Per row:
validations/s, latency, the client's CPU per validation (``process_time``), and the
servers' CPU per validation (``/proc/<pid>/stat`` of the primaries): TLS costs on both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any, Final

from .._engine import SessionEngine
from .._run import run
from .._settings import EngineSettings
from ._proc import cpu_seconds
from .bench import Row, _closed_loop, _fmt, _machine
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

__all__ = ["main"]


async def _measure(
    name: str,
    op: Callable[[int], Awaitable[Any]],
    pids: Sequence[int],
    args: argparse.Namespace,
    progress: Progress,
    per_call: int = 1,
    concurrency: int | None = None,
) -> Row:
    server0 = cpu_seconds(pids)
    row = await _closed_loop(
        name,
        op,
        concurrency=concurrency or args.concurrency,
        seconds=args.seconds,
        progress=progress,
        per_call=per_call,
    )
    if row.ops_per_s:
        # Includes the warm-up calls too, a small overestimate alike for both clusters.
        spent = cpu_seconds(pids) - server0
        row.note = f"{spent / (row.ops_per_s * args.seconds) * 1e6:.1f}"
    return row


async def _load(eng: SessionEngine, sessions: int) -> list[str]:
    tokens: list[str] = []
    for start in range(0, sessions, 2000):
        batch = range(start, min(sessions, start + 2000))
        news = await asyncio.gather(*(eng.create(user_id=f"b-{i}", data={"i": i}) for i in batch))
        tokens += [n.token for n in news]
    return tokens


async def _bench(args: argparse.Namespace, clusters: dict[str, Any]) -> dict[str, Any]:
    progress = Progress()
    engines: dict[str, SessionEngine] = {}
    tokens: dict[str, list[str]] = {}
    pids: dict[str, list[int]] = {}
    rounds: dict[str, list[Row]] = {}
    try:
        for label, cl in clusters.items():
            ca = cl.ca_file
            settings = EngineSettings(
                url=cl.url,
                tls_ca_file=str(ca) if ca else None,
                key_prefix="tlsbench",
                idle_ttl=3600,
                absolute_ttl=7200,
            )
            engines[label] = await SessionEngine(settings).open()
            progress.done(f"{label}: creating {args.sessions:,} sessions ...")
            tokens[label] = await _load(engines[label], args.sessions)
            pids[label] = [n.pid for n in cl.primaries() if n.pid is not None]
        for r in range(args.rounds):
            for label, eng in engines.items():
                toks = tokens[label]
                count = len(toks)

                async def one(
                    i: int, _e: SessionEngine = eng, _t: list[str] = toks, _n: int = count
                ) -> Any:
                    return await _e.validate(_t[(i * 7919) % _n])

                batch = [toks[(j * 104729) % count] for j in range(100)]

                async def many(i: int, _e: SessionEngine = eng, _b: list[str] = batch) -> Any:
                    return await _e.validate_many(_b)

                row = await _measure(
                    f"validate, {label} (round {r + 1})", one, pids[label], args, progress
                )
                rounds.setdefault(f"validate|{label}", []).append(row)
                row = await _measure(
                    f"validate_many x100, {label} (round {r + 1})",
                    many,
                    pids[label],
                    args,
                    progress,
                    per_call=100,
                    concurrency=16,
                )
                rounds.setdefault(f"validate_many x100|{label}", []).append(row)
    finally:
        for eng in engines.values():
            await eng.aclose()
    rows = []
    for key, measured in rounds.items():
        what, label = key.split("|")

        def median(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else None

        rows.append(
            {
                "what": what,
                "cluster": label,
                "ops_per_s": median([x.ops_per_s for x in measured]),
                "p50_ms": median([x.p50_ms for x in measured]),
                "p99_ms": median([x.p99_ms for x in measured]),
                "client_cpu_us_per_op": median([x.cpu_us_per_op for x in measured]),
                "server_cpu_us_per_op": median(
                    [float(x.note) if x.note else None for x in measured]
                ),
                "all_rounds_ops_per_s": [x.ops_per_s for x in measured],
                "all_rounds_client_cpu_us_per_op": [x.cpu_us_per_op for x in measured],
            }
        )
    return {"rows": rows, "machine": _machine()}


COLUMNS: Final = (
    "what",
    "cluster",
    right("ops/s"),
    right("TLS / plain ops"),
    right("p50 ms"),
    right("p99 ms"),
    right("client CPU us/op"),
    right("server CPU us/op"),
)


def table_rows(result: dict[str, Any]) -> list[list[str | None]]:
    """One row per operation and cluster, with the TLS / plaintext ratio on TLS rows."""
    by = {(r["what"], r["cluster"]): r for r in result["rows"]}
    rows = []
    for r in result["rows"]:
        plain = by.get((r["what"], "plaintext"))
        ratio = (
            r["ops_per_s"] / plain["ops_per_s"]
            if r["cluster"] == "TLS" and plain and plain["ops_per_s"] and r["ops_per_s"]
            else None
        )
        rows.append(
            [
                r["what"],
                r["cluster"],
                _fmt(r["ops_per_s"], ",.0f"),
                _fmt(ratio, ".2f"),
                _fmt(r["p50_ms"], ".2f"),
                _fmt(r["p99_ms"], ".2f"),
                _fmt(r["client_cpu_us_per_op"], ".1f"),
                _fmt(r["server_cpu_us_per_op"], ".1f"),
            ]
        )
    return rows


def _notes(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    notes = [
        f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, Redis {m['redis']}, "
        f"{m['loop']}. Each figure: the median of {result.get('rounds', '?')} alternating rounds."
    ]
    if "command" in result:
        notes.append(f"command: {result['command']}")
    return notes


def render(result: dict[str, Any]) -> str:
    """Markdown: one line per operation and cluster, with TLS / plaintext ratios."""
    return "\n\n".join([markdown_table(COLUMNS, table_rows(result)), *_notes(result)])


def report(result: dict[str, Any], *, markdown: bool = False, file: IO[str] | None = None) -> None:
    """The table (rich, or Markdown for bench.md), the machine and the command."""
    print_table(
        "python -m engine bench --tls",
        COLUMNS,
        table_rows(result),
        notes=_notes(result),
        markdown=markdown,
        file=file,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine bench --tls``."""
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per cluster")
    parser.add_argument("--primaries", type=int, default=3)
    add_json_option(parser)
    add_markdown_option(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine bench --tls ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["bench", "--tls", *(sys.argv[3:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Start both clusters, measure, print the table (the JSON with ``--json``)."""
    from ..testing import LocalCluster  # noqa: PLC0415

    print(f"starting two local clusters ({args.primaries} primaries) ...", file=sys.stderr)
    with (
        LocalCluster(primaries=args.primaries, replicas_per_primary=0) as plain,
        LocalCluster(primaries=args.primaries, replicas_per_primary=0, tls=True) as tls,
    ):
        result = run(_bench(args, {"plaintext": plain, "TLS": tls}))
    result["rounds"] = args.rounds
    result["command"] = "python -m engine " + " ".join(args.argv)
    report(result, markdown=args.markdown, file=report_stream(args))
    write_json(args.json, result)
    return 0
