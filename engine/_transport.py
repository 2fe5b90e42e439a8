"""Auto-pipelining transport for Redis Cluster and single Redis servers.

The transport knows slots, nodes and the RESP protocol; it does not know what a session is.

How a command travels::

    call(slot, packed)            packed = one RESP command (hiredis.pack_command)
      -> node = slot map[slot]    one long-lived connection per node
      -> conn.send(packed)        appended to the connection's write buffer; the first
                                  command of a loop tick schedules one flush, so every
                                  command issued in the same tick for that node goes out
                                  in ONE write()  (implicit pipelining)
      <- data_received            hiredis parses replies, matched to waiters in order
      -> redirects and retries    MOVED: fix that slot, retry at once (a burst of MOVED
                                  triggers one topology refresh); ASK: ASKING + command on
                                  the target's connection; TRYAGAIN / CLUSTERDOWN / LOADING:
                                  backoff with jitter; NOSCRIPT: EVAL with the source once

Every call carries one deadline covering all its retries. A watchdog (one timer for the
whole transport, not one per call) fails commands whose deadline passed. A node whose
connection is refused, or that lets several timeouts pass without answering anything,
gets its circuit breaker opened: calls to its slots fail at once with ``EngineUnavailable``
until a half-open probe (connect + PING) succeeds, and the slot map is refreshed meanwhile,
so a promoted replica takes over without restarting anything. Calls to other nodes never
wait behind a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import unquote, urlparse

import hiredis

from ._errors import (
    EngineError,
    EngineUnavailable,
    InvalidArgument,
    OutcomeUnknown,
    ReplyError,
    reply_kind,
)
from ._keys import SLOTS
from ._scripts import Script
from ._settings import redact_url

__all__ = ["ReplyError", "Transport", "TransportOptions", "pack"]

# hiredis's stubs type the argument as a 1-tuple; it takes any tuple of str/bytes/numbers.
pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command

_WATCHDOG_INTERVAL: Final = 0.01
_MOVED_BURST: Final = 8  # MOVED replies within _MOVED_WINDOW that justify a full refresh
_MOVED_WINDOW: Final = 0.1
_REFRESH_MIN_INTERVAL: Final = 0.1
_BACKGROUND_REFRESH: Final = 5.0
_BACKOFF_BASE: Final = 0.005
_BACKOFF_CAP: Final = 0.2
_BREAKER_CAP: Final = 2.0
_BULK_CHUNK: Final = 2000  # commands enqueued before yielding to the loop in bulk calls


class ConnectionLost(Exception):
    """The connection went away before the reply came: the command may or may not have run."""


class CommandTimeout(Exception):
    """The deadline passed before the reply came."""


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """What the transport needs to know; built from ``EngineSettings`` by the engine."""

    url: str = field(repr=False)  # may carry a password: see __repr__
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    command_timeout: float = 1.0
    connect_timeout: float = 1.0
    max_inflight_per_node: int = 20_000
    breaker_failures: int = 3
    breaker_reset: float = 0.25
    ssl: ssl.SSLContext | None = None  # for rediss:// (built by the engine from settings)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f}={getattr(self, f)!r}"
            for f in ("username", "command_timeout", "connect_timeout", "max_inflight_per_node")
        )
        return f"TransportOptions(url={redact_url(self.url)!r}, {shown})"


class _Sink:
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


_Entry = tuple["asyncio.Future[Any] | _Sink | None", float]


class _Connection(asyncio.Protocol):
    """One multiplexed connection: FIFO of waiters, coalesced writes, hiredis parser."""

    def __init__(self, node: _Node, loop: asyncio.AbstractEventLoop, max_inflight: int) -> None:
        self.node = node
        self.loop = loop
        self.pending: deque[_Entry] = deque()
        self.min_deadline = float("inf")  # lower bound of pending deadlines (may be stale-low)
        self.replied = False  # a reply arrived since the watchdog last looked
        self.alive = False
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
                if target.__class__ is _Sink:
                    target.put(reply)
                elif not target.done():  # type: ignore[union-attr]
                    target.set_result(reply)  # type: ignore[union-attr]
        except (hiredis.ProtocolError, IndexError) as exc:
            # A reply we cannot parse, or one nobody asked for: the stream is out of step.
            self.abort(ConnectionLost(f"protocol error from {self.node.name}: {exc!r}"))
            return
        self.replied = True
        if self._room_waiters and len(pending) <= self._low_water:
            self._wake_room_waiters(self._max_inflight - len(pending))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._fail_all(ConnectionLost(f"connection to {self.node.name} lost: {exc!r}"))
        if not self.closed_waiter.done():
            self.closed_waiter.set_result(None)
        self.node.connection_lost(self)

    # -- sending ----------------------------------------------------------------------

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        """Queue one command; the returned future gets the reply (errors as values)."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((fut, deadline))
        self.min_deadline = min(self.min_deadline, deadline)
        self._wbuf.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def send_to(self, sink: _Sink, packed: bytes, deadline: float) -> None:
        """Queue one command of a bulk round; its reply goes to ``sink``."""
        self.pending.append((sink, deadline))
        if deadline < self.min_deadline:  # noqa: PLR1730 - cheaper than min() per command
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
        fut = self.send(packed, deadline)
        if self._wait_fut is None:
            self._wait_fut = self.loop.create_future()
            self._wait_cmd = wait
            self._wait_deadline = deadline
        elif deadline > self._wait_deadline:
            self._wait_deadline = deadline
        return fut, self._wait_fut

    def send_discard(self, packed: bytes, deadline: float) -> None:
        """Queue a command whose reply nobody needs (ASKING)."""
        self.pending.append((None, deadline))
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
                wait_fut.set_exception(ConnectionLost(f"connection to {self.node.name} lost"))
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
                raise CommandTimeout("no room on the connection before the deadline")
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError as exc:
                raise CommandTimeout("no room on the connection before the deadline") from exc

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
                if type(target) is _Sink:
                    if not target.finished.done():
                        target.fail(CommandTimeout(f"{self.node.name} did not answer in time"))
                        expired += 1
                elif not target.done():  # type: ignore[union-attr]
                    error = CommandTimeout(f"{self.node.name} did not answer in time")
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
            if type(target) is _Sink:
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


class _Node:
    """A Redis node: its connections, its circuit breaker.

    Two connections, made on first use: ``conn`` carries everything but durable writes,
    auto-pipelined; ``durable_conn`` carries writes followed by ``WAIT``. Redis blocks a
    client for the whole WAIT (up to ``wait_timeout`` when a replica is down), and WAIT
    counts the writes of its own connection, so a durable write and its WAIT travel
    together on a connection of their own and never hold up a validation.
    """

    def __init__(self, owner: Transport, host: str, port: int) -> None:
        self.owner = owner
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.conn: _Connection | None = None
        self.durable_conn: _Connection | None = None
        self.connecting: asyncio.Task[_Connection] | None = None
        self.durable_connecting: asyncio.Task[_Connection] | None = None
        self.failures = 0
        self.open_until = 0.0  # breaker: fail fast until this loop time
        self.reset_delay = owner.options.breaker_reset
        self.timeouts_in_row = 0

    def breaker_open(self, now: float) -> bool:
        return self.open_until > now

    def trip(self, now: float) -> None:
        """Open the breaker: fail fast until a probe is due, with exponential backoff."""
        jitter = random.uniform(0.8, 1.2)
        self.open_until = now + self.reset_delay * jitter
        self.reset_delay = min(self.reset_delay * 2, _BREAKER_CAP)

    def healthy(self) -> None:
        self.failures = 0
        self.timeouts_in_row = 0
        self.open_until = 0.0
        self.reset_delay = self.owner.options.breaker_reset

    def connections(self) -> list[_Connection]:
        return [c for c in (self.conn, self.durable_conn) if c is not None]

    def connection_lost(self, conn: _Connection) -> None:
        if self.durable_conn is conn:
            self.durable_conn = None
        if self.conn is conn:
            self.conn = None
            if not self.owner.closing:
                self.owner.request_refresh()

    async def connection(self, deadline: float, *, durable: bool = False) -> _Connection:
        """The live connection (``durable``: the one for WAITed writes), connecting (once,
        shared by all callers) if needed."""
        conn = self.durable_conn if durable else self.conn
        if conn is not None and conn.alive:
            return conn
        if self.owner.closing:
            raise EngineUnavailable("the transport is closed")
        loop = self.owner.loop
        if self.breaker_open(loop.time()):
            # Ask the cluster who serves these slots now: a replica may have been promoted.
            self.owner.request_refresh()
            raise EngineUnavailable(f"node {self.name} is down (circuit open)")
        task = self.durable_connecting if durable else self.connecting
        if task is None:
            task = loop.create_task(self._connect(durable))
            if durable:
                self.durable_connecting = task
            else:
                self.connecting = task
        elif self.failures:
            # A half-open probe is under way: others fail fast rather than queue behind it.
            raise EngineUnavailable(f"node {self.name} is down (probing)")
        left = deadline - loop.time()
        if left <= 0:
            raise EngineUnavailable(f"deadline passed while connecting to {self.name}")
        done, _ = await asyncio.wait({task}, timeout=left)
        if not done:
            raise EngineUnavailable(f"timed out connecting to {self.name}")
        if task.cancelled():  # aclose() cancelled the connect: not the caller's cancellation
            raise EngineUnavailable(f"connecting to {self.name} was cancelled (closing)")
        try:
            return task.result()
        except EngineUnavailable:
            raise
        except Exception as exc:  # pragma: no cover - _connect maps its errors
            raise EngineUnavailable(f"cannot connect to {self.name}: {exc!r}") from exc

    async def _connect(self, durable: bool) -> _Connection:
        owner = self.owner
        loop = owner.loop
        opts = owner.options
        probe: _Connection | None = None  # to close if the handshake fails
        try:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _Connection(self, loop, opts.max_inflight_per_node),
                        self.host,
                        self.port,
                        ssl=owner.ssl,
                        server_hostname=self.host if owner.ssl is not None else None,
                    ),
                    opts.connect_timeout,
                )
                probe = conn
                # The handshake doubles as the half-open probe: a SIGSTOPped server accepts
                # TCP connections (the kernel does) but never answers this.
                deadline = loop.time() + opts.connect_timeout
                futs = [conn.send(cmd, deadline) for cmd in owner.handshake]
                for fut in futs:
                    reply = await asyncio.wait_for(fut, opts.connect_timeout)
                    if isinstance(reply, ReplyError):
                        conn.abort(ConnectionLost(str(reply)))
                        raise EngineUnavailable(f"{self.name} refused the handshake: {reply}")
            except (OSError, TimeoutError, ConnectionLost, CommandTimeout) as exc:
                if probe is not None:
                    # A probe that connected but got no answer (SIGSTOPped server): close
                    # it, or every failed probe leaks a socket the server keeps once back.
                    probe.abort(ConnectionLost(f"handshake with {self.name} failed"))
                self.failures += 1
                self.trip(loop.time())
                owner.request_refresh()
                raise EngineUnavailable(f"cannot connect to {self.name}: {exc!r}") from exc
            except BaseException:
                # Cancelled (aclose() while connecting): the socket must not outlive us.
                if probe is not None:
                    probe.abort(ConnectionLost(f"connecting to {self.name} was cancelled"))
                raise
            if durable:
                self.durable_conn = conn
            else:
                self.conn = conn
            self.healthy()
            return conn
        finally:
            if durable:
                self.durable_connecting = None
            else:
                self.connecting = None

    def close(self) -> None:
        for task in (self.connecting, self.durable_connecting):
            if task is not None:
                task.cancel()
        for conn in self.connections():
            conn.abort(ConnectionLost("transport closed"))
        self.conn = self.durable_conn = None


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * (2**attempt)))


def _parse_redirect(message: str) -> tuple[int, str, int]:
    # "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"; IPv6 hosts contain ':'.
    _, slot, address = message.split(" ", 2)
    host, _, port = address.rpartition(":")
    return int(slot), host, int(port)


_RETRY_LATER: Final = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY")


class Transport:
    """Routes commands to nodes by slot and pipelines them implicitly.

    Use ``await Transport.open(options)``; ``aclose()`` is safe to call twice.
    """

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self.cluster = False
        self.closing = False
        self._state = _State.NEW
        self._nodes: dict[tuple[str, int], _Node] = {}
        self._slot_nodes: list[_Node] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._moved_times: deque[float] = deque(maxlen=_MOVED_BURST)
        self._watchdog: asyncio.TimerHandle | None = None
        self._background: asyncio.Task[None] | None = None
        self._scripts: dict[bytes, Script] = {}
        self.refreshes = 0  # topology refreshes done (tests check bursts cause few)
        self.redirects = {"MOVED": 0, "ASK": 0}
        seed = urlparse(options.url)
        if seed.scheme not in ("redis", "rediss", ""):
            raise InvalidArgument(f"unsupported URL scheme {seed.scheme!r}: redis:// or rediss://")
        self.ssl = options.ssl
        if seed.scheme == "rediss" and self.ssl is None:
            self.ssl = ssl.create_default_context()  # verify against the system's CAs
        try:
            port = seed.port
        except ValueError as exc:
            raise InvalidArgument("the url has an invalid port") from exc
        self._seed = (seed.hostname or "127.0.0.1", port or 6379)
        username = options.username or (unquote(seed.username) if seed.username else None)
        password = options.password or (unquote(seed.password) if seed.password else None)
        self.handshake: list[bytes] = []
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self.handshake.append(pack(auth))
        self._db = int(seed.path.strip("/") or 0) if seed.path.strip("/").isdigit() else 0
        self.handshake.append(pack(("PING",)))

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    async def open(cls, options: TransportOptions, scripts: Sequence[Script] = ()) -> Transport:
        """Connect to the seed, detect cluster or standalone, map slots, load scripts."""
        self = cls(options)
        try:
            await self._start(scripts)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start(self, scripts: Sequence[Script]) -> None:
        # The watchdog runs from the start, so discovery cannot hang on a seed that accepts
        # the connection and then stops answering.
        self._watchdog = self.loop.call_later(_WATCHDOG_INTERVAL, self._watch)
        seed = self._node(*self._seed)
        deadline = self.loop.time() + max(self.options.connect_timeout, 2.0)
        conn = await seed.connection(deadline)
        reply = await self._wait(conn.send(pack(("CLUSTER", "SLOTS")), deadline))
        if isinstance(reply, ReplyError):
            # "ERR This instance has cluster support disabled": one plain server.
            self.cluster = False
            if self._db:
                self.handshake.append(pack(("SELECT", self._db)))
                ok = await self._wait(conn.send(pack(("SELECT", self._db)), deadline))
                if isinstance(ok, ReplyError):
                    raise EngineUnavailable(f"SELECT {self._db} failed: {ok}")
            self._slot_nodes = [seed] * SLOTS
        else:
            self.cluster = True
            if not self._apply_slots(reply, seed):
                raise EngineUnavailable("the cluster reports no slots: is it created?")
        self._state = _State.OPEN
        self._scripts = {s.sha: s for s in scripts}
        await self.load_scripts(deadline)
        if self.cluster:
            self._background = self.loop.create_task(self._background_refresh())

    async def aclose(self) -> None:
        """Close every connection; pending calls fail with ``EngineUnavailable``."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in (self._refresh_task, self._background):
            if task is not None:
                task.cancel()
        waits = []
        for node in self._nodes.values():
            waits += [c.closed_waiter for c in node.connections()]
            node.close()
        if waits:
            await asyncio.wait(waits, timeout=1.0)

    # -- topology ---------------------------------------------------------------------

    def _node(self, host: str, port: int) -> _Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = _Node(self, host, port)
        return node

    def primaries(self) -> list[_Node]:
        """The nodes that serve at least one slot now."""
        seen: dict[str, _Node] = {}
        for node in self._slot_nodes:
            seen.setdefault(node.name, node)
        return list(seen.values())

    def node_for_slot(self, slot: int) -> _Node:
        return self._slot_nodes[slot]

    def _apply_slots(self, reply: Any, asked: _Node) -> bool:
        if not isinstance(reply, list) or not reply:
            return False
        table = list(self._slot_nodes) if self._slot_nodes else [asked] * SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if primary[0] else asked.host
            if host == "?":
                continue
            node = self._node(host, int(primary[1]))
            table[start : end + 1] = [node] * (end - start + 1)
        self._slot_nodes = table
        return True

    def request_refresh(self) -> None:
        """Refresh the slot map soon, once: concurrent requests share one refresh."""
        if self.closing or not self.cluster:
            return
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        self._refresh_task = self.loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        wait = self._last_refresh + _REFRESH_MIN_INTERVAL - self.loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_refresh = self.loop.time()
        self.refreshes += 1
        now = self.loop.time()
        candidates = [n for n in self._nodes.values() if not n.breaker_open(now)]
        random.shuffle(candidates)
        # Prefer nodes already connected: asking them costs no handshake.
        candidates.sort(key=lambda n: n.conn is None)
        for node in candidates:
            deadline = self.loop.time() + min(0.5, self.options.command_timeout)
            try:
                conn = await node.connection(deadline)
                reply = await self._wait(conn.send(pack(("CLUSTER", "SLOTS")), deadline))
            except (EngineUnavailable, ConnectionLost, CommandTimeout):
                continue
            if not isinstance(reply, ReplyError) and self._apply_slots(reply, node):
                return

    async def _background_refresh(self) -> None:
        # Catches topology changes that produce no error (e.g. a new replica), cheaply.
        while True:
            await asyncio.sleep(_BACKGROUND_REFRESH)
            self.request_refresh()

    def _note_moved(self, slot: int, host: str, port: int) -> None:
        self.redirects["MOVED"] += 1
        self._slot_nodes[slot] = self._node(host, port)
        now = self.loop.time()
        times = self._moved_times
        times.append(now)
        if len(times) == _MOVED_BURST and now - times[0] < _MOVED_WINDOW:
            times.clear()
            self.request_refresh()

    # -- watchdog ---------------------------------------------------------------------

    def _watch(self) -> None:
        now = self.loop.time()
        for node in self._nodes.values():
            conns = node.connections()
            expired = 0
            replied = False
            for conn in conns:
                if conn.pending and now >= conn.min_deadline:
                    expired += conn.expire(now)
                replied = replied or conn.replied
                conn.replied = False
            if replied:
                node.timeouts_in_row = 0
            elif expired:
                node.timeouts_in_row += expired
                if node.timeouts_in_row >= self.options.breaker_failures:
                    # Answers nothing while deadlines pass: treat as down (SIGSTOP, hang).
                    # Count it as a failure: with failures == 0 the half-open probe would let
                    # every caller queue behind it for its whole deadline instead of failing
                    # fast (see _Node.connection).
                    node.failures += 1
                    node.trip(now)
                    for conn in conns:
                        conn.abort(CommandTimeout(f"{node.name} stopped answering"))
                    self.request_refresh()
        if self._state is not _State.CLOSED:
            self._watchdog = self.loop.call_later(_WATCHDOG_INTERVAL, self._watch)

    # -- calls ------------------------------------------------------------------------

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        except (ConnectionLost, CommandTimeout) as exc:
            raise EngineUnavailable(str(exc)) from exc

    def deadline(self, timeout: float | None = None) -> float:
        return self.loop.time() + (self.options.command_timeout if timeout is None else timeout)

    def try_send(self, slot: int, packed: bytes, deadline: float) -> asyncio.Future[Any] | None:
        """The hot path's fast lane: queue ``packed`` on the slot's node if it has a live
        connection with room, and return the reply's future; ``None`` if anything needs
        ``call``'s slow path (connecting, back-pressure, a closed transport).

        Saves the hot path a coroutine layer. The caller must hand any error reply or
        failure to ``call``, which handles redirects, NOSCRIPT and retries.
        """
        conn = self._slot_nodes[slot].conn
        if conn is None or not conn.alive or conn.full or self._state is not _State.OPEN:
            return None
        return conn.send(packed, deadline)

    async def call(
        self,
        slot: int,
        packed: bytes,
        *,
        deadline: float | None = None,
        idempotent: bool = True,
        script: Script | None = None,
        then: bytes | None = None,
    ) -> Any:
        """Send one command to the node that serves ``slot`` and return its reply.

        Args:
            slot: The command's hash slot.
            packed: The command in RESP (``pack(...)``).
            deadline: Loop time by which the reply must be in; default now + command_timeout.
            idempotent: Whether the command may be sent again after a connection was lost
                with it in flight (redirect and retry-later replies are always retried:
                the server did not run the command). A command that is not, and that was
                sent with no reply coming, raises ``OutcomeUnknown``.
            script: The script an EVALSHA in ``packed`` runs: on NOSCRIPT the same call is
                sent once more as EVAL with the script's source.
            then: ``WAIT`` to follow the command: both go on the node's durable connection
                (sharing one WAIT with the other writes of the same loop tick) and the
                reply is ``(reply, wait_reply)``. ``wait_reply`` is the WAIT's reply, or the
                exception that took it when the command's own reply did arrive (the write
                ran; its replication is unconfirmed).

        Raises:
            EngineUnavailable: no reply before the deadline or node down.
            OutcomeUnknown: a command that is not idempotent was sent and no reply came.
        """
        if self._state is not _State.OPEN:
            raise EngineUnavailable("the transport is not open")
        loop = self.loop
        if deadline is None:
            deadline = loop.time() + self.options.command_timeout
        asking: _Node | None = None
        attempt = 0
        evaled = False
        then_reply: Any = None
        while True:
            if self._state is not _State.OPEN:
                raise EngineUnavailable("the transport was closed during the call")
            node = asking or self._slot_nodes[slot]
            conn = node.conn if then is None else node.durable_conn
            if conn is None or not conn.alive:
                conn = await node.connection(deadline, durable=then is not None)
            if conn.full:
                try:
                    await conn.wait_for_room(deadline)
                except CommandTimeout as exc:
                    raise EngineUnavailable(str(exc)) from exc
                if not conn.alive:
                    # It died while we waited; nothing was sent, so going round again (to a
                    # new connection) is safe even for a write. Sending on it would hang past
                    # the deadline: a dead connection is no longer watched by the watchdog.
                    continue
            if asking is not None:
                conn.send_discard(_ASKING, deadline)
                asking = None
            then_fut = None
            if then is None:
                fut = conn.send(packed, deadline)
            else:
                fut, then_fut = conn.send_durable(packed, deadline, then)
                # If the command itself fails, nobody awaits this one: retrieve its error
                # so it is not reported as "never retrieved".
                then_fut.add_done_callback(_retrieve)
            try:
                reply = await fut
            except CommandTimeout as exc:
                raise (EngineUnavailable if idempotent else OutcomeUnknown)(str(exc)) from exc
            except ConnectionLost as exc:
                if not idempotent:
                    raise OutcomeUnknown(f"no reply, not sent again: {exc}") from exc
                if loop.time() >= deadline:
                    raise EngineUnavailable(str(exc)) from exc
                attempt += 1
                await self._sleep_before_retry(attempt, deadline, exc)
                continue
            if then_fut is not None and type(reply) is not ReplyError:
                # The command ran; what is left to learn is whether replicas have it.
                try:
                    then_reply = await then_fut
                except (CommandTimeout, ConnectionLost) as exc:
                    then_reply = exc
            if type(reply) is not ReplyError:
                return reply if then_fut is None else (reply, then_reply)
            message = str(reply)
            kind = reply_kind(reply)
            if kind == "MOVED":
                slot_, host, port = _parse_redirect(message)
                self._note_moved(slot_, host, port)
                attempt += 1
                if attempt > 16:
                    raise EngineUnavailable(f"redirect loop for slot {slot}: {message}")
                continue
            if kind == "ASK":
                self.redirects["ASK"] += 1
                _, host, port = _parse_redirect(message)
                asking = self._node(host, port)
                attempt += 1
                if attempt > 16:
                    raise EngineUnavailable(f"redirect loop for slot {slot}: {message}")
                continue
            if kind == "NOSCRIPT" and script is not None and not evaled:
                # EVAL runs it and leaves it cached on that node for the next EVALSHA.
                packed = evalsha_to_eval(packed, script)
                evaled = True
                continue
            if kind in _RETRY_LATER:
                if kind in ("MASTERDOWN", "READONLY", "CLUSTERDOWN"):
                    self.request_refresh()
                attempt += 1
                await self._sleep_before_retry(attempt, deadline, reply)
                continue
            return reply if then_fut is None else (reply, None)

    async def _sleep_before_retry(self, attempt: int, deadline: float, cause: object) -> None:
        left = deadline - self.loop.time()
        if left <= 0:
            raise EngineUnavailable(f"deadline passed after {attempt} tries: {cause}")
        await asyncio.sleep(min(_backoff(attempt), left))
        if self.loop.time() >= deadline:
            raise EngineUnavailable(f"deadline passed after {attempt} tries: {cause}")

    async def call_many(
        self,
        items: Sequence[tuple[int, bytes]],
        *,
        script: Script | None = None,
        deadline: float | None = None,
    ) -> list[Any]:
        """Send many idempotent commands at once; replies in input order.

        ``items`` are ``(slot, packed)``; ``script`` as for ``call``. Commands are
        grouped by node and written in chunks, yielding to the loop between chunks so a
        10,000-command call never blocks other tasks for long. After a SCRIPT FLUSH the
        NOSCRIPT items are sent again in bulk once the scripts are reloaded; items that got
        a redirect or a retry-later reply are retried one by one through ``call``. Never
        raises for a single item: a failed item's place holds an ``EngineUnavailable``.
        """
        if self._state is not _State.OPEN:
            raise EngineUnavailable("the transport is not open")
        loop = self.loop
        if deadline is None:
            deadline = loop.time() + self.options.command_timeout
        results = await self._send_bulk(items, deadline)
        if script is not None and any(_is_noscript(r) for r in results):
            # Scripts were flushed: load them once, then resend those items in bulk, rather
            # than EVAL (the whole source) per item.
            with contextlib.suppress(EngineUnavailable):
                await self.load_scripts(deadline)
            again_idx = [i for i, r in enumerate(results) if _is_noscript(r)]
            for i, r in zip(
                again_idx,
                await self._send_bulk([items[i] for i in again_idx], deadline),
                strict=True,
            ):
                results[i] = r
        retry = [i for i, r in enumerate(results) if _needs_retry(r)]
        if retry and loop.time() < deadline:

            async def again(i: int) -> None:
                slot, packed = items[i]
                try:
                    results[i] = await self.call(slot, packed, deadline=deadline, script=script)
                except EngineUnavailable as exc:
                    results[i] = exc

            await asyncio.gather(*(again(i) for i in retry))
        return results

    async def _send_bulk(self, items: Sequence[tuple[int, bytes]], deadline: float) -> list[Any]:
        """One pipelined round: every item to its slot's node, replies (or errors) in order."""
        results: list[Any] = [None] * len(items)
        groups: dict[_Node, list[int]] = {}
        slot_nodes = self._slot_nodes
        for i, item in enumerate(items):
            node = slot_nodes[item[0]]
            group = groups.get(node)
            if group is None:
                groups[node] = [i]
            else:
                group.append(i)

        async def run_group(node: _Node, indices: list[int]) -> None:
            try:
                conn = await node.connection(deadline)
            except EngineUnavailable as exc:
                for i in indices:
                    results[i] = exc
                return
            sink = _Sink(self.loop, len(indices))
            sent = 0
            send_to = conn.send_to
            for start in range(0, len(indices), _BULK_CHUNK):
                if start:
                    await asyncio.sleep(0)  # let the flush and other tasks run
                if conn.full:
                    try:
                        await conn.wait_for_room(deadline)
                    except CommandTimeout:
                        break
                if not conn.alive:
                    break
                for i in indices[start : start + _BULK_CHUNK]:
                    send_to(sink, items[i][1], deadline)
                    sent += 1
            if sent < len(indices):
                sink.sent(sent)
            if sent:
                await asyncio.wait([sink.finished])
            if sink.finished.done() and sink.finished.exception() is None:
                replies = sink.replies
                for pos, i in enumerate(indices):
                    results[i] = (
                        replies[pos]
                        if pos < sent
                        else EngineUnavailable(f"{node.name}: connection lost before sending")
                    )
                return
            # Timed out or lost part-way: replies are matched by position, so once one is
            # missing none of the rest can be trusted for this node.
            error = sink.finished.exception() if sink.finished.done() else None
            lost = EngineUnavailable(f"{node.name}: {error or 'not answered'}")
            for i in indices:
                results[i] = lost

        await asyncio.gather(*(run_group(node, idx) for node, idx in groups.items()))
        return results

    async def call_node(self, node: _Node, *args: Any) -> Any:
        """One command to one node (admin: INFO, DBSIZE, SCAN). Raises on error replies."""
        deadline = self.deadline()
        conn = await node.connection(deadline)
        reply = await self._wait(conn.send(pack(args), deadline))
        if isinstance(reply, ReplyError):
            raise EngineUnavailable(f"{node.name}: {reply}")
        return reply

    async def call_node_many(self, node: _Node, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Several commands to one node in one write (e.g. RANDOMKEY samples)."""
        deadline = self.deadline()
        conn = await node.connection(deadline)
        futs = [conn.send(pack(cmd), deadline) for cmd in commands]
        return [await self._wait(f) for f in futs]

    async def load_scripts(self, deadline: float | None = None) -> None:
        """SCRIPT LOAD every script on every primary (pipelined, one write per node)."""
        if not self._scripts:
            return
        if deadline is None:
            deadline = self.deadline()

        async def load(node: _Node) -> None:
            conn = await node.connection(deadline)
            futs = [
                conn.send(pack(("SCRIPT", "LOAD", s.source)), deadline)
                for s in self._scripts.values()
            ]
            for fut in futs:
                reply = await self._wait(fut)
                if isinstance(reply, ReplyError):
                    raise EngineUnavailable(f"SCRIPT LOAD failed on {node.name}: {reply}")

        await asyncio.gather(*(load(n) for n in self.primaries()))


_ASKING: Final = pack(("ASKING",))
_RETRYABLE_KINDS: Final = frozenset(("MOVED", "ASK", "NOSCRIPT", *_RETRY_LATER))


def evalsha_to_eval(packed: bytes, script: Script) -> bytes:
    """The same command as EVAL with the script's source, from its packed EVALSHA form.

    Only the NOSCRIPT path needs it, so callers never build the EVAL form up front.
    """
    count_end = packed.index(b"\r\n") + 2  # "*N\r\n"
    head = b"$7\r\nEVALSHA\r\n$40\r\n" + script.sha + b"\r\n"
    if packed[count_end : count_end + len(head)].upper() != head.upper():
        raise EngineError(f"NOSCRIPT for a command that is not an EVALSHA of {script.name}")
    source = script.source
    return b"".join(
        (
            packed[:count_end],
            b"$4\r\nEVAL\r\n$",
            str(len(source)).encode(),
            b"\r\n",
            source,
            b"\r\n",
            packed[count_end + len(head) :],
        )
    )


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _is_noscript(result: Any) -> bool:
    return type(result) is ReplyError and reply_kind(result) == "NOSCRIPT"


def _needs_retry(result: Any) -> bool:
    if type(result) is ReplyError:
        return reply_kind(result) in _RETRYABLE_KINDS
    return isinstance(result, EngineUnavailable)
