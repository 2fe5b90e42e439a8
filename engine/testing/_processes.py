"""The harness's processes: finding ``redis-server``, spawning it so it dies with us, and
telling our own processes (by pid and command line) from everybody else's."""

from __future__ import annotations

import ctypes
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from ._constants import (
    _BIND_ERRORS,
    _INSTALL_HINT,
    NODE_CONF,
    SERVER_VARIABLE,
    HarnessError,
    RedisServerNotFound,
)

_T = TypeVar("_T")


def redis_server_available() -> bool:
    """Whether the harness has a ``redis-server`` to run (``ENGINE_REDIS_SERVER`` or PATH)."""
    try:
        _find_redis_server(None)
    except HarnessError:
        return False
    return True


def _find_redis_server(path: str | None) -> str:
    # An explicit argument first, then ENGINE_REDIS_SERVER, then PATH.
    path = path or os.environ.get(SERVER_VARIABLE) or None
    found = shutil.which(path) if path else shutil.which("redis-server")
    if found is None and path and os.path.isfile(path) and os.access(path, os.X_OK):
        found = path
    if found is None:
        what = f"redis-server not found at {path!r}" if path else "redis-server not found on PATH"
        raise RedisServerNotFound(
            f"{what}; install it (Debian/Ubuntu: `{_INSTALL_HINT}`), pass redis_server=... "
            f"or set {SERVER_VARIABLE}"
        )
    if not NODE_CONF.is_file():
        raise HarnessError(f"shared node config {NODE_CONF} is missing")
    return os.path.abspath(found)


def _quote(value: str | os.PathLike[str]) -> str:
    """Quote a value for redis.conf (which understands C-style double-quoted strings)."""
    text = os.fspath(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bind_failed(log: Path) -> bool:
    tail = _log_tail(log, lines=20)
    return any(marker in tail for marker in _BIND_ERRORS)


def _log_tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"(no log at {log})"
    tail = " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
    return f"{tail} (log: {log})"


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # comm may contain spaces and parentheses


def _is_our_redis(pid: int, port: int) -> bool:
    """Whether ``pid`` is (still) a redis-server for ``port``, not a recycled pid."""
    if Path("/proc").is_dir():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            return False
        if _proc_state(pid) in (None, "Z", "X"):
            return False
    else:  # no procfs (macOS): ask ps
        try:
            cmdline = subprocess.run(
                ["ps", "-o", "command=", "-p", str(pid)],
                capture_output=True,
                text=True,
                check=False,
                timeout=5,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return "redis-server" in cmdline and re.search(rf"(?<!\d){port}(?!\d)", cmdline) is not None


def _wait_proc_state(pid: int | None, *, stopped: bool, timeout: float = 2.0) -> None:
    # Signals are delivered asynchronously; wait so callers can rely on the new state at once.
    if pid is None or not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _proc_state(pid)
        if state is None or (state in ("T", "t")) == stopped:
            return
        time.sleep(0.005)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_pdeathsig() -> None:
        # Runs in the forked child: keep it to the syscall (resolved above, no imports).
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_pdeathsig


_spawn_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
_spawn_lock = threading.Lock()


def _spawner_loop(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, future = jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


def _on_long_lived_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on the main thread or on a daemon thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
    A cluster started from a short-lived thread (a thread-pool worker, ``asyncio.to_thread``)
    would otherwise be killed the moment that thread finishes.
    """
    if threading.current_thread() is threading.main_thread():
        return fn()
    global _spawn_queue  # noqa: PLW0603 - one spawner thread per process, created lazily
    with _spawn_lock:
        if _spawn_queue is None:
            jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(jobs,), name="engine-cluster-spawner", daemon=True
            ).start()
            _spawn_queue = jobs
        target = _spawn_queue
    future: Future[_T] = Future()
    target.put((fn, future))
    return future.result()
