"""A TCP proxy that loses a request or a reply on purpose, for "outcome unknown" tests.

Between the engine and one plain redis-server. Armed with ``drop_next_reply``, it lets
the server run the next command(s) and then cuts the client's connection instead of
passing the reply on (optionally running a hook first, e.g. another client's revoke, so
the hook lands between the first execution and any resend). Armed with
``drop_next_request``, it cuts the connection before the command reaches the server.
Every other byte passes through unchanged; reconnections are accepted as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Hook = Callable[[], Awaitable[object]]


class LossyProxy:
    """``async with LossyProxy(target_port) as proxy:`` then ``proxy.url``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._reply_skip: int | None = None  # replies to pass before dropping one
        self._reply_hook: Hook | None = None
        self._drop_request = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def drop_next_reply(self, *, skip: int = 0, before_close: Hook | None = None) -> None:
        """Pass ``skip`` reply chunks, then run ``before_close`` and cut the connection
        instead of passing the next one (the server has run that command)."""
        self._reply_skip = skip
        self._reply_hook = before_close

    def drop_next_request(self) -> None:
        """Cut the connection instead of passing the next request on (it never runs)."""
        self._drop_request = True

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)

        def cut() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._drop_request:
                    self._drop_request = False
                    self.dropped += 1
                    cut()
                    return
                up_writer.write(data)
                await up_writer.drain()
            cut()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self._reply_skip is not None:
                    if self._reply_skip == 0:
                        hook, self._reply_hook, self._reply_skip = self._reply_hook, None, None
                        if hook is not None:
                            await hook()
                        self.dropped += 1
                        cut()
                        return
                    self._reply_skip -= 1
                writer.write(data)
                await writer.drain()
            cut()

        for coro in (upstream(), downstream()):
            task = asyncio.create_task(_quiet(coro))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _quiet(coro: Awaitable[None]) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError, OSError):
        await coro
