"""Waiting for the local cache's tracking to be set up (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import time

from .._engine import SessionEngine
from .._errors import EngineError

__all__ = ["until_tracking_ready"]


async def until_tracking_ready(eng: SessionEngine, within: float = 10.0) -> None:
    """Return once client tracking is on for every primary of ``eng``'s local cache.

    Tracking is set up in the background once a node's data connection exists, so this
    pings the primaries (which makes those connections) while it waits.

    Raises:
        EngineError: The engine has no local cache, or tracking was not ready in time.
    """
    cache = eng._cache
    if cache is None:
        raise EngineError("this engine has no local cache (local_cache_size=0)")
    deadline = time.monotonic() + within
    while True:
        trackers = [cache.trackers.get(n) for n in eng.transport.primaries()]
        if all(t is not None and t.ready for t in trackers):
            return
        if time.monotonic() > deadline:
            raise EngineError(f"client tracking was not ready within {within:g} s")
        await eng.ping()
        await asyncio.sleep(0.02)
