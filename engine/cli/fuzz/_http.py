"""The ``http`` target: ``engine.fastapi``'s public dependencies in a tiny app, over ASGI."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from ..._errors import (
    EngineUnavailable,
)
from ..._models import Session, SessionState
from ._core import Source, broken, pick, show, token_ok
from ._gen import gen_headers

# -- target: http ----------------------------------------------------------------------


class StubEngine:
    """Enough of a ``SessionEngine`` for the FastAPI dependencies: answers set per request."""

    def __init__(self) -> None:
        self.mode = "none"  # "valid", "none" or "unavailable"
        self.user = "fuzz-user"
        self.calls: list[object] = []

    def _answer(self, token: object) -> Session | None:
        self.calls.append(token)
        if self.mode == "unavailable":
            raise EngineUnavailable("stub: no answer in time")
        if self.mode == "none":
            return None
        now = datetime.now(UTC)
        return Session(
            session_id="S" * 22,
            user_id=self.user,
            state=SessionState.ACTIVE,
            data={},
            created_at=now,
            expires_at=now + timedelta(minutes=30),
            absolute_expires_at=now + timedelta(days=1),
            version=0,
        )

    async def validate(self, token: object, states: object = None) -> Session | None:
        return self._answer(token)

    async def get(self, token: object) -> Session | None:
        return self._answer(token)

    async def validate_many(self, tokens: Any, states: object = None) -> list[Session | None]:
        return [self._answer(t) for t in tokens]

    async def open(self) -> StubEngine:
        return self

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> StubEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class HttpApp:
    """A tiny FastAPI app on the public dependencies, driven over raw ASGI (so any header
    bytes reach it), with its lifespan entered once."""

    def __init__(self) -> None:
        from fastapi import Depends, FastAPI  # noqa: PLC0415 (an optional extra)

        from ... import fastapi as ef  # noqa: PLC0415

        self.stub = StubEngine()
        # The session cookie's name, from the documented attribute of the default auth.
        self.cookie = str(getattr(ef.default_auth, "cookie_name", "session")).encode()
        app = FastAPI(lifespan=ef.engine_lifespan(engine=self.stub))  # type: ignore[arg-type]
        # Depends as default values: this module's annotations are strings, and FastAPI
        # resolves them in the module's globals, where Annotated/Depends are not.
        need = Depends(ef.require_session)
        maybe = Depends(ef.optional_session)
        raw = Depends(ef.current_token)
        owner = Depends(ef.require_user("fuzz-user"))

        @app.get("/require")
        async def require(session: Session = need) -> Any:
            return {"user": session.user_id}

        @app.get("/optional")
        async def optional(session: Session | None = maybe) -> Any:
            return {"user": session.user_id if session else None}

        @app.get("/token")
        async def token(tok: str = raw) -> Any:
            return {"token": tok}

        @app.get("/user")
        async def user(session: Session = owner) -> Any:
            return {"user": session.user_id}

        self.app = app
        self._shutdown: asyncio.Event | None = None
        self._lifespan: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = asyncio.Event()
        self._shutdown = shutdown = asyncio.Event()
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            if not sent:
                sent.append("startup")
                return {"type": "lifespan.startup"}
            await shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"lifespan failed: {message}")
            if message["type"] == "lifespan.startup.complete":
                started.set()

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(started.wait(), 10)

    async def stop(self) -> None:
        if self._shutdown is not None and self._lifespan is not None:
            self._shutdown.set()
            await asyncio.wait_for(self._lifespan, 10)

    async def request(
        self, path: str, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
            "state": {},
        }
        status = 0
        out_headers: dict[bytes, bytes] = {}
        body = b""

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers.update((k.lower(), v) for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")

        await self.app(scope, receive, send)  # type: ignore[arg-type]
        return status, out_headers, body


async def check_http(http: HttpApp, src: Source) -> None:
    """Any Authorization/Cookie bytes: 200/401/403/503 as documented, never 500, the
    token handed to the engine is a str from the request, never echoed in a refusal."""
    headers, token = gen_headers(src, http.cookie)
    mode = pick(src, ["valid", "none", "unavailable"])
    http.stub.user = pick(src, ["fuzz-user", "someone-else"])
    http.stub.mode = mode
    inputs: dict[str, Any] = {"headers": headers, "mode": mode, "user": http.stub.user}
    answers: dict[str, tuple[int, dict[bytes, bytes], bytes]] = {}
    calls: dict[str, list[object]] = {}
    for path in ("/token", "/require", "/optional", "/user"):
        http.stub.calls = []
        try:
            answers[path] = await http.request(path, headers)
        except Exception as exc:
            raise broken("http", f"GET {path} raised {show(exc)}", **inputs) from exc
        calls[path] = http.stub.calls
    text = b"\n".join(v for _, v in headers).decode("latin-1")

    status, hdrs, body = answers["/token"]
    if status not in (200, 401):
        raise broken("http", f"/token answered {status}", body=body, **inputs)
    given: object = json.loads(body)["token"] if status == 200 else None
    seen = calls["/require"]
    if len(seen) > 1:
        raise broken("http", f"/require validated {len(seen)} times", **inputs)
    if seen != ([given] if given is not None else []):
        raise broken(
            "http",
            "/require validated another token than /token returned",
            token_route=given,
            validated=seen,
            **inputs,
        )
    if given is not None:
        if type(given) is not str or not given:
            raise broken("http", f"the engine was handed {show(given)}", **inputs)
        if given not in text and '"' not in text and "\\" not in text:
            raise broken("http", f"the token {show(given)} is not in the request", **inputs)
    _check_known_forms(headers, token, given, http.cookie, inputs)

    want = {
        "/require": {"valid": 200, "none": 401, "unavailable": 503},
        "/optional": {"valid": 200, "none": 200, "unavailable": 503},
        "/user": {
            "valid": 200 if http.stub.user == "fuzz-user" else 403,
            "none": 401,
            "unavailable": 503,
        },
    }
    for path, table in want.items():
        status, hdrs, body = answers[path]
        expected = table[mode] if given is not None else (200 if path == "/optional" else 401)
        if status != expected:
            raise broken(
                "http", f"GET {path} answered {status}, not {expected}", body=body, **inputs
            )
        if status == 401 and b"bearer" not in hdrs.get(b"www-authenticate", b"").lower():
            raise broken("http", f"GET {path}: 401 without a Bearer challenge", **inputs)
        if status == 503 and b"retry-after" not in hdrs:
            raise broken("http", f"GET {path}: 503 without Retry-After", **inputs)
        if (
            status == 401
            and given is not None
            and b"invalid_token" not in hdrs.get(b"www-authenticate", b"")
        ):
            raise broken("http", f"GET {path}: 401 for a bad token without invalid_token", **inputs)
        if status != 200 and isinstance(given, str) and len(given) >= 12:
            shown = body + b"".join(hdrs.values())
            if given.encode("utf-8", "surrogatepass") in shown:
                raise broken("http", f"GET {path}: the refused token is echoed", **inputs)


def _check_known_forms(
    headers: list[tuple[bytes, bytes]],
    token: str,
    given: object,
    cookie: bytes,
    inputs: dict[str, object],
) -> None:
    """The documented forms must be read: ``Authorization: Bearer <t>`` first, then the
    session cookie; no header at all means no token."""
    auth = [v for k, v in headers if k == b"authorization"]
    cookies = [v for k, v in headers if k == b"cookie"]
    if not token_ok(token):
        return
    raw = token.encode()
    if auth == [b"Bearer " + raw] and given != token:
        raise broken("http", "a plain Bearer token was not read", got=given, **inputs)
    if not auth and cookies == [cookie + b"=" + raw] and given != token:
        raise broken("http", "a plain session cookie was not read", got=given, **inputs)
    if not auth and not cookies and given is not None:
        raise broken("http", "a token was found in a request without one", got=given, **inputs)
