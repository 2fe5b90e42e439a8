"""A Redis node as the transport sees it: its connections, its circuit breaker.

Connecting doubles as the half-open probe of the breaker (connect + handshake within
``connect_timeout``): a SIGSTOPped server accepts TCP connections but never answers.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Final

from .._errors import EngineError, EngineUnavailable, ReplyError, permission_denied
from ._connection import CallFailed, Connection, Reply

if TYPE_CHECKING:
    from ._routing import Transport

__all__ = ["Node"]

_BREAKER_CAP: Final = 2.0  # seconds: the longest a breaker stays open before a probe


def _retrieve(fut: asyncio.Future[Reply]) -> None:
    if not fut.cancelled():
        fut.exception()


class Node:
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
        self.conn: Connection | None = None
        self.durable_conn: Connection | None = None
        self.connecting: asyncio.Task[Connection] | None = None
        self.durable_connecting: asyncio.Task[Connection] | None = None
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

    def connections(self) -> list[Connection]:
        return [c for c in (self.conn, self.durable_conn) if c is not None]

    def connection_lost(self, conn: Connection) -> None:
        if self.durable_conn is conn:
            self.durable_conn = None
        if self.conn is conn:
            self.conn = None
            for listener in self.owner.connection_listeners:
                listener(self)
            if not self.owner.closing:
                self.owner.request_refresh()

    async def connection(self, deadline: float, *, durable: bool = False) -> Connection:
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
            task.add_done_callback(_retrieve_failure)
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
        except EngineError:  # EngineUnavailable, or PermissionDenied from the handshake
            raise
        except Exception as exc:  # pragma: no cover - _connect maps its errors
            raise EngineUnavailable(f"cannot connect to {self.name}: {exc!r}") from exc

    async def _connect(self, durable: bool) -> Connection:
        owner = self.owner
        loop = owner.loop
        opts = owner.options
        probe: Connection | None = None  # to close if the handshake fails
        owner.refresh_credentials()  # rotated certificate or password files: used from now
        try:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Connection(self, loop, opts.max_inflight_per_node),
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
                    # A refused or cancelled handshake fails the replies still awaited:
                    # nobody reads them, so they must not be reported "never retrieved".
                    fut.add_done_callback(_retrieve)
                for fut in futs:
                    reply = await asyncio.wait_for(fut, opts.connect_timeout)
                    if isinstance(reply, ReplyError):
                        conn.abort(CallFailed(str(reply)))
                        raise permission_denied(reply, operation=f"handshake with {self.name}") or (
                            EngineUnavailable(f"{self.name} refused the handshake: {reply}")
                        )
            except (OSError, TimeoutError, CallFailed) as exc:
                if probe is not None:
                    # A probe that connected but got no answer (SIGSTOPped server): close
                    # it, or every failed probe leaks a socket the server keeps once back.
                    probe.abort(CallFailed(f"handshake with {self.name} failed"))
                self.failures += 1
                self.trip(loop.time())
                owner.request_refresh()
                raise EngineUnavailable(f"cannot connect to {self.name}: {exc!r}") from exc
            except BaseException:
                # Cancelled (aclose() while connecting): the socket must not outlive us.
                if probe is not None:
                    probe.abort(CallFailed(f"connecting to {self.name} was cancelled"))
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
            conn.abort(CallFailed("transport closed"))
        self.conn = self.durable_conn = None


def _retrieve_failure(task: asyncio.Task[Connection]) -> None:
    # A connect can outlive every caller: a dropped SYN (a partition) takes connect_timeout,
    # longer than a call's deadline. Its failure is already counted by the breaker; retrieve
    # it so asyncio does not log "Task exception was never retrieved" for every probe.
    if not task.cancelled():
        task.exception()
