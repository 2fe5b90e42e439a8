"""Session events from keyspace notifications, subscribed on EVERY primary.

Redis publishes a keyspace notification only on the node that holds the key, and a
cluster does not forward them: a subscriber on one node (what Spring Session's users
report losing expiry events with) sees a third of a three-primary cluster. So the stream
keeps one subscription per primary and reconciles them with the transport's slot map every
``_RECONCILE`` seconds: a new primary (failover, a node added, slots moved to it) is
subscribed, a node that stopped being a primary is dropped, a lost subscription asks the
transport for a fresh slot map.

What maps to what (the scripts send commands chosen so that each kind is unambiguous):

==============  =============================================  ============================
kind            notification on a session key                  sent by
==============  =============================================  ============================
``created``     ``append``                                     create.lua (nothing else
                                                               APPENDs)
``rotated``     ``rename_from`` (old) then ``rename_to`` (new)  rotate.lua, same slot
``revoked``     ``del``                                        revoke, revoke_user, the
                                                               session limit's eviction,
                                                               validate dropping a session
                                                               past its deadline
``expired``     ``expired``                                    Redis: the TTL ran out
``evicted``     ``evicted``                                    Redis: ``maxmemory`` policy
==============  =============================================  ============================

A login ``rotate`` into another user's slot is two writes on two nodes: a ``revoked``
then a ``created``. Updates (``set``) and TTL refreshes (``expire``) are not events.

Delivery is AT MOST ONCE: Redis pub/sub keeps nothing for a subscriber that is not
connected, so events published while a subscription is down (a primary failing over, until
the promoted replica is subscribed) or while the stream's queue is full (counted in
``dropped``) are lost for good. Use events for audit trails and caches that tolerate a
miss, never as the only record of a revocation.

Around a failover the other way round is possible too: a primary demoted to replica keeps
its subscription until the stream's next reconcile sees the new slot map (about half a
second once the transport has refreshed it), and a replica applying its new primary's
writes publishes notifications for them too, so an event may then arrive twice (an expiry
as a ``revoked``: replicas delete expired keys on their primary's ``DEL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Self

import hiredis
from pydantic import BaseModel, ConfigDict

from ._errors import EngineError, EngineUnavailable, EventsUnavailable
from ._keys import slot_of_tag
from ._transport import pack

if TYPE_CHECKING:
    from ._engine import SessionEngine
    from ._transport._node import Node

__all__ = ["REQUIRED_FLAGS", "SessionEvent", "SessionEventKind", "SessionEventStream"]

REQUIRED_FLAGS: Final = "Kg$xe"
"""``notify-keyspace-events`` flags the events need: K keyspace channel, g generic (del,
rename), $ string (append), x expired, e evicted. ``A`` stands for ``g$lshzxetd``."""
_ALIAS_A: Final = "g$lshzxetd"
_RECONCILE: Final = 0.5  # seconds between checks of the subscriptions against the slot map
_USERS_MEMO: Final = 100_000  # session id -> user id, from created/rotated events


class SessionEventKind(enum.StrEnum):
    """What happened to a session."""

    CREATED = "created"
    ROTATED = "rotated"
    REVOKED = "revoked"
    EXPIRED = "expired"
    EVICTED = "evicted"


class SessionEvent(BaseModel):
    """One session event (see ``SessionEngine.events``).

    Attributes:
        kind: What happened.
        session_id: The session's public id (for ``rotated``, the id that ended).
        user_id: The owner when known: read from the session for ``created`` and
            ``rotated``, remembered from those for later events of the same session;
            ``None`` for anonymous sessions and for sessions this stream never saw alive.
        at: When the notification arrived (this process's clock, UTC).
        new_session_id: For ``rotated``, the id that replaced ``session_id``.
    """

    model_config = ConfigDict(frozen=True)

    kind: SessionEventKind
    session_id: str
    user_id: str | None
    at: datetime
    new_session_id: str | None = None


class _Subscription(asyncio.Protocol):
    """One pub/sub connection to one primary: a PSUBSCRIBE to its session keys."""

    def __init__(self, stream: SessionEventStream, node: Node, expected: int) -> None:
        self.stream = stream
        self.node = node
        self.reader = hiredis.Reader()
        self.replies: list[Any] = []
        self.expected = expected  # handshake replies before the subscription is live
        self.ready: asyncio.Future[list[Any]] = stream.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.renamed_from: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.ready.done():
                self.replies.append(reply)
                if len(self.replies) == self.expected:
                    self.ready.set_result(self.replies)
                continue
            # [b"pmessage", pattern, b"__keyspace@0__:<key>", event]
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                self.on_notification(reply[2], reply[3])

    def on_notification(self, channel: bytes, event: bytes) -> None:
        key = channel.partition(b"__:")[2]
        if event == b"rename_from":
            self.renamed_from = key
            return
        old, self.renamed_from = self.renamed_from, None
        if event == b"rename_to":
            if old is not None:
                self.stream.push(SessionEventKind.ROTATED, old, key)
            return
        kind = _KINDS.get(event)
        if kind is not None:
            self.stream.push(kind, key, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.node.name} closed the connection"))
        self.stream.on_lost(self)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


_KINDS: Final = {
    b"append": SessionEventKind.CREATED,
    b"del": SessionEventKind.REVOKED,
    b"expired": SessionEventKind.EXPIRED,
    b"evicted": SessionEventKind.EVICTED,
}


def _missing_flags(value: str) -> str:
    flags = set(value)
    if "A" in flags:
        flags |= set(_ALIAS_A)
    return "".join(f for f in REQUIRED_FLAGS if f not in flags)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def keyspace_pattern(prefix: str, db: int = 0) -> str:
    """The PSUBSCRIBE pattern of the session keys' notifications (also the ACL channel:
    Redis matches a PSUBSCRIBE pattern against the allowed ones literally)."""
    return f"__keyspace@{db}__:{_glob_escape(prefix)}:{{*}}:s:*"


class SessionEventStream:
    """An async iterator of ``SessionEvent`` (``SessionEngine.events()`` makes one).

    ``async with engine.events() as events: async for event in events: ...``; entering
    checks ``notify-keyspace-events`` on every primary and subscribes them all, so every
    change after it returns is seen (at most once; see the module docstring). Iterating
    without ``async with`` starts it on the first ``__anext__``; ``aclose()`` ends it
    (safe twice).

    Attributes:
        dropped: Events lost because the queue was full (the consumer was too slow).
    """

    def __init__(
        self,
        engine: SessionEngine,
        *,
        check: bool = True,
        resolve_users: bool = True,
        max_queue: int = 10_000,
    ) -> None:
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError("max_queue must be a positive int")
        self._engine = engine
        self._check = check
        self._resolve = resolve_users
        self._queue: asyncio.Queue[tuple[SessionEventKind, bytes, bytes | None, datetime]] = (
            asyncio.Queue(max_queue)
        )
        self._subs: dict[str, _Subscription] = {}
        self._users: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: EngineError | None = None
        self._closed = False
        self._wake: asyncio.Event | None = None
        self.dropped = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._engine.transport.loop

    @property
    def subscribed(self) -> frozenset[str]:
        """The nodes ("host:port") whose notifications arrive now."""
        return frozenset(name for name, sub in self._subs.items() if not sub.lost)

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> Self:
        """Check and subscribe every primary; then watch the topology in the background.

        Raises:
            EventsUnavailable: a primary lacks needed ``notify-keyspace-events`` flags.
            EngineUnavailable: a primary cannot be reached.
        """
        if self._closed:
            raise EngineError("this event stream was closed; ask engine.events() again")
        if self._task is not None:
            return self
        self._wake = asyncio.Event()
        try:
            primaries = self._engine.transport.primaries()
            await asyncio.gather(*(self._subscribe(n) for n in primaries))
        except BaseException:
            await self.aclose()
            raise
        self._task = self.loop.create_task(self._watch())
        return self

    async def aclose(self) -> None:
        """Unsubscribe everywhere. Safe to call twice; a waiting ``__anext__`` ends."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subs.values():
            sub.close()
        self._subs.clear()
        if self._wake is not None:
            self._wake.set()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionEvent:
        if self._task is None and not self._closed:
            await self.start()
        while True:
            if self._failure is not None:
                raise self._failure
            if not self._queue.empty():
                return await self._event(*self._queue.get_nowait())
            if self._closed:
                raise StopAsyncIteration
            assert self._wake is not None
            self._wake.clear()
            await self._wake.wait()

    # -- subscriptions ----------------------------------------------------------------

    async def _subscribe(self, node: Node) -> None:
        transport = self._engine.transport
        if self._check:
            await self._check_flags(node)
        pattern = keyspace_pattern(self._engine.settings.key_prefix, transport.db)
        commands = [*transport.handshake, pack(("PSUBSCRIBE", pattern))]
        loop = self.loop
        timeout = max(transport.options.connect_timeout, 1.0)
        try:
            _, sub = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Subscription(self, node, len(commands)),
                    node.host,
                    node.port,
                    ssl=transport.ssl,
                    server_hostname=node.host if transport.ssl is not None else None,
                ),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"cannot subscribe to {node.name}: {exc!r}") from exc
        assert sub.transport is not None
        sub.transport.write(b"".join(commands))
        try:
            replies = await asyncio.wait_for(asyncio.shield(sub.ready), timeout)
        except (OSError, TimeoutError) as exc:
            sub.ready.cancel()  # nobody will read its outcome now
            sub.close()
            raise EngineUnavailable(f"cannot subscribe to {node.name}: {exc!r}") from exc
        refused = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if refused:
            sub.close()
            raise EngineUnavailable(f"{node.name} refused the subscription: {refused[0]}")
        old = self._subs.get(node.name)
        if old is not None:
            old.close()
        if self._closed:
            sub.close()
            return
        self._subs[node.name] = sub

    async def _check_flags(self, node: Node) -> None:
        try:
            reply = await self._engine.transport.call_node(
                node, "CONFIG", "GET", "notify-keyspace-events"
            )
        except EngineUnavailable as exc:
            if "unknown command" in str(exc).lower() or "noperm" in str(exc).lower():
                raise EventsUnavailable(
                    f"cannot read notify-keyspace-events on {node.name} ({exc}); set it to "
                    f"include {REQUIRED_FLAGS!r} and pass check=False"
                ) from exc
            raise
        value = reply[1].decode() if isinstance(reply, list) and len(reply) == 2 else ""
        missing = _missing_flags(value)
        if missing:
            raise EventsUnavailable(
                f"notify-keyspace-events on {node.name} is {value!r}, missing {missing!r} "
                f"(K keyspace, g del/rename, $ append, x expired, e evicted): run "
                f"CONFIG SET notify-keyspace-events {REQUIRED_FLAGS} on every node, replicas "
                f"too (they become primaries), or set it in redis.conf"
            )

    def on_lost(self, sub: _Subscription) -> None:
        if not self._closed:
            # The node died or failed over: ask who serves its slots now.
            with contextlib.suppress(EngineError):
                self._engine.transport.request_refresh()

    async def _watch(self) -> None:
        """Keep one live subscription per primary of the current slot map."""
        while not self._closed:
            await asyncio.sleep(_RECONCILE)
            try:
                transport = self._engine.transport
            except EngineError as exc:  # the engine was closed under the stream
                self._fail(exc)
                return
            primaries = {n.name: n for n in transport.primaries()}
            for name, sub in list(self._subs.items()):
                if sub.lost or name not in primaries:
                    sub.close()
                    del self._subs[name]
            missing = [n for name, n in primaries.items() if name not in self._subs]
            if not missing:
                continue
            results = await asyncio.gather(
                *(self._subscribe(n) for n in missing), return_exceptions=True
            )
            for result in results:
                if isinstance(result, EventsUnavailable):
                    # A promoted replica without the flags: say so rather than go quiet.
                    self._fail(result)
                    return
                if isinstance(result, BaseException):
                    transport.request_refresh()  # not promoted yet, or still down

    def _fail(self, error: EngineError) -> None:
        """End the iteration with ``error`` (raised by the next ``__anext__``)."""
        self._failure = error
        for sub in self._subs.values():  # a dead stream holds no sockets
            sub.close()
        self._subs.clear()
        assert self._wake is not None
        self._wake.set()

    # -- events -----------------------------------------------------------------------

    def push(self, kind: SessionEventKind, key: bytes, new_key: bytes | None) -> None:
        try:
            self._queue.put_nowait((kind, key, new_key, datetime.now(UTC)))
        except asyncio.QueueFull:
            self.dropped += 1
            return
        assert self._wake is not None
        self._wake.set()

    async def _event(
        self, kind: SessionEventKind, key: bytes, new_key: bytes | None, at: datetime
    ) -> SessionEvent:
        sid = _session_id(key)
        new_sid = _session_id(new_key) if new_key is not None else None
        user = self._users.get(sid)
        if kind is SessionEventKind.CREATED or kind is SessionEventKind.ROTATED:
            live = new_key if new_key is not None else key
            user = await self._owner(live) if self._resolve else None
            if self._resolve:
                _remember(self._users, new_sid or sid, user)
        if kind is not SessionEventKind.CREATED:
            self._users.pop(sid, None)
        return SessionEvent(kind=kind, session_id=sid, user_id=user, at=at, new_session_id=new_sid)

    async def _owner(self, key: bytes) -> str | None:
        """The owner of a live session key (one GET), ``None`` if gone or unreachable."""
        tag = key[key.index(b"{") + 1 : key.index(b"}")]
        try:
            value = await self._engine.transport.call(
                slot_of_tag(tag), pack(("GET", key)), idempotent=True
            )
        except EngineError:
            return None
        if not isinstance(value, bytes):
            return None
        head = value.partition(b"|")[0]
        try:
            return self._engine._parse_head(head)[0]
        except (ValueError, KeyError, IndexError):
            return None


def _session_id(key: bytes) -> str:
    return key[key.rindex(b":") + 1 :].decode("ascii", "replace")


def _remember(memo: dict[str, str | None], sid: str, user: str | None) -> None:
    if len(memo) >= _USERS_MEMO:
        for old in list(itertools.islice(memo, _USERS_MEMO // 2)):
            del memo[old]
    memo[sid] = user
