"""Routing: slot map, redirects, retries, deadlines, the watchdog and bulk rounds.

The one place where a command's failure becomes a public error (``_public_error``):
the connections and nodes below fail waiters with ``CallFailed`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ssl import SSLContext  # the field named ssl hides the module in the class body
from typing import Any, Final

from .._errors import (
    EngineError,
    EngineUnavailable,
    InvalidArgument,
    OutcomeUnknown,
    ReplyError,
    permission_denied,
    reply_kind,
)
from .._keys import SLOTS
from .._lifecycle import State
from .._scripts import Script
from .._settings import parse_seeds, redact_url
from ._connection import CallFailed, Connection, Reply, Sink, pack
from ._node import Node

__all__ = ["Transport", "TransportOptions", "evalsha_to_eval"]

_WATCHDOG_INTERVAL: Final = 0.01
_MOVED_BURST: Final = 8  # MOVED replies within _MOVED_WINDOW that justify a full refresh
_MOVED_WINDOW: Final = 0.1
_REFRESH_MIN_INTERVAL: Final = 0.1
_BACKGROUND_REFRESH: Final = 5.0
_BACKOFF_BASE: Final = 0.005
_BACKOFF_CAP: Final = 0.2
_BULK_CHUNK: Final = 2000  # commands enqueued before yielding to the loop in bulk calls
_MAX_REDIRECTS: Final = 16


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
    # Asked before every connect, so rotated certificate or password files take effect at
    # the next reconnect without a restart (engine._credentials).
    ssl_provider: Callable[[], SSLContext | None] | None = None
    password_provider: Callable[[], str] | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f}={getattr(self, f)!r}"
            for f in ("username", "command_timeout", "connect_timeout", "max_inflight_per_node")
        )
        return f"TransportOptions(url={redact_url(self.url)!r}, {shown})"


def _public_error(failure: CallFailed, *, idempotent: bool) -> EngineUnavailable:
    """What a caller is told when no reply came: the one translation of ``CallFailed``.

    A read (or a command safe to resend) that got no reply checked nothing: unavailable.
    A write that was sent and got no reply may have run: its outcome is unknown.
    """
    if idempotent:
        return EngineUnavailable(str(failure))
    return OutcomeUnknown(f"no reply, not sent again: {failure}")


def _auth(username: str | None, password: str) -> bytes:
    auth = ("AUTH", username, password) if username else ("AUTH", password)
    try:
        return pack(auth)
    except UnicodeError:  # never echo the credentials
        raise InvalidArgument("the username or password is not valid UTF-8") from None


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
        try:
            seeds = parse_seeds(options.url)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        seed = seeds[0]
        self.options = options
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self.cluster = False
        self.closing = False
        self._state = State.NEW
        self._nodes: dict[tuple[str, int], Node] = {}
        self._slot_nodes: list[Node] = []
        self._primaries: list[Node] | None = None  # of _slot_nodes; None: to be computed
        self._replicas: dict[Node, list[Node]] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._moved_times: deque[float] = deque(maxlen=_MOVED_BURST)
        self._watchdog: asyncio.TimerHandle | None = None
        self._background: asyncio.Task[None] | None = None
        self._scripts: dict[bytes, Script] = {}
        self.refreshes = 0  # topology refreshes done (tests check bursts cause few)
        # Called with the node whose main connection was lost (the local cache listens:
        # what that connection tracked is gone with it).
        self.connection_listeners: list[Callable[[Node], None]] = []
        self.redirects = {"MOVED": 0, "ASK": 0}
        self.ssl = options.ssl
        if seed.tls and self.ssl is None:
            self.ssl = ssl.create_default_context()  # verify against the system's CAs
        self._seeds = [(s.host, s.port) for s in seeds]
        username = options.username or next((s.username for s in seeds if s.username), None)
        password = options.password or next((s.password for s in seeds if s.password), None)
        if options.password_provider is not None:
            password = options.password_provider()
        self._username = username
        self._password = password
        self.handshake: list[bytes] = []
        if password:
            self.handshake.append(_auth(username, password))  # always first: see below
        self._db = seed.db
        self.handshake.append(pack(("PING",)))

    def refresh_credentials(self) -> None:
        """Pick up a rotated certificate or password before a connect (the providers
        re-read their files only once they changed; the last good value otherwise)."""
        opts = self.options
        if opts.ssl_provider is not None:
            self.ssl = opts.ssl_provider()
        if opts.password_provider is not None:
            password = opts.password_provider()
            if password != self._password:
                self._password = password
                self.handshake[0] = _auth(self._username, password)

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
        seed, conn, reply = await self._first_seed()
        deadline = self.loop.time() + max(self.options.connect_timeout, 2.0)
        if isinstance(reply, ReplyError) and (
            denied := permission_denied(reply, operation="CLUSTER SLOTS")
        ):
            raise denied  # not "a plain server": the ACL user cannot see the slot map
        if isinstance(reply, ReplyError):
            # "ERR This instance has cluster support disabled": one plain server.
            self.cluster = False
            if self._db:
                self.handshake.append(pack(("SELECT", self._db)))
                ok = await self._wait(conn.send(pack(("SELECT", self._db)), deadline))
                if isinstance(ok, ReplyError):
                    raise permission_denied(ok, operation="SELECT") or (
                        EngineUnavailable(f"SELECT {self._db} failed: {ok}")
                    )
            self._slot_nodes = [seed] * SLOTS
            self._primaries = None
        else:
            self.cluster = True
            if not self._apply_slots(reply, seed):
                raise EngineUnavailable("the cluster reports no slots: is it created?")
        self._state = State.OPEN
        self._scripts = {s.sha: s for s in scripts}
        await self.load_scripts(deadline)
        if self.cluster:
            self._background = self.loop.create_task(self._background_refresh())

    async def _first_seed(self) -> tuple[Node, Connection, Reply]:
        """The first seed, in the order given, that answers CLUSTER SLOTS (an error reply
        counts: a plain server); each gets ``max(connect_timeout, 2 s)`` of its own."""
        failures: list[str] = []
        for host, port in self._seeds:
            node = self._node(host, port)
            deadline = self.loop.time() + max(self.options.connect_timeout, 2.0)
            try:
                conn = await node.connection(deadline)
                slots = pack(("CLUSTER", "SLOTS"))
                return node, conn, await self._wait(conn.send(slots, deadline))
            except EngineUnavailable as exc:
                failures.append(str(exc))
        raise EngineUnavailable(f"no seed answered: {'; '.join(failures)}")

    async def aclose(self) -> None:
        """Close every connection; pending calls fail with ``EngineUnavailable``."""
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
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

    def _node(self, host: str, port: int) -> Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = Node(self, host, port)
        return node

    @property
    def db(self) -> int:
        """The database number (0 on a cluster; ``SELECT``ed on a plain server)."""
        return self._db

    def nodes(self) -> list[Node]:
        """Every node met so far (former primaries too), for read-only use: metrics."""
        return list(self._nodes.values())

    def primaries(self) -> list[Node]:
        """The nodes that serve at least one slot now (computed once per slot-map change:
        the local cache asks several times a second, and the map has 16,384 entries)."""
        if self._primaries is None:
            seen: dict[str, Node] = {}
            for node in self._slot_nodes:
                seen.setdefault(node.name, node)
            self._primaries = list(seen.values())
        return list(self._primaries)

    def node_for_slot(self, slot: int) -> Node:
        return self._slot_nodes[slot]

    def _apply_slots(self, reply: Any, asked: Node) -> bool:
        if not isinstance(reply, list) or not reply:
            return False
        table = list(self._slot_nodes) if self._slot_nodes else [asked] * SLOTS
        replicas: dict[Node, list[Node]] = {}
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if primary[0] else asked.host
            if host == "?":
                continue
            node = self._node(host, int(primary[1]))
            table[start : end + 1] = [node] * (end - start + 1)
            replicas[node] = [
                self._node(r[0].decode() if r[0] else asked.host, int(r[1]))
                for r in entry[3:]
                if r[0] != b"?"
            ]
        self._slot_nodes = table
        self._primaries = None
        self._replicas = replicas
        return True

    def replicas_of(self, slot: int) -> list[Node]:
        """The replicas of the primary that serves ``slot``, as the last slot map said."""
        return self._replicas.get(self._slot_nodes[slot], [])

    async def call_replica(self, slot: int, packed: bytes, deadline: float) -> Reply:
        """A read-only command on a replica of ``slot``'s primary (replica fallback reads).

        The connection is switched to READONLY once (harmless should the node be promoted
        later: it only matters on a replica). Replicas are tried in turn until one answers
        with something other than an error; the command must be read-only (EVAL_RO).

        Raises:
            EngineUnavailable: no replica answered before the deadline.
        """
        failures: list[str] = []
        replicas = self.replicas_of(slot)
        if not replicas:
            # None known (a slot map taken before the replicas attached): ask once.
            self.request_refresh()
            task = self._refresh_task
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), deadline - self.loop.time())
            replicas = self.replicas_of(slot)
        for node in replicas:
            if node.breaker_open(self.loop.time()):
                failures.append(f"{node.name}: circuit open")
                continue
            try:
                conn = await node.connection(deadline)
                if not conn.readonly:
                    conn.readonly = True
                    conn.send_discard(_READONLY, deadline)
                reply: Reply = await conn.send(packed, deadline)
            except (EngineUnavailable, CallFailed) as exc:
                failures.append(f"{node.name}: {exc}")
                continue
            if type(reply) is ReplyError:  # MOVED (READONLY refused?), LOADING, ...
                failures.append(f"{node.name}: {reply}")
                continue
            return reply
        raise EngineUnavailable(f"no replica of slot {slot} answered: {'; '.join(failures)}")

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
            except (EngineError, CallFailed):  # PermissionDenied too: a background task
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
        self._primaries = None
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
                    # fast (see Node.connection).
                    node.failures += 1
                    node.trip(now)
                    for conn in conns:
                        conn.abort(CallFailed.timeout(f"{node.name} stopped answering"))
                    self.request_refresh()
        if self._state is not State.CLOSED:
            self._watchdog = self.loop.call_later(_WATCHDOG_INTERVAL, self._watch)

    # -- calls ------------------------------------------------------------------------

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        except CallFailed as exc:
            raise _public_error(exc, idempotent=True) from exc

    def deadline(self, timeout: float | None = None) -> float:
        return self.loop.time() + (self.options.command_timeout if timeout is None else timeout)

    def try_send(
        self, slot: int, packed: bytes, deadline: float, prefix: bytes | None = None
    ) -> asyncio.Future[Any] | None:
        """The hot path's fast lane: queue ``packed`` on the slot's node if it has a live
        connection with room, and return the reply's future; ``None`` if anything needs
        ``call``'s slow path (connecting, back-pressure, a closed transport).

        Saves the hot path a coroutine layer. The caller hands whatever it cannot use, an
        error reply or the future's exception, to ``call(..., first=...)``, which carries
        on from there (redirects, NOSCRIPT, retries) without sending the command again
        first.
        """
        conn = self._slot_nodes[slot].conn
        if conn is None or not conn.alive or conn.full or self._state is not State.OPEN:
            return None
        return conn.send(packed, deadline, prefix)

    async def call(
        self,
        slot: int,
        packed: bytes,
        *,
        deadline: float | None = None,
        idempotent: bool = True,
        script: Script | None = None,
        then: bytes | None = None,
        first: Reply | BaseException = None,
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
            first: The outcome of a first try made through ``try_send``, an error reply
                or the exception of its future: handled as if this call had sent it.

        Raises:
            EngineUnavailable: no reply before the deadline or node down.
            OutcomeUnknown: a command that is not idempotent was sent and no reply came.
        """
        if self._state is not State.OPEN:
            raise EngineUnavailable("the transport is not open")
        loop = self.loop
        if deadline is None:
            deadline = loop.time() + self.options.command_timeout
        asking: Node | None = None
        attempt = 0
        evaled = False
        then_reply: Any = None
        outcome: Reply | BaseException = first
        reply: Reply | BaseException
        then_fut: asyncio.Future[Any] | None
        while True:
            if outcome is not None:
                reply, outcome, then_fut = outcome, None, None
                if isinstance(reply, BaseException) and not isinstance(
                    reply, CallFailed | ReplyError
                ):
                    raise reply  # not a failure of the command: a bug, never hidden
            else:
                reply, then_fut = await self._send_once(
                    slot, packed, deadline, then=then, asking=asking
                )
                asking = None
            if isinstance(reply, CallFailed):
                if reply.timed_out or not idempotent or loop.time() >= deadline:
                    raise _public_error(reply, idempotent=idempotent) from reply
                attempt += 1
                await self._sleep_before_retry(attempt, deadline, reply)
                continue
            if then_fut is not None and type(reply) is not ReplyError:
                # The command ran; what is left to learn is whether replicas have it, by
                # this call's deadline: a reply that came late (after retries) would
                # otherwise wait a whole wait_timeout more, and the shared WAIT's own
                # deadline is its group's latest.
                if not then_fut.done():
                    await asyncio.wait((then_fut,), timeout=max(0.0, deadline - loop.time()))
                if not then_fut.done():
                    then_reply = CallFailed.timeout("WAIT not answered by the call's deadline")
                else:
                    try:
                        then_reply = then_fut.result()
                    except CallFailed as exc:
                        then_reply = exc
            if type(reply) is not ReplyError:
                return reply if then_fut is None else (reply, then_reply)
            message = str(reply)
            kind = reply_kind(reply)
            if kind in ("MOVED", "ASK"):
                attempt += 1
                if attempt > _MAX_REDIRECTS:
                    raise EngineUnavailable(f"redirect loop for slot {slot}: {message}")
                slot_, host, port = _parse_redirect(message)
                if kind == "MOVED":
                    self._note_moved(slot_, host, port)
                else:
                    self.redirects["ASK"] += 1
                    asking = self._node(host, port)
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

    async def _send_once(
        self,
        slot: int,
        packed: bytes,
        deadline: float,
        *,
        then: bytes | None,
        asking: Node | None,
    ) -> tuple[Reply | CallFailed, asyncio.Future[Any] | None]:
        """One try: the reply (or the failure that took it) and the WAIT's future, if any."""
        while True:
            if self._state is not State.OPEN:
                raise EngineUnavailable("the transport was closed during the call")
            node = asking or self._slot_nodes[slot]
            conn = node.conn if then is None else node.durable_conn
            if conn is None or not conn.alive:
                conn = await node.connection(deadline, durable=then is not None)
            if conn.full:
                try:
                    await conn.wait_for_room(deadline)
                except CallFailed as exc:
                    raise _public_error(exc, idempotent=True) from exc  # nothing was sent
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
                return await fut, then_fut
            except CallFailed as exc:
                return exc, then_fut

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
        direct: list[bool] | None = None,
        prefix: bytes | None = None,
    ) -> list[Any]:
        """Send many idempotent commands at once; replies in input order.

        ``items`` are ``(slot, packed)``; ``script`` as for ``call``. Commands are
        grouped by node and written in chunks, yielding to the loop between chunks so a
        10,000-command call never blocks other tasks for long. After a SCRIPT FLUSH the
        NOSCRIPT items are sent again in bulk once the scripts are reloaded; items that got
        a redirect or a retry-later reply are retried one by one through ``call``. Never
        raises for a single item: a failed item's place holds an ``EngineUnavailable``.
        ``direct``, if given (one ``True`` per item), gets ``False`` for the items retried
        through ``call``, whose reply may come from another node than the slot's at the
        start (the local cache stores only direct replies). ``prefix``: a command written
        before each item of the first round, its reply dropped (``CLIENT CACHING YES``).
        """
        if self._state is not State.OPEN:
            raise EngineUnavailable("the transport is not open")
        loop = self.loop
        if deadline is None:
            deadline = loop.time() + self.options.command_timeout
        results = await self._send_bulk(items, deadline, prefix)
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
        if direct is not None:
            for i in retry:
                direct[i] = False
        if retry and loop.time() < deadline:

            async def again(i: int) -> None:
                slot, packed = items[i]
                try:
                    results[i] = await self.call(slot, packed, deadline=deadline, script=script)
                except EngineUnavailable as exc:
                    results[i] = exc

            await asyncio.gather(*(again(i) for i in retry))
        return results

    async def _send_bulk(
        self, items: Sequence[tuple[int, bytes]], deadline: float, prefix: bytes | None = None
    ) -> list[Any]:
        """One pipelined round: every item to its slot's node, replies (or errors) in order."""
        results: list[Any] = [None] * len(items)
        groups: dict[Node, list[int]] = {}
        slot_nodes = self._slot_nodes
        for i, item in enumerate(items):
            node = slot_nodes[item[0]]
            group = groups.get(node)
            if group is None:
                groups[node] = [i]
            else:
                group.append(i)

        async def run_group(node: Node, indices: list[int]) -> None:
            try:
                conn = await node.connection(deadline)
            except EngineUnavailable as exc:
                for i in indices:
                    results[i] = exc
                return
            sink = Sink(self.loop, len(indices))
            sent = 0
            send_to = conn.send_to
            for start in range(0, len(indices), _BULK_CHUNK):
                if start:
                    await asyncio.sleep(0)  # let the flush and other tasks run
                if conn.full:
                    try:
                        await conn.wait_for_room(deadline)
                    except CallFailed:
                        break
                if not conn.alive:
                    break
                for i in indices[start : start + _BULK_CHUNK]:
                    send_to(sink, items[i][1], deadline, prefix)
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

    async def call_node(self, node: Node, *args: Any) -> Any:
        """One command to one node (admin: INFO, DBSIZE, SCAN). Raises on error replies."""
        deadline = self.deadline()
        conn = await node.connection(deadline)
        reply = await self._wait(conn.send(pack(args), deadline))
        if isinstance(reply, ReplyError):
            raise permission_denied(reply, operation=f"{args[0]} on {node.name}") or (
                EngineUnavailable(f"{node.name}: {reply}")
            )
        return reply

    async def call_node_many(self, node: Node, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
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

        async def load(node: Node) -> None:
            conn = await node.connection(deadline)
            futs = [
                conn.send(pack(("SCRIPT", "LOAD", s.source)), deadline)
                for s in self._scripts.values()
            ]
            for fut in futs:
                reply = await self._wait(fut)
                if isinstance(reply, ReplyError):
                    raise permission_denied(reply, operation="SCRIPT LOAD") or (
                        EngineUnavailable(f"SCRIPT LOAD failed on {node.name}: {reply}")
                    )

        await asyncio.gather(*(load(n) for n in self.primaries()))


_ASKING: Final = pack(("ASKING",))
_READONLY: Final = pack(("READONLY",))
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
