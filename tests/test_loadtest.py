"""A short real Locust run against the reference service on the shared cluster."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import all_keys, delete_prefix
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineSettings
from engine._local_cache import DROP_REASONS
from engine.cli import loadtest as _loadtest
from engine.testing import LocalCluster
from loadtest.app import REFERENCE_LOCAL_CACHE_SIZE, create_app, reference_settings

pytestmark = pytest.mark.cluster

USERS = 200
DURATION = 15


def test_short_locust_run_has_no_failures(
    cluster_url: str, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--url",
        cluster_url,
        "--users",
        str(USERS),
        "--spawn-rate",
        "100",
        "--duration",
        str(DURATION),
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        "--prefix",
        prefix,
        "--wait",  # short think time: enough requests in a short run
        "1",
        "3",
        "--arrival-spread",  # each second's users log in within half a second
        "0.5",
        "--json",
        str(tmp_path / "loadtest.json"),
    ]
    try:
        code = _loadtest.main(argv)
        left = all_keys(cluster_url, prefix)  # the runner removes what it created
    finally:
        delete_prefix(cluster_url, prefix)
    out = capsys.readouterr().out
    rows = {row.name: row for row in _loadtest.read_stats(tmp_path / "locust")}
    total = rows["Aggregated"]
    assert code == 0, out
    assert total.failures == 0, out
    # Every user logged in, browsed and probed; with 1-3 s think time a run of this length
    # makes well over a thousand requests (measured ~2500; far fewer means a broken run).
    assert rows["/login"].requests >= USERS, out
    assert rows["/me"].requests >= 3 * USERS, out
    assert rows["/me (invalid token)"].requests > 0, out
    assert total.requests >= 1000, out
    # The service ran with the local cache, and its counters reached /metrics.
    assert "local cache 100,000" in out, out
    assert "arrivals spread over 0.5s" in out, out
    assert re.search(r"local cache \(one worker's /metrics\): hit rate [\d.]+% \([\d,]+ hits", out)
    assert (tmp_path / "locust.html").is_file()
    figures = json.loads((tmp_path / "loadtest.json").read_text())
    by_name = {e["name"]: e for e in figures["endpoints"]}
    assert by_name["Aggregated"]["requests"] == total.requests and figures["failures"] == []
    assert left == []


async def test_reference_service_endpoints(cluster_url: str, prefix: str) -> None:
    """The reference service in-process (no uvicorn): every endpoint once, and /metrics."""
    app = create_app(EngineSettings(url=cluster_url, key_prefix=prefix, local_cache_size=1000))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="https://t") as c:
                assert (await c.get("/healthz")).json()["status"] == "ok"
                r = await c.post("/login", json={"user_id": "ann"})
                assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
                token = r.json()["token"]
                auth = {"Authorization": f"Bearer {token}"}
                me = (await c.get("/me", headers=auth)).json()
                assert me["user_id"] == "ann" and me["session_id"] == r.json()["session_id"]
                r = await c.post("/chat/lobby", json={"text": "hi"}, headers=auth)
                assert r.json() == {"length": 1}
                r = await c.get("/chat/lobby", headers=auth)
                assert [m["text"] for m in r.json()["messages"]] == ["hi"]
                new = (await c.post("/rotate", headers=auth)).json()["token"]
                assert (await c.get("/me", headers=auth)).status_code == 401
                auth = {"Authorization": f"Bearer {new}"}
                other = (await c.post("/login", json={"user_id": "ann"})).json()["token"]
                assert (await c.post("/logout-all", headers=auth)).json() == {"revoked": 2}
                other_auth = {"Authorization": f"Bearer {other}"}
                assert (await c.get("/me", headers=other_auth)).status_code == 401
                third = (await c.post("/login", json={"user_id": "ann"})).json()["token"]
                r = await c.post("/logout", headers={"Authorization": f"Bearer {third}"})
                assert r.json() == {"revoked": True}
                assert (await c.post("/logout")).status_code == 401
                metrics = (await c.get("/metrics")).text
                assert 'session_misses_total{reason="unknown"}' in metrics
                assert "session_hits_total" in metrics and "session_active" in metrics
                assert 'endpoint="/chat/{room}"' in metrics  # route template, not raw path
                assert "redis_used_memory_bytes" in metrics
                # engine.metrics, parsed: a real histogram, no hand-written percentiles.
                families = {f.name: f for f in text_string_to_metric_families(metrics)}
                assert families["session_validate_duration_seconds"].type == "histogram"
                assert "session_validate_latency_ms" not in families
                assert families["session_engine_node_breaker_open"].samples
                await assert_local_cache_metrics(c)
    finally:
        delete_prefix(cluster_url, prefix)


async def assert_local_cache_metrics(c: httpx.AsyncClient) -> None:
    """Validations of one token until the local cache answers them; then /metrics shows
    every local-cache series: hits, misses, invalidations, entries and drops by reason
    (from the engine's stats snapshot, at most ``STATS_MAX_AGE`` old)."""

    async def scrape() -> dict[str, Any]:
        page = (await c.get("/metrics")).text
        return {f.name: f for f in text_string_to_metric_families(page)}

    def value(families: dict[str, Any], name: str) -> float:
        return float(families[name].samples[0].value)

    hits_before = value(await scrape(), "session_local_cache_hits")
    token = (await c.post("/login", json={"user_id": "cached"})).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(60):  # tracking is set up in the background after the first connect
        assert (await c.get("/me", headers=auth)).status_code == 200
        families = await scrape()
        if (
            value(families, "session_local_cache_hits") > hits_before
            and value(families, "session_local_cache_entries") >= 1
        ):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("/metrics never showed a local-cache hit and entry")
    assert families["session_local_cache_hits"].type == "counter"
    assert value(families, "session_local_cache_misses") > 0
    assert families["session_local_cache_invalidations"].type == "counter"
    assert (await c.post("/logout", headers=auth)).json() == {"revoked": True}
    assert (await c.get("/me", headers=auth)).status_code == 401  # never from the cache
    families = await scrape()
    drops = {s.labels["reason"]: s.value for s in families["session_local_cache_drops"].samples}
    assert set(DROP_REASONS) <= set(drops) and drops["write"] >= 1, drops


def test_the_reference_service_turns_the_local_cache_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_LOCAL_CACHE_SIZE", raising=False)
    assert reference_settings().local_cache_size == REFERENCE_LOCAL_CACHE_SIZE > 0
    monkeypatch.setenv("ENGINE_LOCAL_CACHE_SIZE", "0")
    assert reference_settings().local_cache_size == 0
    assert _loadtest.local_cache_size(None) == 0
    assert _loadtest.local_cache_size(7) == 7
    monkeypatch.delenv("ENGINE_LOCAL_CACHE_SIZE")
    assert _loadtest.local_cache_size(None) == _loadtest.DEFAULT_LOCAL_CACHE_SIZE


async def test_reference_service_fails_closed() -> None:
    """/healthz and /me answer 503 while the (own, plain) server is frozen, never 200."""
    cl = await asyncio.to_thread(LocalCluster(cluster_mode=False).start)
    try:
        app = create_app(EngineSettings(url=cl.url, command_timeout=0.3, connect_timeout=0.3))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="https://t") as c:
                token = (await c.post("/login", json={"user_id": "bo"})).json()["token"]
                auth = {"Authorization": f"Bearer {token}"}
                assert (await c.get("/me", headers=auth)).status_code == 200
                await asyncio.to_thread(cl.pause, cl.ports[0])
                try:
                    assert (await c.get("/healthz")).status_code == 503
                    assert (await c.get("/me", headers=auth)).status_code == 503
                    r = await c.post("/login", json={"user_id": "bo"})
                    assert r.status_code == 503 and r.headers["retry-after"] == "1"
                finally:
                    await asyncio.to_thread(cl.resume, cl.ports[0])
    finally:
        await asyncio.to_thread(cl.stop)
