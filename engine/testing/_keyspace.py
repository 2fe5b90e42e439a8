"""Keys under a prefix, on every primary of a cluster (or one plain server): listed and
deleted. The one delete-by-prefix of the project (tests, drills, loadtest, fuzz)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

__all__ = ["delete_prefix", "keys_under", "primary_clients"]

_BATCH = 500


CaFile = str | os.PathLike[str] | None


def primary_clients(url: str, *, timeout: float = 5.0, ca_file: CaFile = None) -> list[redis.Redis]:
    """A sync client per primary of the cluster at ``url`` (just one for a plain server),
    with the URL's credentials; over TLS for ``rediss://``, trusting ``ca_file`` (default:
    the system's CAs). The caller closes them (``with client:``)."""
    tls: dict[str, Any] = {"ssl_ca_certs": os.fspath(ca_file)} if ca_file else {}
    seed = redis.Redis.from_url(url, socket_timeout=timeout, **tls)
    try:
        slots = seed.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    except redis.ResponseError:  # cluster support disabled: one plain server
        return [seed]
    kwargs = seed.connection_pool.connection_kwargs
    seed.close()
    hosts = sorted({(_text(s[2][0]), int(s[2][1])) for s in slots})
    return [
        redis.Redis(
            host=h,
            port=p,
            socket_timeout=timeout,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            ssl=url.startswith("rediss://"),
            **tls,
        )
        for h, p in hosts
    ]


@contextmanager
def _clients(url: str, ca_file: CaFile) -> Iterator[list[redis.Redis]]:
    clients = primary_clients(url, ca_file=ca_file)
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def keys_under(url: str, prefix: str, *, ca_file: CaFile = None) -> list[bytes]:
    """Every key named ``<prefix>:...`` on every primary (``ca_file``: for ``rediss://``)."""
    with _clients(url, ca_file) as clients:
        return [k for c in clients for k in c.scan_iter(match=f"{prefix}:*", count=1000)]


def delete_prefix(url: str, prefix: str, *, ca_file: CaFile = None) -> int:
    """UNLINK every key named ``<prefix>:...`` on every primary; returns how many.

    One key per UNLINK (keys of different slots may not share a command), pipelined.
    ``ca_file``: the CA to trust for a ``rediss://`` URL.
    """
    deleted = 0
    with _clients(url, ca_file) as clients:
        for client in clients:
            batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(batch), _BATCH):
                with client.pipeline(transaction=False) as pipe:
                    for key in batch[i : i + _BATCH]:
                        pipe.unlink(key)
                    deleted += sum(int(r) for r in pipe.execute())
    return deleted


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
