"""A durable write ends by its own deadline, also when its WAIT is shared with later writes.

Found by the partition drill minority-primary (bench.md, 4d): a create whose reply came
late (after CLUSTERDOWN retries) shared its group WAIT with writes that started later;
the WAIT's deadline is its group's latest, so the create waited for Redis's whole
``wait_timeout`` past its own deadline (2.0 s where 1.5 s is promised).
"""

from __future__ import annotations

import asyncio
import time

from engine._transport import TransportOptions, pack
from engine._transport._connection import CallFailed
from engine._transport._routing import Transport


async def test_a_write_waits_for_a_shared_wait_no_longer_than_its_deadline(
    standalone_url: str,
) -> None:
    # A plain server has no replica, so "WAIT 1 600" blocks its connection for 600 ms.
    transport = await Transport.open(TransportOptions(url=standalone_url, command_timeout=5.0))
    try:
        wait = pack(("WAIT", 1, 600))
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        short = transport.call(
            0, pack(("SET", "wait-deadline:a", "1")), idempotent=False, then=wait,
            deadline=loop.time() + 0.2,
        )  # fmt: skip
        # Same loop tick, so both share ONE WAIT, whose deadline is the later one.
        long = transport.call(
            0, pack(("SET", "wait-deadline:b", "1")), idempotent=False, then=wait,
            deadline=loop.time() + 5.0,
        )  # fmt: skip
        short_task = asyncio.ensure_future(short)
        long_task = asyncio.ensure_future(long)
        reply, acked = await short_task
        short_took = time.monotonic() - started
        assert reply == b"OK"  # the write ran
        assert isinstance(acked, CallFailed) and acked.timed_out  # unconfirmed, by ITS deadline
        assert short_took < 0.45, f"waited {short_took:.2f}s for a WAIT past a 0.2 s deadline"
        reply, acked = await long_task
        assert reply == b"OK" and acked == 0  # the WAIT itself still answers the other one
        assert time.monotonic() - started >= 0.55
    finally:
        await transport.aclose()
