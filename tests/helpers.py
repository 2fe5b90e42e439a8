"""Direct Redis helpers for assertions and cleanup (redis-py, one client per primary)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from engine import EngineSettings, SessionEngine, testing


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` on every primary; returns how many."""
    return testing.delete_prefix(url, prefix)


def all_keys(url: str, prefix: str) -> list[bytes]:
    """Every key under ``prefix`` on every primary (for assertions)."""
    return testing.keys_under(url, prefix)


def all_values(url: str, prefix: str) -> list[bytes]:
    """Every key name and value (any type, flattened) under ``prefix``, for secret scans."""
    out: list[bytes] = []

    def add(*items: object) -> None:
        out.extend(i if isinstance(i, bytes) else str(i).encode() for i in items)

    for client in testing.primary_clients(url):
        with client:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                add(key)
                kind = client.type(key)
                if kind == b"string":
                    add(client.get(key) or b"")
                elif kind == b"zset":
                    add(*client.zrange(key, 0, -1))
                elif kind == b"set":
                    add(*client.smembers(key))
                elif kind == b"list":
                    add(*client.lrange(key, 0, -1))
                elif kind == b"hash":
                    for f, v in client.hgetall(key).items():
                        add(f, v)
    return out


@asynccontextmanager
async def open_engine(url: str, prefix: str, **fields: Any) -> AsyncIterator[SessionEngine]:
    """An open engine on ``url`` under ``prefix``; its keys are deleted afterwards."""
    settings = EngineSettings(url=url, key_prefix=prefix, **fields)
    try:
        async with SessionEngine(settings) as eng:
            yield eng
    finally:
        await asyncio.to_thread(delete_prefix, url, prefix)


@contextmanager
def plain_redis_server(*args: str, port_option: str = "--port") -> Iterator[int]:
    """One throw-away ``redis-server`` with extra options, on a free loopback port given
    with ``port_option`` (``--tls-port`` for TLS); stopped by its pid afterwards.

    For servers the harness cannot manage (it needs to PING without a password or TLS).
    """
    exe = shutil.which("redis-server")
    assert exe, "redis-server is missing: apt-get install redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    plain = ["--port", "0"] if port_option != "--port" else []
    proc = subprocess.Popen(
        [
            exe,
            port_option,
            str(port),
            *plain,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)
