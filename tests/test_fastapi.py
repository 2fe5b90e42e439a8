"""engine.fastapi against the real cluster: tokens from header and cookie, 401/403/503."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from helpers import delete_prefix

from engine import EngineSettings, Session, SessionEngine, SessionState
from engine.fastapi import (
    SessionAuth,
    clear_session_cookie,
    current_token,
    document_cookie_auth,
    engine_lifespan,
    get_engine,
    optional_session,
    require_session,
    require_state,
    require_user,
    set_session_cookie,
)
from engine.testing import LocalCluster
from engine.testing import primary_clients as primaries
from loadtest.app import create_app

pytestmark = pytest.mark.cluster

CurrentSession = Annotated[Session, Depends(require_session)]
custom_auth = SessionAuth(cookie_name="sid", realm="custom")


def build_app(settings: EngineSettings) -> FastAPI:
    app = FastAPI(lifespan=engine_lifespan(settings))

    @app.post("/login/{user}")
    async def login(
        user: str, engine: Annotated[SessionEngine, Depends(get_engine)], response: Response
    ) -> dict[str, str]:
        new = await engine.create(user_id=user)
        set_session_cookie(response, new.token)
        return {"token": new.token}

    @app.get("/me")
    async def me(session: CurrentSession) -> dict[str, Any]:
        return {"user": session.user_id, "state": session.state.value}

    # The README's "fastest endpoint": the dependency called in the body, not Depends.
    @app.get("/me-direct", openapi_extra={"security": [{"HTTPBearer": []}]})
    async def me_direct(request: Request) -> dict[str, Any]:
        session = await require_session(request)
        return {"user": session.user_id, "state": session.state.value}

    @app.get("/maybe")
    async def maybe(session: Annotated[Session | None, Depends(optional_session)]) -> Any:
        return {"user": session.user_id if session else None}

    @app.get("/pending")
    async def pending(
        session: Annotated[Session, Depends(require_state(SessionState.PENDING))],
    ) -> dict[str, str]:
        return {"state": session.state.value}

    @app.get("/alice")
    async def alice(
        session: Annotated[Session, Depends(require_user("alice"))],
        again: CurrentSession,
    ) -> dict[str, Any]:
        return {"user": session.user_id, "same": again is session}

    @app.get("/active-or-locked")
    async def active_or_locked(
        session: Annotated[
            Session, Depends(require_state(SessionState.ACTIVE, SessionState.LOCKED))
        ],
        again: Annotated[Session | None, Depends(optional_session)],
    ) -> dict[str, Any]:
        return {"state": session.state.value, "active": again is not None}

    @app.get("/admin")
    async def admin(
        session: Annotated[Session, Depends(require_user(lambda s: s.data.get("admin") is True))],
    ) -> dict[str, Any]:
        return {"user": session.user_id}

    @app.post("/logout")
    async def logout(
        token: Annotated[str, Depends(current_token)],
        engine: Annotated[SessionEngine, Depends(get_engine)],
        response: Response,
    ) -> dict[str, bool]:
        revoked = await engine.revoke(token)
        clear_session_cookie(response)
        return {"revoked": revoked}

    @app.get("/custom")
    async def custom(
        session: Annotated[Session, Depends(custom_auth.require_session)],
    ) -> dict[str, Any]:
        return {"user": session.user_id}

    return app


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[tuple[httpx.AsyncClient, SessionEngine]]:
    """Run the app's lifespan (ASGITransport does not) and give a client and the engine."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        # https, so the client's cookie jar sends Secure cookies back.
        async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
            yield client, app.state.session_engine


@pytest.fixture
async def api(
    cluster_url: str, prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, SessionEngine]]:
    settings = EngineSettings(url=cluster_url, key_prefix=prefix)
    try:
        async with serve(build_app(settings)) as pair:
            yield pair
    finally:
        await asyncio.to_thread(delete_prefix, cluster_url, prefix)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str, name: str = "__Host-session") -> dict[str, str]:
    return {"Cookie": f"{name}={token}"}


async def test_bearer_and_cookie(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    token = (await engine.create(user_id="u1")).token
    r = await client.get("/me", headers=bearer(token))
    assert r.status_code == 200 and r.json() == {"user": "u1", "state": "active"}
    r = await client.get("/me", headers=cookie(token))
    assert r.status_code == 200 and r.json()["user"] == "u1"
    # A non-Bearer Authorization header falls back to the cookie.
    r = await client.get("/me", headers={"Authorization": "Basic eDp5", **cookie(token)})
    assert r.status_code == 200
    # The header wins over the cookie, both ways.
    r = await client.get("/me", headers={**bearer(token), **cookie("garbage")})
    assert r.status_code == 200
    r = await client.get("/me", headers={**bearer("garbage"), **cookie(token)})
    assert r.status_code == 401


async def test_401_missing_garbage_revoked(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    r = await client.get("/me")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'
    for garbage in ("garbage", "a" * 5000, "x.y", "{tag}.secret"):
        r = await client.get("/me", headers=bearer(garbage))
        assert r.status_code == 401, garbage
        assert r.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
    new = await engine.create(user_id="u2")
    assert (await client.get("/me", headers=bearer(new.token))).status_code == 200
    assert await engine.revoke(new.token)
    r = await client.get("/me", headers=bearer(new.token))
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    # A well-formed token that never existed is invalid too (it reaches Redis).
    other = await engine.create(user_id="u2")
    await engine.revoke(other.token)
    r = await client.get("/me", headers=cookie(other.token))
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_require_session_called_in_the_endpoint_answers_as_depends(
    api: tuple[httpx.AsyncClient, SessionEngine],
) -> None:
    """README, "The fastest endpoint": the same status, challenge and body as Depends."""
    client, engine = api
    live = (await engine.create(user_id="direct")).token
    revoked = (await engine.create(user_id="direct")).token
    await engine.revoke(revoked)
    locked = (await engine.create(user_id="direct", state=SessionState.LOCKED)).token
    for headers in ({}, bearer("garbage"), bearer(live), cookie(live), bearer(revoked),
                    cookie(locked), {**bearer("garbage"), **cookie(live)}):  # fmt: skip
        via_depends = await client.get("/me", headers=headers)
        direct = await client.get("/me-direct", headers=headers)
        assert direct.status_code == via_depends.status_code, headers
        assert direct.headers.get("www-authenticate") == via_depends.headers.get("www-authenticate")
        assert direct.json() == via_depends.json(), headers
    assert (await client.get("/me-direct", headers=bearer(live))).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert schema["paths"]["/me-direct"]["get"]["security"] == [{"HTTPBearer": []}]


async def test_optional_session(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    assert (await client.get("/maybe")).json() == {"user": None}
    assert (await client.get("/maybe", headers=bearer("garbage"))).json() == {"user": None}
    token = (await engine.create(user_id="u3")).token
    r = await client.get("/maybe", headers=bearer(token))
    assert r.status_code == 200 and r.json() == {"user": "u3"}


async def test_require_state(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    pending = (await engine.create(user_id="p", state=SessionState.PENDING)).token
    active = (await engine.create(user_id="a")).token
    locked = (await engine.create(user_id="l", state=SessionState.LOCKED)).token
    r = await client.get("/pending", headers=bearer(pending))
    assert r.status_code == 200 and r.json() == {"state": "pending"}
    for token, state in ((active, "active"), (locked, "locked")):
        r = await client.get("/pending", headers=bearer(token))
        assert r.status_code == 403, state
        assert state in r.json()["detail"] and "pending" in r.json()["detail"]
    # require_session accepts ACTIVE only: a half-authenticated session is not a login.
    r = await client.get("/me", headers=bearer(pending))
    assert r.status_code == 401
    assert (await client.get("/pending")).status_code == 401
    r = await client.get("/pending", headers=bearer("garbage"))
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_require_user_validates_once(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    alice = (await engine.create(user_id="alice", data={"admin": True})).token
    bob = (await engine.create(user_id="bob")).token
    before = (await engine.stats()).validations
    r = await client.get("/alice", headers=bearer(alice))
    assert r.status_code == 200 and r.json() == {"user": "alice", "same": True}
    # require_user and require_session in one endpoint: still one validation.
    assert (await engine.stats()).validations == before + 1
    r = await client.get("/alice", headers=bearer(bob))
    assert r.status_code == 403
    # require_state with ACTIVE among its states shares the validation too.
    before = (await engine.stats()).validations
    r = await client.get("/active-or-locked", headers=bearer(alice))
    assert r.json() == {"state": "active", "active": True}
    assert (await engine.stats()).validations == before + 1
    locked = (await engine.create(user_id="lou", state=SessionState.LOCKED)).token
    r = await client.get("/active-or-locked", headers=bearer(locked))
    assert r.json() == {"state": "locked", "active": False}  # not ACTIVE: no session
    assert (await client.get("/alice")).status_code == 401
    assert (await client.get("/admin", headers=bearer(alice))).status_code == 200
    assert (await client.get("/admin", headers=bearer(bob))).status_code == 403


async def test_cookie_attributes_login_logout(
    api: tuple[httpx.AsyncClient, SessionEngine],
) -> None:
    client, _ = api
    r = await client.post("/login/carol")
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"]
    parts = [p.strip().lower() for p in set_cookie.split(";")]
    assert parts[0] == f"__host-session={r.json()['token']}".lower()
    assert not any(p.startswith("domain=") for p in parts)  # __Host-: host-only
    assert "httponly" in parts and "secure" in parts and "samesite=lax" in parts
    assert "path=/" in parts
    # The client's jar now holds the cookie: the session works without a header.
    assert (await client.get("/me")).json()["user"] == "carol"
    r = await client.post("/logout")
    assert r.status_code == 200 and r.json() == {"revoked": True}
    cleared = [p.strip().lower() for p in r.headers["set-cookie"].split(";")]
    assert cleared[0] in ('__host-session=""', "__host-session=") and "max-age=0" in cleared
    assert (await client.get("/me")).status_code == 401
    assert (await client.post("/logout")).status_code == 401  # current_token: no token


async def test_custom_auth(api: tuple[httpx.AsyncClient, SessionEngine]) -> None:
    client, engine = api
    token = (await engine.create(user_id="dave")).token
    assert (await client.get("/custom", headers=cookie(token, "sid"))).status_code == 200
    r = await client.get("/custom", headers=cookie(token, "session"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="custom"'


def test_cookie_helpers_validate_options() -> None:
    response = Response()
    with pytest.raises(ValueError, match="secure"):
        set_session_cookie(response, "t", samesite="none", secure=False)
    with pytest.raises(ValueError, match="__Host-session"):
        set_session_cookie(response, "t", domain="example.com")  # __Host-: no domain
    set_session_cookie(
        response, "t", samesite="strict", max_age=60, domain="example.com", name="sid"
    )
    header = response.headers["set-cookie"].lower()
    assert "samesite=strict" in header and "max-age=60" in header
    assert "domain=example.com" in header
    with pytest.raises(ValueError):
        SessionAuth(realm='bad"realm')


async def test_no_lifespan_is_a_clear_error(cluster_url: str) -> None:
    app = build_app(EngineSettings(url=cluster_url))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        with pytest.raises(RuntimeError, match="engine_lifespan"):
            await client.get("/me", headers=bearer("x"))


async def test_503_while_redis_is_down() -> None:
    """Fail closed: a frozen server gives 503 + Retry-After within the deadline, never 200."""
    cl = await asyncio.to_thread(LocalCluster(cluster_mode=False).start)
    try:
        settings = EngineSettings(url=cl.url, command_timeout=0.3, connect_timeout=0.3)
        async with serve(build_app(settings)) as (client, engine):
            token = (await engine.create(user_id="erin", state=SessionState.ACTIVE)).token
            assert (await client.get("/me", headers=bearer(token))).status_code == 200
            port = cl.ports[0]
            await asyncio.to_thread(cl.pause, port)
            try:
                for path in ("/me", "/maybe", "/pending", "/alice", "/me-direct", "/me", "/me"):
                    t0 = time.monotonic()
                    r = await client.get(path, headers=bearer(token))
                    elapsed = time.monotonic() - t0
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    assert r.headers["retry-after"] == "1"
                    assert elapsed < 0.3 + 0.5, (path, elapsed)
                # The cookie path fails closed the same way.
                r = await client.get("/me", headers=cookie(token))
                assert r.status_code == 503
                # No token at all needs no Redis: still a plain 401.
                assert (await client.get("/me")).status_code == 401
            finally:
                await asyncio.to_thread(cl.resume, port)
            # Back to 200 once the server answers again (breaker probes within ~2 s).
            deadline = time.monotonic() + 5.0
            while True:
                r = await client.get("/me", headers=bearer(token))
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                assert r.status_code == 503
                await asyncio.sleep(0.1)
            assert r.status_code == 200
    finally:
        await asyncio.to_thread(cl.stop)


def test_public_names() -> None:
    import engine.fastapi as module

    assert sorted(module.__all__) == module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    for name in ("install_error_handlers", "engine_error_handlers", "SessionAuth", "get_engine"):
        assert name in module.__all__


# -- the request path: one async dependency, one script call -----------------------------


def _is_async(call: Any) -> bool:
    """A coroutine function, or an object whose __call__ is one (FastAPI awaits both)."""
    return inspect.iscoroutinefunction(call) or (
        not inspect.isroutine(call) and inspect.iscoroutinefunction(type(call).__call__)
    )


def _dependencies(dependant: Any) -> list[Any]:
    """Every dependency FastAPI solves for a route (the endpoint itself excluded)."""
    found, stack = [], list(dependant.dependencies)
    while stack:
        current = stack.pop()
        found.append(current.call)
        stack.extend(current.dependencies)
    return found


def test_request_path_has_one_async_dependency_and_no_sync_one() -> None:
    app = build_app(EngineSettings(url="redis://127.0.0.1:1"))
    routes = {route.path: route for route in app.routes if isinstance(route, APIRoute)}
    for path, route in routes.items():
        for call in [route.dependant.call, *_dependencies(route.dependant)]:
            assert _is_async(call), (path, call)  # no thread-pool hop anywhere
    assert inspect.iscoroutinefunction(get_engine)
    for path in ("/me", "/maybe", "/pending", "/admin", "/custom"):
        assert len(_dependencies(routes[path].dependant)) == 1, path
    # require_user beside require_session: two dependencies, still one validation (below).
    assert len(_dependencies(routes["/alice"].dependant)) == 2
    ref = create_app(EngineSettings(url="redis://127.0.0.1:1"))
    for ref_route in ref.routes:
        if isinstance(ref_route, APIRoute):
            for call in [ref_route.dependant.call, *_dependencies(ref_route.dependant)]:
                assert _is_async(call), (ref_route.path, call)
            if ref_route.path == "/me":
                assert len(_dependencies(ref_route.dependant)) == 1


def _evalsha_calls(url: str) -> int:
    total = 0
    for client in primaries(url):
        with client:
            stats = client.info("commandstats")
            total += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return total


async def test_one_script_call_per_request(
    api: tuple[httpx.AsyncClient, SessionEngine], cluster_url: str
) -> None:
    client, engine = api
    token = (await engine.create(user_id="counted")).token
    n = 50
    for path in ("/me", "/alice", "/maybe"):
        before = await asyncio.to_thread(_evalsha_calls, cluster_url)
        for _ in range(n):
            r = await client.get(path, headers=bearer(token))
            assert r.status_code in (200, 403), (path, r.status_code)
        after = await asyncio.to_thread(_evalsha_calls, cluster_url)
        assert after - before == n, (path, after - before)


async def test_openapi_declares_bearer_and_cookie_schemes(
    api: tuple[httpx.AsyncClient, SessionEngine],
) -> None:
    client, _ = api
    schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Session token",
    }
    assert schemes["APIKeyCookie"] == {"type": "apiKey", "in": "cookie", "name": "__Host-session"}
    assert schemes["APIKeyCookie_sid"] == {"type": "apiKey", "in": "cookie", "name": "sid"}
    paths = schema["paths"]
    for path, method in (("/me", "get"), ("/alice", "get"), ("/logout", "post")):
        security = paths[path][method]["security"]
        assert security == [{"HTTPBearer": []}, {"APIKeyCookie": []}], (path, security)
    assert paths["/custom"]["get"]["security"] == [{"HTTPBearer": []}, {"APIKeyCookie_sid": []}]
    assert "security" not in paths["/login/{user}"]["post"]
    # Without the lifespan (a schema exported offline), one call documents the cookie.
    offline = build_app(EngineSettings(url="redis://127.0.0.1:1"))
    assert offline.openapi()["paths"]["/me"]["get"]["security"] == [{"HTTPBearer": []}]
    document_cookie_auth(offline)
    document_cookie_auth(offline)  # twice is harmless
    security = offline.openapi()["paths"]["/me"]["get"]["security"]
    assert security == [{"HTTPBearer": []}, {"APIKeyCookie": []}]


async def test_freeze_gc_freezes_what_start_up_made_only_when_asked(
    cluster_url: str, prefix: str
) -> None:
    import gc

    settings = EngineSettings(url=cluster_url, key_prefix=prefix)
    for freeze, frozen in ((False, False), (True, True)):
        gc.unfreeze()
        app = FastAPI(lifespan=engine_lifespan(settings, freeze_gc=freeze))
        try:
            async with app.router.lifespan_context(app):
                assert (gc.get_freeze_count() > 0) is frozen
        finally:
            gc.unfreeze()  # the rest of the test run collects as usual
