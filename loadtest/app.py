"""The reference FastAPI service: sessions, chat history and metrics through ``engine.fastapi``.

Run it against any cluster node (settings come from ``ENGINE_*`` variables)::

    ENGINE_URL=redis://127.0.0.1:7000 uvicorn loadtest.app:app --loop uvloop

Endpoints: ``POST /login``, ``GET /me``, ``POST|GET /chat/{room}``, ``POST /rotate``,
``POST /logout``, ``POST /logout-all``, ``GET /healthz``, ``GET /metrics`` (Prometheus).

Start-up waits for the cluster: while no seed of ``ENGINE_URL`` answers (a name that does not
resolve yet, a cluster still forming), the app logs why and tries again every second for
``APP_STARTUP_RETRY`` seconds (default 0: fail at once, as ``engine_lifespan`` does), then
fails start-up, so a supervisor (Docker's ``restart``) sees a failed start, never a silent
one.

``APP_COOKIE_SECURE=0`` drops the ``Secure`` cookie flag for plain-HTTP local development
(the cookie is then ``session`` instead of ``__Host-session``). ``APP_CSRF=0`` turns off the
origin check of cookie-authenticated POSTs (on by default here).

Every engine error an endpoint lets through is answered by ``install_error_handlers``
(422/413/409/401/503, never 500); no answer names a Redis node.

The local cache (issue 12) is on: ``ENGINE_LOCAL_CACHE_SIZE`` defaults to
``REFERENCE_LOCAL_CACHE_SIZE`` (100,000 sessions) here, against 0 (off) in the library;
set it to ``0`` to run without. ``/metrics`` shows its counters
(``session_local_cache_{hits,misses,invalidations}_total``, ``session_local_cache_entries``,
``session_local_cache_drops_total{reason}``).

Metrics are per process: with ``uvicorn --workers N`` each scrape reads one worker.
"""

# No `from __future__ import annotations`: the dependency aliases are built per app in
# create_app, and FastAPI must see them as objects, not as names to resolve globally.

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import EngineSettings, EngineUnavailable, Session, SessionEngine
from engine.fastapi import (
    STATE_ATTRIBUTE,
    SessionAuth,
    engine_lifespan,
    get_engine,
    install_error_handlers,
)
from engine.metrics import PrometheusCollector

__all__ = ["REFERENCE_LOCAL_CACHE_SIZE", "app", "create_app", "reference_settings"]

log = logging.getLogger("loadtest.app")

STATS_MAX_AGE = 1.0
"""Seconds a cluster snapshot is reused by /metrics (it costs INFO, DBSIZE and SCAN per node)."""

REFERENCE_LOCAL_CACHE_SIZE = 100_000
"""The local cache of the reference service, unless ``ENGINE_LOCAL_CACHE_SIZE`` is set."""

Engine = Annotated[SessionEngine, Depends(get_engine)]


class LoginIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)


class TokenOut(BaseModel):
    token: str
    session_id: str


class ChatIn(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


_WORKER_HEADER = (b"x-worker", str(os.getpid()).encode())


class _LatencyMiddleware:
    """Request latency per route template (``/chat/{room}``, never the raw path)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
                # Which worker answered: the Locust scenarios name it in a failure (the
                # read-your-writes probes assume the worker that wrote is the one asked).
                message["headers"] = [*message.get("headers", ()), _WORKER_HEADER]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.histogram.labels(scope["method"], path, str(code)).observe(
                time.perf_counter() - t0
            )


def node_label(address: str) -> str:
    """A stable label for a node that does not publish its address on an HTTP endpoint."""
    return hashlib.sha256(address.encode()).hexdigest()[:12]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").lower() not in ("0", "false", "no")


def _startup_retry_seconds() -> float:
    raw = os.environ.get("APP_STARTUP_RETRY", "0")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"APP_STARTUP_RETRY must be a number of seconds, not {raw!r}") from None
    if not seconds >= 0:
        raise ValueError(f"APP_STARTUP_RETRY must be >= 0, not {raw!r}")
    return seconds


async def _open_engine(settings: EngineSettings, retry_for: float) -> SessionEngine:
    """An open engine; retries every second for ``retry_for`` seconds while none of the
    seeds answers (the last ``EngineUnavailable`` is raised after that)."""
    give_up = time.monotonic() + retry_for
    attempt = 1
    while True:
        engine = SessionEngine(settings)
        try:
            return await engine.open()
        except EngineUnavailable as exc:
            await engine.aclose()
            if time.monotonic() >= give_up:
                log.error(
                    "start-up: cannot reach the cluster (try %d): %s; giving up", attempt, exc
                )
                raise
            log.warning(
                "start-up: cannot reach the cluster yet (try %d): %s; retrying in 1 s", attempt, exc
            )
        attempt += 1
        await asyncio.sleep(1.0)


def reference_settings() -> EngineSettings:
    """``EngineSettings()`` from ``ENGINE_*``, with the local cache on unless the
    environment sizes it (``ENGINE_LOCAL_CACHE_SIZE=0`` turns it off)."""
    if any(name.upper() == "ENGINE_LOCAL_CACHE_SIZE" for name in os.environ):
        return EngineSettings()
    return EngineSettings(local_cache_size=REFERENCE_LOCAL_CACHE_SIZE)


def _lifespan(
    settings: EngineSettings | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """``engine_lifespan`` around an engine opened by ``_open_engine``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await _open_engine(settings or reference_settings(), _startup_retry_seconds())
        async with engine_lifespan(engine=engine, freeze_gc=True)(app):
            yield

    return lifespan


def create_app(settings: EngineSettings | None = None) -> FastAPI:
    """Build the service. No I/O: the engine connects when the app starts (lifespan).

    Args:
        settings: Engine settings; ``reference_settings()`` (``ENGINE_*``, the local cache
            on) at startup if omitted.
    """
    registry = CollectorRegistry()
    histogram = Histogram(
        "http_request_duration_seconds",
        "HTTP request latency by endpoint.",
        ["method", "endpoint", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    )
    secure = _env_flag("APP_COOKIE_SECURE")
    auth = SessionAuth(cookie_secure=secure, csrf=_env_flag("APP_CSRF"))
    current_session = Annotated[Session, Depends(auth.require_session)]
    current_token = Annotated[str, Depends(auth.current_token)]
    app = FastAPI(title="session engine reference service", lifespan=_lifespan(settings))
    # The engine's own figures (engine.metrics): counters, a latency histogram, breakers,
    # in-flight calls and the cluster's size, read at scrape time. The engine opens at
    # startup, so the collector asks the app for it.
    engine_metrics = PrometheusCollector(
        lambda: getattr(app.state, STATE_ATTRIBUTE, None),
        cluster_refresh=STATS_MAX_AGE,
        node_label=node_label,
    )
    registry.register(engine_metrics)
    install_error_handlers(app, realm=auth.realm)
    app.add_middleware(_LatencyMiddleware, histogram=histogram)

    @app.post("/login")
    async def login(body: LoginIn, engine: Engine, response: Response) -> TokenOut:
        # A real service checks a password or an identity provider first.
        new = await engine.create(user_id=body.user_id)
        auth.set_cookie(response, new.token)
        return TokenOut(token=new.token, session_id=new.session.session_id)

    @app.get("/me")
    async def me(session: current_session) -> Session:
        return session

    @app.post("/chat/{room}")
    async def chat_post(
        room: str, body: ChatIn, session: current_session, engine: Engine
    ) -> dict[str, int]:
        message = {"text": body.text, "sid": session.session_id, "ts": time.time()}
        length = await engine.chat_append(_user_of(session), room, message)
        return {"length": length}

    @app.get("/chat/{room}")
    async def chat_get(
        room: str, session: current_session, engine: Engine, limit: int = 50
    ) -> dict[str, list[Any]]:
        if not 1 <= limit <= 1000:
            raise HTTPException(422, "limit must be between 1 and 1000")
        return {"messages": await engine.chat_history(_user_of(session), room, limit)}

    @app.post("/rotate")
    async def rotate(
        session: current_session, token: current_token, engine: Engine, response: Response
    ) -> TokenOut:
        # SessionNotFound (revoked between validation and rotation) answers 401.
        new = await engine.rotate(token)
        auth.set_cookie(response, new.token)
        return TokenOut(token=new.token, session_id=new.session.session_id)

    @app.post("/logout")
    async def logout(token: current_token, engine: Engine, response: Response) -> dict[str, bool]:
        revoked = await engine.revoke(token)
        auth.clear_cookie(response)
        return {"revoked": revoked}

    @app.post("/logout-all")
    async def logout_all(
        session: current_session, engine: Engine, response: Response
    ) -> dict[str, int]:
        count = await engine.revoke_user(_user_of(session))
        auth.clear_cookie(response)
        return {"revoked": count}

    @app.get("/healthz", response_model=None)
    async def healthz(engine: Engine) -> dict[str, Any] | JSONResponse:
        try:
            # Healthy means every slot can be served right now.
            primaries = await engine.ping()
        except EngineUnavailable:
            # No error text: it names nodes, and this endpoint may be public.
            return JSONResponse(
                {"status": "unavailable"}, status_code=503, headers={"Retry-After": "1"}
            )
        return {"status": "ok", "primaries": primaries}

    @app.get("/metrics")
    async def metrics() -> Response:
        await engine_metrics.refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _user_of(session: Session) -> str:
    if session.user_id is None:
        raise HTTPException(403, "anonymous sessions have no chat")
    return session.user_id


app = create_app()
"""The module-level app for ``uvicorn loadtest.app:app`` (connects only when started)."""
