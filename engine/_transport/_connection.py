"""One multiplexed connection to a Redis node: coalesced writes, hiredis replies in order.

The connection knows RESP and its own queue of waiters; it knows neither slots nor
retries. Every failure of a waiting command is a ``CallFailed`` (the one internal failure
type), turned into the public errors by the routing layer, in one place.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import hiredis

from .._errors import ReplyError

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["CallFailed", "Connection", "Reply", "Sink", "pack"]

Reply = bytes | int | list["Reply"] | ReplyError | None
"""A parsed Redis reply: bulk/simple strings as bytes, integers, arrays, error replies
(as values, never raised) or nil."""

# hiredis's stubs type the argument as a 1-tuple; it takes any tuple of str/bytes/numbers.
pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class CallFailed(Exception):
    """No reply came for a command: its connection was lost, or its deadline passed.

    A command that was written may or may not have run. ``timed_out`` tells the two
    apart: a lost connection may be worth a retry within the deadline, a timeout never.
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out

    @classmethod
    def timeout(cls, message: str) -> CallFailed:
        return cls(message, timed_out=True)


_Entry = tuple["asyncio.Future[Any] | Sink | None", float]


class Sink:
    """Where the replies of one bulk round on one connection go, in order.

    A bulk call of 10,000 commands would otherwise create, resolve and inspect 10,000
    futures; a sink is one list and one future for the whole round.
    """

    __slots__ = ("expected", "finished", "replies")

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self.replies: list[Any] = []
        self.expected = expected
        self.finished: asyncio.Future[None] = loop.create_future()

    def put(self, reply: Any) -> None:
        replies = self.replies
        if not self.finished.done():
            replies.append(reply)
            if len(replies) >= self.expected:
                self.finished.set_result(None)

    def fail(self, exc: Exception) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)

    def sent(self, count: int) -> None:
        """Fewer commands were sent than expected (the connection died part-way)."""
        self.expected = count
        if len(self.replies) >= count and not self.finished.done():
            self.finished.set_result(None)


class Connection(asyncio.Protocol):
    """One multiplexed connection: FIFO of waiters, coalesced writes, hiredis parser."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop, max_inflight: int) -> None:
        self.node = node
        self.loop = loop
        self.pending: deque[_Entry] = deque()
        self.min_deadline = float("inf")  # lower bound of pending deadlines (may be stale-low)
        self.replied = False  # a reply arrived since the watchdog last looked
        self.alive = False
        self.readonly = False  # READONLY sent (replica fallback reads)
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self._max_inflight = max_inflight
        self._low_water = max_inflight // 2
        self._room_waiters: list[asyncio.Future[None]] = []
        self.closed_waiter: asyncio.Future[None] = loop.create_future()
        # Group commit on a durable connection: the writes queued while no WAIT is in
        # flight share one WAIT, written after them at flush time (see send_durable).
        self._wait_fut: asyncio.Future[Any] | None = None
        self._wait_inflight: asyncio.Future[Any] | None = None
        self._wait_cmd = b""
        self._wait_deadline = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self.alive = True

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self.pending
        try:
            while (reply := reader.gets()) is not False:
                target = pending.popleft()[0]
                if target is None:
                    continue
                if target.__class__ is Sink:
                    target.put(reply)
                elif not target.done():  # type: ignore[union-attr]
                    target.set_result(reply)  # type: ignore[union-attr]
        except (hiredis.ProtocolError, IndexError) as exc:
            # A reply we cannot parse, or one nobody asked for: the stream is out of step.
            self.abort(CallFailed(f"protocol error from {self.node.name}: {exc!r}"))
            return
        self.replied = True
        if self._room_waiters and len(pending) <= self._low_water:
            self._wake_room_waiters(self._max_inflight - len(pending))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._fail_all(CallFailed(f"connection to {self.node.name} lost: {exc!r}"))
        if not self.closed_waiter.done():
            self.closed_waiter.set_result(None)
        self.node.connection_lost(self)

    # -- sending ----------------------------------------------------------------------

    def send(
        self, packed: bytes, deadline: float, prefix: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Queue one command; the returned future gets the reply (errors as values).

        On an idle connection (nothing in flight, nothing queued) the command is written
        at once: a lone request waits for nothing but the network. Otherwise it joins the
        loop tick's single write (implicit pipelining). ``prefix``: a command written just
        before it, whose reply is dropped (``CLIENT CACHING YES`` for the local cache).
        """
        fut: asyncio.Future[Any] = self.loop.create_future()
        pending = self.pending
        idle = not pending and not self._wbuf
        if prefix is not None:
            pending.append((None, deadline))
            packed = prefix + packed
        pending.append((fut, deadline))
        if deadline < self.min_deadline:  # noqa: PLR1730 - cheaper than min() per command
            self.min_deadline = deadline
        if idle and self.alive and self._transport is not None:
            self._transport.write(packed)
            return fut
        # Inlined _queue: this is the hot path of every validation under load.
        self._wbuf.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def send_to(
        self, sink: Sink, packed: bytes, deadline: float, prefix: bytes | None = None
    ) -> None:
        """Queue one command of a bulk round; its reply goes to ``sink`` (``prefix`` as
        for ``send``)."""
        # Inlined _queue: called once per token of a validate_many.
        if prefix is not None:
            self.pending.append((None, deadline))
            packed = prefix + packed
        self.pending.append((sink, deadline))
        if deadline < self.min_deadline:  # noqa: PLR1730
            self.min_deadline = deadline
        self._wbuf.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def send_durable(
        self, packed: bytes, deadline: float, wait: bytes
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Queue a write and return ``(reply, wait_reply)`` futures.

        Group commit: while a WAIT is in flight nothing more is written on this connection
        (Redis would not run it before the WAIT ends anyway); every write queued meanwhile,
        or in the same loop tick, shares ONE ``wait`` written after all of them. WAIT waits
        for this connection's latest write, so it covers them all. A burst of durable
        writes costs one replication round trip, not one each, and with a replica down
        the writes do not queue up one ``wait_timeout`` each behind each other: a write
        waits for at most the WAIT in flight plus its own.
        """
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._queue(fut, packed, deadline)
        if self._wait_fut is None:
            self._wait_fut = self.loop.create_future()
            self._wait_cmd = wait
            self._wait_deadline = deadline
        elif deadline > self._wait_deadline:
            self._wait_deadline = deadline
        return fut, self._wait_fut

    def send_discard(self, packed: bytes, deadline: float) -> None:
        """Queue a command whose reply nobody needs (ASKING)."""
        self._queue(None, packed, deadline)

    def _queue(self, target: asyncio.Future[Any] | Sink | None, packed: bytes, at: float) -> None:
        """Add a command to this tick's write; the first one schedules the flush."""
        self.pending.append((target, at))
        if at < self.min_deadline:  # noqa: PLR1730 - cheaper than min() per command
            self.min_deadline = at
        self._wbuf.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        wait_fut = self._wait_fut
        if wait_fut is not None:
            inflight = self._wait_inflight
            if inflight is not None and not inflight.done() and self.alive:
                return  # flushed when the WAIT in flight ends (see below)
            self._wait_fut = None
            if self.alive:
                self.pending.append((wait_fut, self._wait_deadline))
                self.min_deadline = min(self.min_deadline, self._wait_deadline)
                self._wbuf.append(self._wait_cmd)
                self._wait_inflight = wait_fut
                wait_fut.add_done_callback(self._after_wait)
            elif not wait_fut.done():
                wait_fut.set_exception(CallFailed(f"connection to {self.node.name} lost"))
        if self._wbuf and self._transport is not None and self.alive:
            data = b"".join(self._wbuf)
            self._wbuf.clear()
            self._transport.write(data)

    def _after_wait(self, _: asyncio.Future[Any]) -> None:
        if self._wait_fut is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self._max_inflight

    async def wait_for_room(self, deadline: float) -> None:
        """Back-pressure: wait until in-flight commands fall to the low-water mark."""
        while self.full and self.alive:
            fut: asyncio.Future[None] = self.loop.create_future()
            self._room_waiters.append(fut)
            left = deadline - self.loop.time()
            if left <= 0:
                raise CallFailed.timeout("no room on the connection before the deadline")
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError as exc:
                raise CallFailed.timeout("no room on the connection before the deadline") from exc

    def _wake_room_waiters(self, room: int | None = None) -> None:
        # Wake only as many waiters as there is room for, oldest first (all of them when the
        # connection failed). Waking every waiter on each reply made all but a few go back to
        # sleep at once: O(waiters) per reply, 5,000 calls at a bound of 16 took 8.7 s.
        waiters = self._room_waiters
        woken = i = 0
        while i < len(waiters) and (room is None or woken < room):
            fut = waiters[i]
            i += 1
            if not fut.done():  # a waiter whose deadline passed is gone: not counted
                fut.set_result(None)
                woken += 1
        self._room_waiters = waiters[i:]

    # -- failure ----------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Fail every waiter whose deadline passed; returns how many. Entries stay queued
        (their replies, if they ever come, are matched and dropped)."""
        expired = 0
        low = float("inf")
        for target, deadline in self.pending:
            if deadline <= now:
                if target is None:
                    continue
                if type(target) is Sink:
                    if not target.finished.done():
                        target.fail(CallFailed.timeout(f"{self.node.name} did not answer in time"))
                        expired += 1
                elif not target.done():  # type: ignore[union-attr]
                    error = CallFailed.timeout(f"{self.node.name} did not answer in time")
                    target.set_exception(error)  # type: ignore[union-attr]
                    expired += 1
            elif deadline < low:
                low = deadline
        self.min_deadline = low
        return expired

    def _fail_all(self, exc: Exception) -> None:
        if self._wait_fut is not None:
            if not self._wait_fut.done():
                self._wait_fut.set_exception(exc)
            self._wait_fut = None
        pending, self.pending = self.pending, deque()
        self.min_deadline = float("inf")
        self._wbuf.clear()
        for target, _ in pending:
            if type(target) is Sink:
                target.fail(exc)
            elif target is not None and not target.done():  # type: ignore[union-attr]
                target.set_exception(exc)  # type: ignore[union-attr]
        self._wake_room_waiters()

    def abort(self, exc: Exception) -> None:
        """Drop the connection now, failing only this connection's in-flight commands."""
        self.alive = False
        self._fail_all(exc)
        if self._transport is not None:
            self._transport.abort()
