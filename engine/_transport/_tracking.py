"""Server-assisted invalidation for the local cache: one subscriber connection per node.

How a node tells us that a key we cached changed (Redis client-side caching, default
tracking mode), and why it is built this way:

- **RESP2 + REDIRECT, not RESP3 pushes.** hiredis-py returns a RESP3 push as a plain list,
  so on the multiplexed data connection a push could not be told from the reply of the next
  pending command. The data connection stays RESP2 and sends ``CLIENT TRACKING ON REDIRECT
  <id>``; ``<id>`` is a second connection to the same node, subscribed to
  ``__redis__:invalidate``, which receives every invalidation as a pub/sub message.
- **OPTIN.** Only the validations whose reply may be stored are tracked: each is sent
  right after ``CLIENT CACHING YES`` (``CACHING_YES``; its reply is dropped). Without it,
  every key any command of the data connection reads would be tracked, writes included
  (a create reads the user's index): invalidations and tracking-table entries for keys
  no cache holds (5,000 creates for 500 users made 15,000 messages).
- **Not NOLOOP.** With NOLOOP, a key that our own validate refreshes (PEXPIRE inside the
  script) is removed from the server's tracking table *without* a message to us: a later
  revoke by another client would then never be announced. Without it, our own refresh
  costs one invalidation and one extra miss per refresh period (a few % of idle_ttl).
- **Keys read inside scripts are tracked**: Redis remembers the keys read by the commands
  a script runs, on behalf of the calling client (tests/test_local_cache.py proves it).
- **Ordering.** The invalidation and the reply of a read travel on different connections,
  so an invalidation may overtake the reply of the read it concerns; the cache refuses to
  store a reply when an invalidation of the same hash tag arrived after the read was sent
  (engine/_local_cache.py).
- **Liveness.** Every probe period the tracker PINGs the subscriber (the pong comes after
  every invalidation the node emitted before it) and, on a cluster, asks ``CLUSTER INFO``
  on the data connection (a primary cut off from the majority reports
  ``cluster_state:fail`` after node_timeout, before a replica can be promoted elsewhere). A
  node's entries are served only until ``probe sent + max_staleness``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import hiredis

from .._errors import ReplyError
from ._connection import pack

if TYPE_CHECKING:
    from ._connection import Connection
    from ._node import Node

__all__ = ["CACHING_YES", "INVALIDATION_CHANNEL", "Subscriber", "Tracker", "TrackerOwner"]

log = logging.getLogger("engine.local_cache")

INVALIDATION_CHANNEL = b"__redis__:invalidate"
CACHING_YES = pack(("CLIENT", "CACHING", "YES"))
"""Written before a validation whose reply may be cached: its keys are tracked (OPTIN)."""
_MESSAGE = b"message"
_CLUSTER_OK = b"cluster_state:ok"


class TrackerOwner:
    """What a tracker reports to (the local cache): implemented by ``LocalCache``."""

    def invalidated(self, keys: list[bytes]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def drop_node(self, tracker: Tracker, reason: str) -> None:  # pragma: no cover
        raise NotImplementedError


class Subscriber(asyncio.Protocol):
    """The connection that receives a node's invalidation messages (RESP2 pub/sub)."""

    def __init__(self, on_keys: Callable[[list[bytes] | None], None], on_lost: Callable[[], None]):
        self._on_keys = on_keys
        self._on_lost = on_lost
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.alive = False
        self.client_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.alive = True

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is list and len(reply) == 3 and reply[0] == _MESSAGE:
                    # ["message", "__redis__:invalidate", [key, ...] | nil (a flush)]
                    self._on_keys(reply[2])
                    continue
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.abort(f"invalidation stream out of step: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.alive and self._transport is None:
            return
        self.alive = False
        pending, self._pending = self._pending, deque()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ConnectionError(f"invalidation connection lost: {exc!r}"))
        self._on_lost()

    def send(self, *args: Any) -> asyncio.Future[Any]:
        return self.send_packed(pack(args))

    def send_packed(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self.alive or self._transport is None:
            fut.set_exception(ConnectionError("invalidation connection is closed"))
            return fut
        self._pending.append(fut)
        self._transport.write(packed)
        return fut

    def abort(self, why: str) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows, which reports it
        else:
            self.alive = False
        log.debug("invalidation connection aborted: %s", why)


class Tracker:
    """Client tracking for ONE node: its subscriber, the epoch of what it vouches for, and
    how long its entries may still be served (``fresh_until``, time.monotonic()).

    ``epoch`` changes whenever the node could have changed something without telling us
    (a lost connection, a flush, tracking switched to a new subscriber): a read sent under
    an older epoch is never stored, and entries of an older epoch have been dropped.
    """

    def __init__(self, owner: TrackerOwner, node: Node, max_staleness: float) -> None:
        self.owner = owner
        self.node = node
        self.max_staleness = max_staleness
        self.epoch = 0
        self.ready = False  # tracking is on for ``data_conn`` and redirected to ``_sub``
        self.fresh_until = 0.0
        self.data_conn: Connection | None = None
        self.refused = False  # the server refused tracking (e.g. ACL): cache stays off here
        self._sub: Subscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0
        self._failures = 0
        self._silent_since: float | None = None

    # -- state changes ----------------------------------------------------------------

    def reset(self, reason: str) -> None:
        """Forget everything this node vouched for (it may have changed unseen)."""
        self.epoch += 1
        was_ready = self.ready
        self.ready = False
        self.fresh_until = 0.0
        self.data_conn = None
        if was_ready:
            self.owner.drop_node(self, reason)

    def _flushed(self) -> None:
        # A flush (FLUSHALL, a replica's full resync): every key we track there is gone.
        self.epoch += 1
        self.owner.drop_node(self, "flush")

    def _on_keys(self, keys: list[bytes] | None) -> None:
        if keys is None:
            self._flushed()
        else:
            self.owner.invalidated(keys)

    def _on_sub_lost(self) -> None:
        self._sub = None
        self.reset("connection")

    def data_connection_lost(self) -> None:
        self.reset("connection")

    def close(self) -> None:
        self.reset("closed")
        if self._task is not None:
            self._task.cancel()
        if self._sub is not None:
            self._sub.abort("cache closed")
            self._sub = None

    # -- supervision (called every probe period by the cache) -------------------------

    def tick(self, now: float) -> None:
        """Set tracking up if needed, or probe liveness; never more than one task at once."""
        if self._task is not None and not self._task.done():
            return
        conn = self.node.conn
        if conn is None or not conn.alive:
            if self.ready:
                self.reset("connection")
            return  # nothing to track until a validation connects
        if self.ready and self.data_conn is not conn:
            self.reset("connection")  # a new data connection tracks nothing yet
        if not self.ready:
            if now >= self._next_try and not self.refused:
                self._task = asyncio.get_running_loop().create_task(self._setup(conn))
            return
        self._task = asyncio.get_running_loop().create_task(self._probe(conn))

    async def _setup(self, conn: Connection) -> None:
        node = self.node
        transport = node.owner
        epoch = self.epoch
        timeout = transport.options.connect_timeout
        try:
            sub = self._sub
            if sub is None or not sub.alive:
                sub = await self._open_subscriber()
                self._sub = sub
            sent_at = time.monotonic()
            reply = await asyncio.wait_for(
                conn.send(
                    pack(("CLIENT", "TRACKING", "ON", "REDIRECT", sub.client_id, "OPTIN")),
                    transport.loop.time() + timeout,
                ),
                timeout,
            )
            if isinstance(reply, ReplyError):
                self.refused = True
                log.warning(
                    "local cache off for %s: the server refused CLIENT TRACKING: %s",
                    node.name,
                    reply,
                )
                return
        except Exception as exc:  # any failure: try again later, with backoff
            self._failures += 1
            self._next_try = time.monotonic() + min(5.0, 0.1 * 2**self._failures)
            log.debug("tracking set-up for %s failed: %r", node.name, exc)
            return
        if epoch != self.epoch or node.conn is not conn or not conn.alive or not sub.alive:
            return  # something changed meanwhile: the next tick starts over
        self._failures = 0
        self.data_conn = conn
        self.ready = True
        self.fresh_until = sent_at + self.max_staleness
        self._silent_since = None

    async def _open_subscriber(self) -> Subscriber:
        node = self.node
        transport = node.owner
        loop = transport.loop
        timeout = transport.options.connect_timeout
        transport.refresh_credentials()  # a rotated password or certificate, as for any connect
        sub = Subscriber(self._on_keys, self._on_sub_lost)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: sub,
                    node.host,
                    node.port,
                    ssl=transport.ssl,
                    server_hostname=node.host if transport.ssl is not None else None,
                ),
                timeout,
            )
            futs = [sub.send_packed(cmd) for cmd in transport.handshake]
            id_fut = sub.send("CLIENT", "ID")
            sub_fut = sub.send("SUBSCRIBE", INVALIDATION_CHANNEL)
            for fut in (*futs, id_fut, sub_fut):
                fut.add_done_callback(_retrieve)
            for fut in (*futs, id_fut, sub_fut):
                reply = await asyncio.wait_for(fut, timeout)
                if isinstance(reply, ReplyError):
                    raise ConnectionError(f"{node.name} refused: {reply}")
            sub.client_id = int(id_fut.result())
        except BaseException:
            sub.abort("set-up failed")
            raise
        return sub

    async def _probe(self, conn: Connection) -> None:
        sub = self._sub
        if sub is None:
            return
        epoch = self.epoch
        sent_at = time.monotonic()
        timeout = self.max_staleness
        pong = sub.send("PING")
        info = (
            conn.send(_CLUSTER_INFO, self.node.owner.loop.time() + timeout)
            if self.node.owner.cluster
            else None
        )
        # Whatever happens to this task (a timeout, the cache closing), a failure that
        # reaches these futures later is retrieved: never "exception was never retrieved".
        for fut in (pong, info):
            if fut is not None:
                fut.add_done_callback(_retrieve)
        ok = True
        try:
            async with asyncio.timeout(timeout):
                await pong
                if info is not None:
                    reply = await info
                    ok = isinstance(reply, bytes) and _CLUSTER_OK in reply
        except Exception:  # no pong in time (paused, partitioned) or a lost connection
            self._silent(epoch, sent_at)
            return
        if epoch != self.epoch:
            return
        self._silent_since = None
        if ok:
            self.fresh_until = max(self.fresh_until, sent_at + self.max_staleness)
        else:
            # The node says its cluster is down (cut off from the majority): a replica may
            # be promoted elsewhere and take writes we would never hear of.
            self.fresh_until = 0.0
            self.owner.drop_node(self, "cluster_down")

    def _silent(self, epoch: int, since: float) -> None:
        if epoch != self.epoch:
            return
        self.owner.drop_node(self, "silent")
        self.fresh_until = 0.0
        if self._silent_since is None:
            self._silent_since = since
        elif (
            time.monotonic() - self._silent_since > max(2.0, 4 * self.max_staleness)
            and self._sub is not None
        ):
            # Silent for long: start over with a new subscriber once the node answers.
            self._sub.abort("silent")


_CLUSTER_INFO = pack(("CLUSTER", "INFO"))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
