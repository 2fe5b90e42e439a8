"""The admin API (engine.fastapi.admin_router) and its CLI twin, on the real cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from helpers import delete_prefix

from engine import EngineSettings, SessionEngine
from engine.fastapi import SessionAuth, admin_router, engine_lifespan, install_error_handlers

pytestmark = pytest.mark.cluster


def _app(url: str, prefix: str) -> FastAPI:
    auth = SessionAuth(cookie_secure=False)
    app = FastAPI(lifespan=engine_lifespan(EngineSettings(url=url, key_prefix=prefix)))
    install_error_handlers(app, realm=auth.realm)
    app.include_router(admin_router(auth.require_user(lambda s: s.data.get("role") == "admin")))
    return app


@pytest.fixture
async def client(cluster_url: str, prefix: str) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(cluster_url, prefix)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                c.app = app  # type: ignore[attr-defined]
                yield c
    finally:
        delete_prefix(cluster_url, prefix)


def _engine(client: httpx.AsyncClient) -> SessionEngine:
    eng: SessionEngine = client.app.state.session_engine  # type: ignore[attr-defined]
    return eng


async def test_list_and_revoke_behind_the_guard(client: httpx.AsyncClient) -> None:
    eng = _engine(client)
    admin = await eng.create(user_id="root", data={"role": "admin"})
    made = [await eng.create(user_id="alice/with slash", data={"secret": "s3"}) for _ in range(3)]
    as_admin = {"Authorization": f"Bearer {admin.token}"}
    as_alice = {"Authorization": f"Bearer {made[0].token}"}
    params = {"user": "alice/with slash"}

    assert (await client.get("/admin/sessions", params=params)).status_code == 401
    assert (await client.get("/admin/sessions", params=params, headers=as_alice)).status_code == 403
    r = await client.delete("/admin/sessions", params=params, headers=as_alice)
    assert r.status_code == 403
    assert all([await eng.validate(n.token) for n in made])  # the refused calls did nothing

    r = await client.get("/admin/sessions", params=params, headers=as_admin)
    assert r.status_code == 200
    listed = r.json()
    assert {s["session_id"] for s in listed} == {n.session.session_id for n in made}
    assert set(listed[0]) == {
        "session_id",
        "user_id",
        "state",
        "created_at",
        "idle_expires_at",
        "absolute_expires_at",
        "version",
    }
    assert all(n.token not in r.text and n.token.split(".")[1] not in r.text for n in made)
    assert "s3" not in r.text  # the session's data is not shown

    one = made[1].session.session_id
    r = await client.delete(f"/admin/sessions/{one}", params=params, headers=as_admin)
    assert r.status_code == 200 and r.json() == {"revoked": 1}
    assert await eng.validate(made[1].token) is None
    r = await client.delete(f"/admin/sessions/{one}", params=params, headers=as_admin)
    assert r.status_code == 404
    # Another user's session id is not this user's to revoke.
    r = await client.delete(
        f"/admin/sessions/{admin.session.session_id}", params=params, headers=as_admin
    )
    assert r.status_code == 404 and await eng.validate(admin.token) is not None

    r = await client.delete("/admin/sessions", params=params, headers=as_admin)
    assert r.status_code == 200 and r.json() == {"revoked": 2}
    assert [await eng.validate(n.token) for n in made] == [None, None, None]
    r = await client.get("/admin/sessions", params=params, headers=as_admin)
    assert r.json() == []


async def test_bad_input_is_refused_clearly(client: httpx.AsyncClient) -> None:
    eng = _engine(client)
    admin = await eng.create(user_id="root", data={"role": "admin"})
    as_admin = {"Authorization": f"Bearer {admin.token}"}
    r = await client.get("/admin/sessions", headers=as_admin)
    assert r.status_code == 422  # no user
    r = await client.get("/admin/sessions", params={"user": "x" * 5000}, headers=as_admin)
    assert r.status_code == 422  # over max_id_bytes: InvalidArgument
    r = await client.delete("/admin/sessions/garbage", params={"user": "u"}, headers=as_admin)
    assert r.status_code == 404


def test_a_guard_is_required() -> None:
    with pytest.raises(TypeError, match="guard"):
        admin_router(None)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "sessions", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_lists_and_revokes(cluster_url: str, prefix: str) -> None:
    async with SessionEngine(EngineSettings(url=cluster_url, key_prefix=prefix)) as eng:
        made = [await eng.create(user_id="bob") for _ in range(2)]
        where = ("--url", cluster_url, "--prefix", prefix)
        try:
            out = await asyncio.to_thread(_cli, "list", "--user", "bob", "--json", *where)
            assert out.returncode == 0, out.stderr
            assert {s["session_id"] for s in json.loads(out.stdout)} == {
                n.session.session_id for n in made
            }
            assert all(n.token not in out.stdout for n in made)
            table = await asyncio.to_thread(_cli, "list", "--user", "bob", *where)
            assert "SESSION ID" in table.stdout and made[0].session.session_id in table.stdout

            sid = made[0].session.session_id
            out = await asyncio.to_thread(
                _cli, "revoke", "--user", "bob", "--session", sid, "--json", *where
            )
            assert out.returncode == 0 and json.loads(out.stdout) == {"revoked": 1}
            assert await eng.validate(made[0].token) is None
            out = await asyncio.to_thread(_cli, "revoke", "--user", "bob", "--json", *where)
            assert json.loads(out.stdout) == {"revoked": 1}
            assert await eng.validate(made[1].token) is None

            bad = await asyncio.to_thread(_cli, "list", "--user", "", *where)
            assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
            bad = await asyncio.to_thread(_cli, "list", "--user", "u", "--url", "http://x")
            assert bad.returncode == 2 and "Traceback" not in bad.stderr
        finally:
            delete_prefix(cluster_url, prefix)
