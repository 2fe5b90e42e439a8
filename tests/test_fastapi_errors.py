"""engine.fastapi: engine errors as HTTP answers, no leaks, __Host- cookies, CSRF check.

The reference service (loadtest.app) is the subject of the regression tests: inputs that
pass its own pydantic checks but not the engine's byte limits once answered 500.
"""

# No `from __future__ import annotations`: csrf_app builds its dependency aliases locally.

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Response
from helpers import delete_prefix, plain_redis_server

from engine import (
    ChatRoomLimitExceeded,
    EngineError,
    EngineSettings,
    EngineUnavailable,
    InvalidArgument,
    OutcomeUnknown,
    PayloadTooLarge,
    ReplicationIncomplete,
    Session,
    SessionConflict,
    SessionEngine,
    SessionLimitExceeded,
    SessionNotFound,
)
from engine.fastapi import (
    SessionAuth,
    engine_error_handlers,
    engine_lifespan,
    get_engine,
    install_error_handlers,
    set_session_cookie,
)
from loadtest.app import create_app

ERRORS: dict[str, EngineError] = {
    "unavailable": EngineUnavailable("validate: timed out on 10.1.2.3:7001"),
    "invalid": InvalidArgument("user_id is 400 bytes, more than 256"),
    "too-large": PayloadTooLarge("message is 8012 bytes, more than 4096"),
    "conflict": SessionConflict("version 3 != 2", current_version=3),
    "limit": SessionLimitExceeded("user already has 10 sessions"),
    "rooms": ChatRoomLimitExceeded("user already has 64 rooms"),
    "unknown": OutcomeUnknown("create: connection to 10.1.2.3:7001 lost"),
    "not-found": SessionNotFound("user 'x' has no live session"),
    "replication": ReplicationIncomplete("1 of 2 replicas", acknowledged=1, wanted=2),
    "other": EngineError("create: unexpected Redis error: ERR on 10.1.2.3:7001"),
}

EXPECTED = {
    "unavailable": 503,
    "invalid": 422,
    "too-large": 413,
    "conflict": 409,
    "limit": 409,
    "rooms": 409,
    "unknown": 503,
    "not-found": 401,
    "replication": 503,
    "other": 503,
}

# Anything that looks like a node address: an IPv4 address, localhost, a bracketed IPv6.
ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|localhost|\[[0-9a-fA-F:]+\]")


def raising_app(**handler_options: Any) -> FastAPI:
    app = FastAPI(exception_handlers=engine_error_handlers(**handler_options))

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        raise ERRORS[kind]

    return app


async def get(app: FastAPI, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        return await client.get(path, **kwargs)


async def test_every_engine_error_has_its_status() -> None:
    app = raising_app()
    for kind, status in EXPECTED.items():
        r = await get(app, f"/raise/{kind}")
        assert r.status_code == status, (kind, r.status_code, r.text)
        assert not ADDRESS.search(r.text), (kind, r.text)
        assert "detail" in r.json()
    r = await get(app, "/raise/unavailable")
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "session store unavailable"}
    r = await get(app, "/raise/replication")
    assert r.headers["retry-after"] == "1" and r.json()["durable"] is False
    assert "durable" in r.json()["detail"]
    r = await get(app, "/raise/not-found")
    assert r.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
    assert "x" not in r.json()["detail"].split()  # the user id is not echoed
    assert (await get(app, "/raise/conflict")).json()["current_version"] == 3
    assert "400 bytes" in (await get(app, "/raise/invalid")).json()["detail"]


async def test_install_in_one_line_and_404_option() -> None:
    app = FastAPI()
    install_error_handlers(app, session_not_found=404)

    @app.get("/gone")
    async def gone() -> None:
        raise SessionNotFound("no such session")

    r = await get(app, "/gone")
    assert r.status_code == 404 and "www-authenticate" not in r.headers
    custom = await get(raising_app(realm="shop"), "/raise/not-found")
    assert custom.headers["www-authenticate"] == 'Bearer realm="shop", error="invalid_token"'
    with pytest.raises(ValueError, match="401 or 404"):
        engine_error_handlers(session_not_found=500)  # type: ignore[arg-type]


@asynccontextmanager
async def reference(settings: EngineSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
            yield client


@pytest.mark.cluster
async def test_reference_service_inputs_over_byte_limits(cluster_url: str, prefix: str) -> None:
    """Issue 9: inputs that pass the service's character limits get 4xx, not 500."""
    try:
        async with reference(EngineSettings(url=cluster_url, key_prefix=prefix)) as c:
            r = await c.post("/login", json={"user_id": "é" * 200})  # 200 chars, 400 bytes
            assert r.status_code == 422, r.text
            assert "bytes" in r.json()["detail"]
            lone_surrogate = b'{"user_id": "\\ud800"}'  # valid JSON, no UTF-8 form
            headers = {"Content-Type": "application/json"}
            r = await c.post("/login", content=lone_surrogate, headers=headers)
            assert r.status_code == 422, r.text
            token = (await c.post("/login", json={"user_id": "ann"})).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            room = "r" * 300
            r = await c.post(f"/chat/{room}", json={"text": "hi"}, headers=auth)
            assert r.status_code == 422, r.text
            assert (await c.get(f"/chat/{room}", headers=auth)).status_code == 422
            r = await c.post("/chat/lobby", json={"text": "😀" * 2000}, headers=auth)
            assert r.status_code == 413, r.text
            # Under the limits all of it works.
            assert (await c.post("/login", json={"user_id": "é" * 128})).status_code == 200
            r = await c.post("/chat/" + "r" * 256, json={"text": "😀" * 900}, headers=auth)
            assert r.status_code == 200, r.text
    finally:
        await asyncio.to_thread(delete_prefix, cluster_url, prefix)


@pytest.mark.cluster
async def test_no_node_address_in_healthy_answers(cluster_url: str, prefix: str) -> None:
    try:
        async with reference(EngineSettings(url=cluster_url, key_prefix=prefix)) as c:
            token = (await c.post("/login", json={"user_id": "amy"})).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            for path in ("/healthz", "/metrics", "/me"):
                r = await c.get(path, headers=auth)
                assert r.status_code == 200, path
                assert not ADDRESS.search(r.text), (path, ADDRESS.search(r.text))
            assert "redis_used_memory_bytes{node=" in (await c.get("/metrics")).text
    finally:
        await asyncio.to_thread(delete_prefix, cluster_url, prefix)


async def test_redis_down_answers_name_no_node_and_no_secret() -> None:
    """Redis gone (the app's own password-protected server, stopped by pid): every endpoint
    answers without a 500, and no body or header carries an address, the password or the
    token."""
    password = "s3cret-pw-91"
    with ExitStack() as server:
        port = server.enter_context(plain_redis_server("--requirepass", password))
        settings = EngineSettings(
            url=f"redis://:{password}@127.0.0.1:{port}",
            key_prefix="leak",
            command_timeout=0.3,
            connect_timeout=0.3,
        )
        async with reference(settings) as c:
            r = await c.post("/login", json={"user_id": "zoe"})
            assert r.status_code == 200
            token = r.json()["token"]
            server.close()  # the server is gone from here on
            answers: list[httpx.Response] = []
            for auth in (
                {"Authorization": f"Bearer {token}"},
                {"Cookie": f"__Host-session={token}"},
            ):
                answers += [
                    await c.get("/healthz"),
                    await c.get("/me", headers=auth),
                    await c.post("/login", json={"user_id": "zoe"}),
                    await c.post("/chat/lobby", json={"text": "hi"}, headers=auth),
                    await c.get("/chat/lobby", headers=auth),
                    await c.post("/rotate", headers=auth),
                    await c.post("/logout", headers=auth),
                    await c.post("/logout-all", headers=auth),
                    await c.get("/metrics"),
                ]
    for r in answers:
        where = f"{r.request.method} {r.request.url.path}"
        assert r.status_code < 500 or r.status_code == 503, (where, r.status_code, r.text)
        exposed = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        assert not ADDRESS.search(exposed), (where, exposed)
        assert f":{port}" not in exposed and str(port) not in r.text, (where, exposed)
        assert password not in exposed and token not in exposed, (where, exposed)
    unavailable = [r for r in answers if r.status_code == 503]
    assert len(unavailable) >= 14  # everything but the metrics page and the cookie clears
    assert all(r.headers["retry-after"] == "1" for r in unavailable)


# -- cookies ------------------------------------------------------------------------------


def cookie_parts(response: Response) -> list[str]:
    return [p.strip().lower() for p in response.headers["set-cookie"].split(";")]


def test_host_prefixed_cookie_by_default_plain_for_development() -> None:
    response = Response()
    set_session_cookie(response, "tok")
    parts = cookie_parts(response)
    assert parts[0] == "__host-session=tok"
    assert "secure" in parts and "path=/" in parts
    assert not any(p.startswith("domain=") for p in parts)

    response = Response()
    set_session_cookie(response, "tok", secure=False)
    parts = cookie_parts(response)
    assert parts[0] == "session=tok" and "secure" not in parts

    assert SessionAuth().cookie_name == "__Host-session"
    dev = SessionAuth(cookie_secure=False)
    assert dev.cookie_name == "session"
    response = Response()
    dev.set_cookie(response, "tok")
    assert cookie_parts(response)[0] == "session=tok" and "secure" not in cookie_parts(response)

    for bad in (
        {"path": "/api"},
        {"domain": "example.com"},
        {"secure": False, "name": "__Host-session"},
    ):
        with pytest.raises(ValueError, match="__Host-"):
            set_session_cookie(Response(), "tok", **bad)
    with pytest.raises(ValueError, match="__Secure-sid"):
        set_session_cookie(Response(), "tok", secure=False, name="__Secure-sid")
    with pytest.raises(ValueError):
        SessionAuth(cookie_name="__Host-sid", cookie_secure=False)
    with pytest.raises(ValueError, match="origin"):
        SessionAuth(csrf_trusted_origins=["app.example.com"])


# -- CSRF ---------------------------------------------------------------------------------

csrf_auth = SessionAuth(csrf=True)
trusting_auth = SessionAuth(csrf_trusted_origins=["https://app.example"])
dev_auth = SessionAuth(cookie_secure=False, csrf=True)
plain_auth = SessionAuth()  # the default: no CSRF check


def csrf_app(settings: EngineSettings) -> FastAPI:
    app = FastAPI(lifespan=engine_lifespan(settings))
    install_error_handlers(app)
    for name, auth in (
        ("csrf", csrf_auth),
        ("trusting", trusting_auth),
        ("dev", dev_auth),
        ("plain", plain_auth),
    ):

        def routes(auth: SessionAuth = auth, name: str = name) -> None:
            current = Annotated[Session, Depends(auth.require_session)]

            @app.post(f"/{name}/act")
            async def act(session: current) -> dict[str, str | None]:
                return {"user": session.user_id}

            @app.get(f"/{name}/act")
            async def read(session: current) -> dict[str, str | None]:
                return {"user": session.user_id}

            @app.delete(f"/{name}/token")
            async def token(value: Annotated[str, Depends(auth.current_token)]) -> int:
                return len(value)

        routes()

    @app.post("/login")
    async def login(
        engine: Annotated[SessionEngine, Depends(get_engine)], response: Response
    ) -> dict[str, str]:
        new = await engine.create(user_id="csrf-user")
        csrf_auth.set_cookie(response, new.token)
        return {"token": new.token}

    return app


@pytest.fixture
async def csrf_client(
    cluster_url: str, prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = csrf_app(EngineSettings(url=cluster_url, key_prefix=prefix))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="https://test") as c:
                token = (await c.post("/login")).json()["token"]
                c.cookies.clear()
                yield c, token
    finally:
        await asyncio.to_thread(delete_prefix, cluster_url, prefix)


@pytest.mark.cluster
async def test_csrf_cross_site_cookie_post_refused(
    csrf_client: tuple[httpx.AsyncClient, str],
) -> None:
    c, token = csrf_client
    jar = {"Cookie": f"__Host-session={token}"}
    refused = [
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://sub.test", "Sec-Fetch-Site": "same-site"},  # sibling subdomain
        {"Origin": "http://test"},  # same host, another scheme
        {"Origin": "null"},  # sandboxed frames, some redirects
    ]
    for headers in refused:
        r = await c.post("/csrf/act", headers={**jar, **headers})
        assert r.status_code == 403, (headers, r.status_code)
        assert r.json() == {"detail": "cross-site request refused"}
        r = await c.delete("/csrf/token", headers={**jar, **headers})
        assert r.status_code == 403, headers  # current_token is checked too (logout)
    r = await c.post(
        "/dev/act", headers={"Cookie": f"session={token}", "Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    # Trusted origins pass the check; others do not.
    trusted = {**jar, "Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
    assert (await c.post("/trusting/act", headers=trusted)).status_code == 200
    r = await c.post("/trusting/act", headers={**jar, "Origin": "https://evil.example"})
    assert r.status_code == 403


@pytest.mark.cluster
async def test_csrf_same_origin_bearer_safe_methods_and_default_off(
    csrf_client: tuple[httpx.AsyncClient, str],
) -> None:
    c, token = csrf_client
    jar = {"Cookie": f"__Host-session={token}"}
    allowed = [
        {"Origin": "https://test"},
        {"Origin": "https://test", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar / bookmark
        {},  # no browser headers at all: a script or a tool, not a page
    ]
    for headers in allowed:
        r = await c.post("/csrf/act", headers={**jar, **headers})
        assert r.status_code == 200, (headers, r.status_code, r.text)
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    # Bearer: not an ambient credential, never checked.
    r = await c.post("/csrf/act", headers={"Authorization": f"Bearer {token}", **evil})
    assert r.status_code == 200
    # Safe methods are not checked.
    assert (await c.get("/csrf/act", headers={**jar, **evil})).status_code == 200
    # Off by default.
    assert (await c.post("/plain/act", headers={**jar, **evil})).status_code == 200
    # The check comes before validation: a refused request costs no Redis call, and a
    # cross-site request with a dead cookie is refused as cross-site, not as 401.
    r = await c.post("/csrf/act", headers={"Cookie": "__Host-session=garbage", **evil})
    assert r.status_code == 403
