"""Running coroutines on the fastest event loop available."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["install_uvloop", "run"]

T = TypeVar("T")


def install_uvloop() -> bool:
    """Make new event loops uvloop loops where uvloop is installed; ``True`` if so.

    uvloop roughly halves the client CPU per validation, which is the bottleneck of one
    process. Servers that create their own loop (uvicorn: ``--loop uvloop``) need not call it.
    """
    try:
        import uvloop  # noqa: PLC0415 - optional, platform-dependent
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed, on the default loop otherwise."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
