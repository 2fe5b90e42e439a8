"""engine.metrics: the Prometheus collector (scraped and parsed) and the OpenTelemetry bridge."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineSettings, SessionEngine
from engine._metrics import LATENCY_BUCKETS_MS, Metrics
from engine.metrics import EngineFigures, PrometheusCollector, instrument_otel

pytestmark = pytest.mark.cluster


def test_latency_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    m = Metrics(window=4)
    for ms in (0.01, 0.05, 0.051, 7.0, 1000.0, 5000.0):
        m.latency(ms)
    index = {bound: i for i, bound in enumerate(LATENCY_BUCKETS_MS)}
    assert m.lat_buckets[index[0.05]] == 2  # 0.01 and exactly the bound (le is inclusive)
    assert m.lat_buckets[index[0.1]] == 1
    assert m.lat_buckets[index[10.0]] == 1
    assert m.lat_buckets[index[1000.0]] == 1
    assert m.lat_buckets[-1] == 1  # past 1 s: the overflow bucket
    assert sum(m.lat_buckets) == 6
    assert m.lat_sum == pytest.approx(0.01 + 0.05 + 0.051 + 7.0 + 1000.0 + 5000.0)


def _scrape(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def _traffic(session_engine: SessionEngine) -> tuple[list[str], list[str], list[str]]:
    """Some hits, misses of each kind we can cause, a malformed token; returns the
    tokens, session ids and user ids made (none may appear in a label)."""
    made = [await session_engine.create(user_id=f"metrics-user-{i}") for i in range(5)]
    for new in made:
        assert await session_engine.validate(new.token) is not None
    await session_engine.revoke(made[0].token)
    assert await session_engine.validate(made[0].token) is None  # unknown
    assert await session_engine.validate("not a token") is None  # malformed
    tokens = [n.token for n in made]
    sids = [n.session.session_id for n in made]
    users = [f"metrics-user-{i}" for i in range(5)]
    return tokens, sids, users


async def test_a_scrape_parses_and_matches_the_engine(session_engine: SessionEngine) -> None:
    tokens, sids, users = await _traffic(session_engine)
    registry = CollectorRegistry()
    collector = PrometheusCollector(session_engine)
    registry.register(collector)
    await collector.refresh()
    families = _scrape(registry)

    def value(name: str, **labels: str) -> float:
        samples = [
            s
            for s in families[name].samples
            if s.name in (name, f"{name}_total") and s.labels == labels
        ]
        assert len(samples) == 1, (name, labels, families[name].samples)
        return float(samples[0].value)

    m = session_engine._metrics
    assert value("session_validations") == m.validations == 7
    assert value("session_hits") == m.hits == 5
    assert value("session_misses", reason="unknown") == 1
    assert value("session_misses", reason="malformed") == 1
    assert value("session_engine_errors") == 0

    hist = families["session_validate_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    bounds = [s.labels["le"] for s in buckets]
    assert float(bounds[0]) == pytest.approx(0.00005)
    assert bounds[-1] == "+Inf" and len(bounds) == len(LATENCY_BUCKETS_MS) + 1
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    timed = m.validations - m.miss_malformed  # a malformed token returns before timing
    assert counts[-1] == timed
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    total = next(s.value for s in hist.samples if s.name.endswith("_sum"))
    assert count == timed and 0 < total < 60

    nodes = {s.labels["node"] for s in families["session_engine_node_breaker_open"].samples}
    assert {n.name for n in session_engine.transport.primaries()} <= nodes
    assert all(s.value == 0 for s in families["session_engine_node_breaker_open"].samples)
    assert all(s.value >= 0 for s in families["session_engine_node_inflight"].samples)
    assert value("session_active") >= 4
    assert value("redis_primaries") == len(session_engine.transport.primaries())
    assert len(families["redis_used_memory_bytes"].samples) == value("redis_primaries")

    # No token, session id or user id in any label value.
    secrets = [*tokens, *sids, *users]
    for family in families.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert not any(s in label or label in s for s in secrets if label), label


async def test_cluster_figures_are_refreshed_at_most_once_per_interval(
    session_engine: SessionEngine,
) -> None:
    figures = EngineFigures(session_engine, cluster_refresh=60.0)
    calls = 0
    real = session_engine.stats

    async def counted() -> Any:
        nonlocal calls
        calls += 1
        return await real()

    session_engine.stats = counted  # type: ignore[method-assign]
    try:
        for _ in range(5):
            await figures.refresh()
            figures.read()
        await asyncio.sleep(0)
    finally:
        del session_engine.stats
    assert calls == 1


async def test_a_scrape_from_another_thread_does_not_block_and_fills_in(
    session_engine: SessionEngine,
) -> None:
    await _traffic(session_engine)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(session_engine, cluster_refresh=0.0))
    # As prometheus_client's own HTTP server does: collect in a thread of its own. The
    # first scrape starts a cluster refresh on the engine's loop and does not wait for it.
    first = await asyncio.to_thread(_scrape, registry)
    assert "session_validations" in first
    for _ in range(100):
        await asyncio.sleep(0.02)
        later = await asyncio.to_thread(_scrape, registry)
        if "session_active" in later:
            break
    assert "session_active" in later


async def test_local_cache_figures_export_when_the_engine_has_them(
    redis_cluster: Any,
) -> None:
    """A real engine with the local cache: hits, misses, invalidations, entries and drops
    by reason appear, read live from the cache."""
    settings = EngineSettings(url=redis_cluster.url, key_prefix="mlc", local_cache_size=100)
    async with SessionEngine(settings) as eng:
        try:
            new = await eng.create(user_id="u1")
            cache = eng._cache
            assert cache is not None
            for _ in range(300):  # until tracking is set up and a hit comes
                await eng.validate(new.token)
                if cache.hits:
                    break
                await asyncio.sleep(0.02)
            await eng.revoke(new.token)  # a drop ("write"), then an invalidation
            for _ in range(100):
                if cache.invalidations:
                    break
                await asyncio.sleep(0.01)
            registry = CollectorRegistry()
            registry.register(PrometheusCollector(eng))
            families = _scrape(registry)
            assert families["session_local_cache_hits"].samples[0].value == cache.hits > 0
            assert families["session_local_cache_misses"].samples[0].value >= 1
            assert families["session_local_cache_invalidations"].samples[0].value >= 1
            assert families["session_local_cache_entries"].samples[0].value == 0
            drops = {
                s.labels["reason"]: s.value for s in families["session_local_cache_drops"].samples
            }
            assert drops["write"] >= 1 and set(drops) >= {"invalidated", "silent", "moved"}
        finally:
            await eng.revoke_user("u1")


async def test_without_a_local_cache_no_local_cache_series(session_engine: SessionEngine) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(session_engine)
    registry.register(collector)
    await collector.refresh()
    assert not any(name.startswith("session_local_cache") for name in _scrape(registry))


def test_a_collector_of_an_app_not_started_yet_exports_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(lambda: None))
    assert _scrape(registry) == {}


async def test_the_opentelemetry_bridge_reads_the_same_figures(
    session_engine: SessionEngine,
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    tokens, sids, users = await _traffic(session_engine)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    figures = instrument_otel(session_engine, meter=provider.get_meter("test"))
    await figures.refresh()
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    assert points["session.validations"][0].value == 7
    assert points["session.hits"][0].value == 5
    misses = {p.attributes["reason"]: p.value for p in points["session.misses"]}
    assert misses["malformed"] == 1 and misses["unknown"] == 1
    buckets = {p.attributes["le"]: p.value for p in points["session.validate.duration.bucket"]}
    assert buckets["+Inf"] == 6 == points["session.validate.duration.count"][0].value
    assert points["session.active"][0].value >= 4
    secrets = [*tokens, *sids, *users]
    for series in points.values():
        for p in series:
            for v in p.attributes.values():
                assert not any(str(v) in s or s in str(v) for s in secrets), v
    provider.shutdown()
