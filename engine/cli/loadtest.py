"""``python -m engine loadtest``: cluster + reference service + headless Locust, one command.

Starts a ``LocalCluster`` (unless ``--url``), the reference service (``loadtest.app``) under
uvicorn on a free loopback port, and Locust with ``loadtest/locustfile.py``; waits for the
run to end, stops what it started (by pid), prints requests, failures, throughput and
percentiles per endpoint from Locust's CSV, and exits non-zero when anything failed.

The service runs with the engine's local cache (``--local-cache-size``, default
``ENGINE_LOCAL_CACHE_SIZE`` or 100,000; 0 turns it off); before stopping it, the runner
reads one worker's ``/metrics`` and prints that worker's local-cache hit rate.

It needs the repository checkout (``loadtest/`` is not part of the wheel) and the
``fastapi`` and ``loadtest`` extras.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Column

from ..testing import LocalCluster
from . import CHECKOUT
from .console import add_json_option, print_table, report_stream, right, write_json

__all__ = ["EndpointStats", "main", "read_stats"]

ROOT = CHECKOUT
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
HOST = "127.0.0.1"
_HEALTH_TIMEOUT = 30.0
_STOP_GRACE = 10.0
DEFAULT_LOCAL_CACHE_SIZE = 100_000
_LOCAL_CACHE_ENV = "ENGINE_LOCAL_CACHE_SIZE"


@dataclass(frozen=True)
class EndpointStats:
    """One row of Locust's ``*_stats.csv``.

    Attributes:
        method: ``GET``, ``POST``... (empty on the aggregate row).
        name: Endpoint name, ``Aggregated`` for the total.
        requests: Requests sent.
        failures: Requests that failed.
        rps: Requests per second over the run.
        p50: Median response time, ms.
        p95: 95th percentile, ms.
        p99: 99th percentile, ms.
        max: Slowest, ms.
    """

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    max: float


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0  # "N/A" when an endpoint had no request


def read_stats(csv_prefix: str | os.PathLike[str]) -> list[EndpointStats]:
    """The rows of ``<prefix>_stats.csv`` written by ``locust --csv <prefix>``."""
    path = Path(f"{os.fspath(csv_prefix)}_stats.csv")
    with path.open(newline="") as fh:
        return [
            EndpointStats(
                method=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=_num(row["Requests/s"]),
                p50=_num(row["50%"]),
                p95=_num(row["95%"]),
                p99=_num(row["99%"]),
                max=_num(row["Max Response Time"]),
            )
            for row in csv.DictReader(fh)
        ]


def _read_failures(csv_prefix: Path) -> list[tuple[str, str, str, int]]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [
            (row["Method"], row["Name"], row["Error"], int(row["Occurrences"]))
            for row in csv.DictReader(fh)
        ]


SUMMARY_COLUMNS: list[str | Column] = [
    "endpoint",
    *(right(c) for c in ("requests", "failures", "rps", "p50 ms", "p95 ms", "p99 ms", "max ms")),
]


def summary_rows(rows: Sequence[EndpointStats]) -> list[tuple[str, ...]]:
    """The rows of the summary table (aggregate last), as the table shows them."""
    return [
        (
            f"{r.method} {r.name}".strip(),
            str(r.requests),
            str(r.failures),
            f"{r.rps:.1f}",
            f"{r.p50:.0f}",
            f"{r.p95:.0f}",
            f"{r.p99:.0f}",
            f"{r.max:.0f}",
        )
        for r in rows
    ]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the service did not become healthy in {timeout:.0f}s ({last})")


def local_cache_size(requested: int | None) -> int:
    """The service's local cache: the flag, else ``ENGINE_LOCAL_CACHE_SIZE``, else on."""
    if requested is not None:
        return requested
    for name, value in os.environ.items():
        if name.upper() == _LOCAL_CACHE_ENV:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{_LOCAL_CACHE_ENV} must be an integer, not {value!r}") from None
    return DEFAULT_LOCAL_CACHE_SIZE


def local_cache_summary(metrics_text: str) -> str | None:
    """One line on the local cache from a ``/metrics`` page (``None`` without a cache)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name.startswith("session_local_cache_") and not sample.labels:
                values[sample.name] = sample.value
    hits = values.get("session_local_cache_hits_total")
    misses = values.get("session_local_cache_misses_total")
    if hits is None or misses is None:
        return None
    invalidations = values.get("session_local_cache_invalidations_total", 0)
    entries = values.get("session_local_cache_entries", 0)
    return (
        f"local cache (one worker's /metrics): hit rate {hits / max(1.0, hits + misses):.1%} "
        f"({hits:,.0f} hits, {misses:,.0f} misses), {entries:,.0f} entries, "
        f"{invalidations:,.0f} invalidations"
    )


def _scrape_local_cache(base: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            return local_cache_summary(r.read().decode())
    except (OSError, ValueError) as exc:
        return f"local cache: /metrics not read ({exc})"


def _stop(proc: subprocess.Popen[bytes], grace: float = _STOP_GRACE) -> None:
    """SIGTERM the process we started, then SIGKILL its process group if it lingers.

    Each child runs in a session of its own (``start_new_session``), so the group holds only
    that child and its own children (uvicorn workers, locust worker processes).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (pgid == our child's pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def _cluster(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        yield cl.url


def _delete_prefix(url: str, prefix: str) -> None:
    """Remove the run's keys from a cluster we did not start (best effort)."""
    import redis  # noqa: PLC0415 - only needed with --url

    from ..testing import delete_prefix  # noqa: PLC0415

    try:
        delete_prefix(url, prefix)
    except redis.RedisError as exc:
        print(f"warning: could not delete keys under {prefix}: {exc}", file=sys.stderr)


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine loadtest`` (on the one parser of the CLI)."""
    p.add_argument("--users", type=int, default=2000, help="simulated users (2000)")
    p.add_argument("--spawn-rate", type=float, default=200, help="users started per second")
    p.add_argument("--duration", type=int, default=60, help="seconds of load (60)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="uvicorn worker processes (2: measured best on a 2-core box)",
    )
    p.add_argument(
        "--locust-processes",
        type=int,
        default=1,
        help="locust processes (1; >1 forks locust workers, via --processes)",
    )
    p.add_argument(
        "--wait",
        nargs=2,
        type=float,
        metavar=("MIN", "MAX"),
        help="think time per simulated user, seconds (locustfile default: 5 20; 1 3 saturates)",
    )
    p.add_argument(
        "--arrival-spread",
        type=float,
        metavar="SECONDS",
        help="each user logs in at a random moment within this many seconds of its start "
        "(locustfile default 1: Locust starts each second's users at one instant; "
        "0 keeps that lockstep burst)",
    )
    p.add_argument(
        "--reset-stats",
        action="store_true",
        help="count only the steady state: reset Locust's statistics once all users run",
    )
    p.add_argument("--url", help="use this cluster instead of starting a LocalCluster")
    p.add_argument("--out", type=Path, help="directory for the CSV and HTML reports")
    p.add_argument("--prefix", help="key prefix, ENGINE_KEY_PREFIX (default: a unique one per run)")
    add_json_option(p, "the per-endpoint statistics")
    p.add_argument(
        "--local-cache-size",
        type=int,
        help=f"the service's local cache in sessions, 0: off (default: {_LOCAL_CACHE_ENV} "
        f"if set, else {DEFAULT_LOCAL_CACHE_SIZE:,})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine loadtest ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["loadtest", *(sys.argv[2:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Run one load test; the exit code is 0 only when Locust saw no failure.

    Args:
        argv: Arguments after ``loadtest`` (see ``--help``).
    """
    if args.arrival_spread is not None and args.arrival_spread < 0:
        print("error: --arrival-spread must be >= 0")
        return 2
    if args.users < 1 or args.duration < 1 or args.workers < 1 or args.spawn_rate <= 0:
        print("error: --users, --spawn-rate, --duration and --workers must be positive")
        return 2
    try:
        cache_size = local_cache_size(args.local_cache_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cache_size < 0:
        print("error: --local-cache-size must be >= 0", file=sys.stderr)
        return 2
    if not LOCUSTFILE.is_file():
        print(f"error: {LOCUSTFILE} not found: run from a repository checkout", file=sys.stderr)
        return 2
    locust_bin = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which(
        "locust"
    )
    if locust_bin is None:
        print("error: locust is not installed (pip install '.[loadtest]')", file=sys.stderr)
        return 2
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="engine-loadtest-"))
    out.mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or f"lt{uuid.uuid4().hex[:8]}"
    started: list[subprocess.Popen[bytes]] = []
    cache_line: str | None = None
    t_start = time.monotonic()
    try:
        with _cluster(args.url) as url:
            port = _free_port()
            env = {
                **os.environ,
                "ENGINE_URL": url,
                "ENGINE_KEY_PREFIX": prefix,
                _LOCAL_CACHE_ENV: str(cache_size),
                "APP_COOKIE_SECURE": "0",
                **(
                    {"LOCUST_WAIT_MIN": str(args.wait[0]), "LOCUST_WAIT_MAX": str(args.wait[1])}
                    if args.wait
                    else {}
                ),
                **(
                    {"LOCUST_ARRIVAL_SPREAD": str(args.arrival_spread)}
                    if args.arrival_spread is not None
                    else {}
                ),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
            service = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "loadtest.app:app",
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--workers",
                    str(args.workers),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--log-level",
                    "warning",
                    "--no-access-log",
                    "--backlog",
                    "4096",
                    # Longer than any think time plus queueing delay: with uvicorn's 5 s
                    # default an overloaded loop closes idle keep-alive connections just as
                    # the client reuses them, and the request fails with "connection closed".
                    "--timeout-keep-alive",
                    "75",
                ],
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
            started.append(service)
            base = f"http://{HOST}:{port}"
            _wait_healthy(f"{base}/healthz", service, _HEALTH_TIMEOUT)
            csv_prefix = out / "locust"
            cmd = [
                locust_bin,
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "-u",
                str(args.users),
                "-r",
                str(args.spawn_rate),
                "-t",
                f"{args.duration}s",
                "--host",
                base,
                "--csv",
                str(csv_prefix),
                "--html",
                str(out / "locust.html"),
                "--only-summary",
                "--stop-timeout",
                "5",
                "--loglevel",
                "WARNING",
            ]
            if args.reset_stats:
                cmd.append("--reset-stats")
            if args.locust_processes > 1:
                cmd += ["--processes", str(args.locust_processes)]
            wait = "{}-{}s".format(*args.wait) if args.wait else "default"
            print(
                f"loadtest: {args.users} users, spawn {args.spawn_rate}/s, {args.duration}s, "
                f"think time {wait}, arrivals spread over "
                f"{'1 (default)' if args.arrival_spread is None else args.arrival_spread}s, "
                f"{args.workers} uvicorn worker(s), {args.locust_processes} locust process(es), "
                f"local cache {cache_size:,}, service {base}, cluster {url}",
                file=report_stream(args),
                flush=True,
            )
            # Locust's own report goes to a file: the summary below is the one to read.
            with (out / "locust.log").open("wb") as log:
                locust = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append(locust)
            try:
                code = locust.wait(args.duration + 120)
            except subprocess.TimeoutExpired:
                print("error: locust did not finish in time", file=sys.stderr)
                code = -1
            _stop(locust)
            cache_line = _scrape_local_cache(base) if cache_size else None
            _stop(service)
            if args.url:
                _delete_prefix(url, prefix)
    except RuntimeError as exc:  # the service did not come up
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(started):
            _stop(proc)
    try:
        rows = read_stats(csv_prefix)
    except (OSError, KeyError) as exc:
        print(f"error: no Locust statistics ({exc})", file=sys.stderr)
        return 1
    if code != 0:
        print(_tail(out / "locust.log"), file=sys.stderr)
    report = report_stream(args)
    print_table(None, SUMMARY_COLUMNS, summary_rows(rows), file=report)
    if cache_line:
        print(cache_line, file=report)
    total = next((r for r in rows if r.name == "Aggregated"), None)
    failures = _read_failures(csv_prefix)
    for method, name, error, count in failures:
        print(f"failure x{count}: {method} {name}: {error}", file=report)
    write_json(
        args.json,
        {
            "endpoints": [asdict(r) for r in rows],
            "failures": [
                {"method": m, "name": n, "error": e, "count": c} for m, n, e, c in failures
            ],
            "local_cache": cache_line,
            "users": args.users,
            "spawn_rate": args.spawn_rate,
            "duration_s": args.duration,
            "reports": str(out),
        },
    )
    if total is not None:
        print(
            f"total: {total.requests} requests, {total.failures} failures, "
            f"{total.rps:.1f} req/s, p50 {total.p50:.0f} ms, p95 {total.p95:.0f} ms, "
            f"p99 {total.p99:.0f} ms; workers {args.workers}; "
            f"wall {time.monotonic() - t_start:.0f}s; reports in {out}",
            file=report,
        )
    if code != 0 or total is None or total.failures:
        return 1
    return 0
