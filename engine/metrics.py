"""The engine's figures for Prometheus and OpenTelemetry: one reader, two exporters.

Prometheus (extra ``prometheus``)::

    from prometheus_client import REGISTRY
    from engine.metrics import PrometheusCollector

    collector = PrometheusCollector(engine)
    REGISTRY.register(collector)
    # in an async /metrics handler: await collector.refresh(); then generate_latest()

OpenTelemetry (extra ``otel``)::

    from engine.metrics import instrument_otel

    instrument_otel(engine)  # observable instruments on the global MeterProvider

What is exported, under the ``session_`` prefix (Prometheus names; OpenTelemetry uses the
same names with dots, e.g. ``session.validations``):

* counters: ``validations``, ``hits``, ``misses`` by ``reason``, ``engine_errors``, the
  local cache's ``local_cache_hits``/``misses``/``invalidations`` and ``local_cache_drops``
  by ``reason`` (when the engine has a local cache);
* ``validate_duration_seconds``: a real histogram of ``validate`` latency
  (``engine._metrics.LATENCY_BUCKETS_MS``, 50 us to 1 s), which can be summed across
  processes, unlike percentiles;
* per node (``node`` = "host:port", or what ``node_label`` makes of it):
  ``engine_node_breaker_open`` (1 while calls to it fail fast) and ``engine_node_inflight``
  (commands sent and not yet answered);
* from the cluster: ``active`` (live sessions, estimated), ``redis_used_memory_bytes`` per
  primary and ``redis_primaries``, refreshed at most once per ``cluster_refresh`` seconds
  (they cost INFO, DBSIZE and a SCAN or samples per primary).

No label ever carries a token, a session id or a user id: labels are a fixed reason, a
node address or a fixed quantile bound, so the number of series stays bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from ._engine import SessionEngine
from ._errors import EngineError, EngineUnavailable
from ._metrics import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from ._models import EngineStats

__all__ = ["EngineFigures", "EngineSource", "Figures", "PrometheusCollector", "instrument_otel"]

_LOCAL_EVENTS = ("hits", "misses", "invalidations")
EngineSource: TypeAlias = SessionEngine | Callable[[], SessionEngine | None]
"""An engine, or a function giving the current one (``None`` before the app started)."""


@dataclass(frozen=True)
class Figures:
    """One reading of everything exported (the exporters only reshape it)."""

    validations: int
    hits: int
    misses: dict[str, int]
    errors: int
    latency_buckets: list[tuple[float, int]]
    """(upper bound in seconds, cumulative count), the last bound ``inf``."""
    latency_sum_seconds: float
    latency_count: int
    local_cache: dict[str, int]
    """hits / misses / invalidations, when the engine has a local cache."""
    local_entries: int | None
    local_drops: dict[str, int]
    breaker_open: dict[str, int]
    inflight: dict[str, int]
    cluster: EngineStats | None = field(default=None)
    """The last cluster snapshot (active sessions, memory), ``None`` before the first."""


class EngineFigures:
    """Reads an engine's counters (live, in-process) and its cluster figures (cached).

    Reading never blocks and never does I/O: ``read()`` can run in a scrape thread. The
    cluster figures come from the last ``engine.stats()``; ``refresh()`` takes a new one
    if the last is older than ``cluster_refresh`` seconds (one at a time, however many
    scrapers), and ``read()`` starts such a refresh in the background when it finds the
    snapshot stale, so a scraper that never awaits still sees figures at most a scrape old.
    """

    def __init__(
        self,
        engine: EngineSource,
        *,
        cluster_refresh: float = 1.0,
        node_label: Callable[[str], str] | None = None,
    ) -> None:
        self._source = engine
        self.cluster_refresh = cluster_refresh
        self._node_label = node_label or (lambda name: name)
        self._snapshot: EngineStats | None = None
        self._at = float("-inf")
        self._lock: asyncio.Lock | None = None
        self._task: Any = None  # the background refresh (a Task or a concurrent Future)

    @property
    def engine(self) -> SessionEngine | None:
        """The engine read, or ``None`` when the source has none (an app not started)."""
        source = self._source
        return source if isinstance(source, SessionEngine) else source()

    async def refresh(self) -> None:
        """Take a new cluster snapshot unless the last is fresh; keep the last on failure."""
        engine = self.engine
        if engine is None or time.monotonic() - self._at < self.cluster_refresh:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._at < self.cluster_refresh:
                return
            try:
                self._snapshot = await engine.stats()
            except (EngineUnavailable, EngineError):
                # Unavailable, or closed: the in-process counters still move; retry later.
                self._at = time.monotonic()
                return
            self._at = time.monotonic()

    def _refresh_in_background(self, engine: SessionEngine) -> None:
        if time.monotonic() - self._at < self.cluster_refresh:
            return
        if self._task is not None and not self._task.done():
            return
        try:
            loop = engine.transport.loop
        except EngineError:  # not open (yet, or any more)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._task = loop.create_task(self.refresh())
        elif loop.is_running():
            self._task = asyncio.run_coroutine_threadsafe(self.refresh(), loop)

    def read(self) -> Figures | None:
        """The figures now (counters live, cluster figures from the last snapshot);
        ``None`` while there is no engine."""
        engine = self.engine
        if engine is None:
            return None
        self._refresh_in_background(engine)
        m = engine._metrics  # the engine's own counters: read, never written here
        cumulative = 0
        buckets: list[tuple[float, int]] = []
        counts = list(m.lat_buckets)  # one copy: the loop may record meanwhile
        for bound, count in zip((*LATENCY_BUCKETS_MS, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((bound / 1000.0, cumulative))
        # The local cache's counters, live (engines without one export none of them).
        cache = engine._cache
        live = cache.snapshot() if cache is not None else None
        local: dict[str, int] = {}
        entries: int | None = None
        drops: dict[str, int] = {}
        if live is not None:
            local = {name: int(live[f"local_{name}"]) for name in _LOCAL_EVENTS}
            entries = int(live["local_entries"])
            drops = dict(live["local_drops"])
        breaker: dict[str, int] = {}
        inflight: dict[str, int] = {}
        try:
            transport = engine.transport
        except EngineError:
            transport = None
        if transport is not None:
            now = transport.loop.time()
            for node in transport.nodes():
                label = self._node_label(node.name)
                breaker[label] = int(node.breaker_open(now))
                inflight[label] = sum(len(c.pending) for c in node.connections())
        return Figures(
            validations=m.validations,
            hits=m.hits,
            misses={
                "unknown": m.miss_unknown,
                "expired": m.miss_expired,
                "state": m.miss_state,
                "malformed": m.miss_malformed,
            },
            errors=m.errors,
            latency_buckets=buckets,
            latency_sum_seconds=m.lat_sum / 1000.0,
            latency_count=cumulative,
            local_cache=local,
            local_entries=None if entries is None else int(entries),
            local_drops={str(k): int(v) for k, v in dict(drops).items()},
            breaker_open=breaker,
            inflight=inflight,
            cluster=self._snapshot,
        )


class PrometheusCollector:
    """A ``prometheus_client`` collector of one engine (register it on a registry).

    Args:
        engine: The engine, or a function returning the current one or ``None`` (e.g.
            ``lambda: getattr(app.state, "session_engine", None)`` for an app whose engine
            opens at startup).
        namespace: Prefix of every metric name.
        cluster_refresh: Seconds a cluster snapshot is reused (at least 1 is sensible).
        node_label: Turns "host:port" into the ``node`` label (e.g. a hash, when node
            addresses should not be published).
    """

    def __init__(
        self,
        engine: EngineSource,
        *,
        namespace: str = "session",
        cluster_refresh: float = 1.0,
        node_label: Callable[[str], str] | None = None,
    ) -> None:
        import prometheus_client.core  # noqa: PLC0415 - the optional extra, checked early

        self._core = prometheus_client.core
        self.figures = EngineFigures(engine, cluster_refresh=cluster_refresh, node_label=node_label)
        self._ns = namespace

    async def refresh(self) -> None:
        """Refresh the cluster figures now if stale (await it before a scrape's render)."""
        await self.figures.refresh()

    def describe(self) -> Iterator[Any]:
        # No I/O at registration: the names are fixed, no need to collect to learn them.
        return iter(())

    def collect(self) -> Iterator[Any]:
        core = self._core
        f = self.figures.read()
        if f is None:
            return
        ns = self._ns
        counter, gauge = core.CounterMetricFamily, core.GaugeMetricFamily
        yield counter(f"{ns}_validations", "Tokens validated by this engine.", value=f.validations)
        yield counter(f"{ns}_hits", "Validations that returned a session.", value=f.hits)
        misses = counter(
            f"{ns}_misses", "Validations that returned no session, by reason.", labels=["reason"]
        )
        for reason, count in f.misses.items():
            misses.add_metric([reason], count)
        yield misses
        yield counter(
            f"{ns}_engine_errors", "Engine calls that raised EngineUnavailable.", value=f.errors
        )
        yield core.HistogramMetricFamily(
            f"{ns}_validate_duration_seconds",
            "validate() latency, from the call to its answer.",
            buckets=[(_le(bound), count) for bound, count in f.latency_buckets],
            sum_value=f.latency_sum_seconds,
        )
        for name, value in f.local_cache.items():
            yield counter(f"{ns}_local_cache_{name}", f"Local-cache {name}.", value=value)
        if f.local_entries is not None:
            yield gauge(f"{ns}_local_cache_entries", "Tokens in the local cache.", f.local_entries)
        if f.local_drops:
            drops = counter(
                f"{ns}_local_cache_drops",
                "Local-cache entries dropped, by reason.",
                labels=["reason"],
            )
            for reason, count in f.local_drops.items():
                drops.add_metric([reason], count)
            yield drops
        breaker = gauge(
            f"{ns}_engine_node_breaker_open",
            "1 while the node's circuit breaker is open (calls fail fast).",
            labels=["node"],
        )
        inflight = gauge(
            f"{ns}_engine_node_inflight",
            "Commands sent to the node and not yet answered.",
            labels=["node"],
        )
        for node, value in f.breaker_open.items():
            breaker.add_metric([node], value)
            inflight.add_metric([node], f.inflight[node])
        yield breaker
        yield inflight
        s = f.cluster
        if s is None:
            return
        yield gauge(f"{ns}_active", "Live sessions in the cluster (estimate).", s.active_sessions)
        memory = gauge("redis_used_memory_bytes", "used_memory per primary.", labels=["node"])
        label = self.figures._node_label
        for node, used in s.used_memory_bytes.items():
            memory.add_metric([label(node)], used)
        yield memory
        yield gauge("redis_primaries", "Primaries the engine routes to.", s.primaries)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def instrument_otel(
    engine: EngineSource,
    *,
    meter: Any = None,
    cluster_refresh: float = 1.0,
    node_label: Callable[[str], str] | None = None,
) -> EngineFigures:
    """Register observable OpenTelemetry instruments that read ``engine``'s figures.

    Counters become ``ObservableCounter`` s, node and cluster figures
    ``ObservableGauge`` s; the latency histogram is exported as the cumulative count per
    bucket bound (``session.validate.duration.bucket`` with attribute ``le``, seconds) plus
    its sum and count, because the OpenTelemetry API has no observable histogram (a
    synchronous one would put a call on the hot path). Attributes follow the Prometheus
    labels: never a token, session id or user id.

    Args:
        engine: The engine.
        meter: An OpenTelemetry ``Meter``; default ``metrics.get_meter("engine")`` on the
            global provider.
        cluster_refresh: Seconds a cluster snapshot is reused.
        node_label: Turns "host:port" into the ``node`` attribute.

    Returns:
        The reader the callbacks share (``await figures.refresh()`` forces a snapshot).
    """
    from opentelemetry import metrics  # noqa: PLC0415 - the optional extra
    from opentelemetry.metrics import CallbackOptions, Observation  # noqa: PLC0415

    if meter is None:
        meter = metrics.get_meter("engine")
    figures = EngineFigures(engine, cluster_refresh=cluster_refresh, node_label=node_label)
    cache: dict[str, Any] = {"at": float("-inf"), "figures": None}

    def read() -> Figures | None:
        # One reading per collection, shared by every callback of that collection.
        now = time.monotonic()
        if now - cache["at"] > 0.05:
            cache["figures"], cache["at"] = figures.read(), now
        result: Figures | None = cache["figures"]
        return result

    def observe(fn: Callable[[Figures], list[tuple[float, dict[str, str]]]]) -> Any:
        def callback(_: CallbackOptions) -> list[Any]:
            f = read()
            if f is None:
                return []
            return [Observation(value, attrs) for value, attrs in fn(f)]

        return callback

    def one(fn: Callable[[Figures], float]) -> Any:
        return observe(lambda f: [(fn(f), {})])

    counters: dict[str, tuple[str, Any]] = {
        "session.validations": ("Tokens validated.", one(lambda f: f.validations)),
        "session.hits": ("Validations that returned a session.", one(lambda f: f.hits)),
        "session.misses": (
            "Validations that returned no session, by reason.",
            observe(lambda f: [(v, {"reason": k}) for k, v in f.misses.items()]),
        ),
        "session.engine.errors": ("Calls that raised EngineUnavailable.", one(lambda f: f.errors)),
        "session.local_cache.events": (
            "Local-cache hits, misses and invalidations.",
            observe(lambda f: [(v, {"event": k}) for k, v in f.local_cache.items()]),
        ),
        "session.local_cache.drops": (
            "Local-cache entries dropped, by reason.",
            observe(lambda f: [(v, {"reason": k}) for k, v in f.local_drops.items()]),
        ),
        "session.validate.duration.bucket": (
            "validate() calls at or under each bound (seconds, attribute le).",
            observe(lambda f: [(c, {"le": _le(b)}) for b, c in f.latency_buckets]),
        ),
        "session.validate.duration.count": (
            "validate() calls timed.",
            one(lambda f: f.latency_count),
        ),
        "session.validate.duration.sum": (
            "Seconds spent in validate().",
            one(lambda f: f.latency_sum_seconds),
        ),
    }
    for name, (text, callback) in counters.items():
        meter.create_observable_counter(name, callbacks=[callback], description=text)
    gauges: dict[str, tuple[str, Any]] = {
        "session.engine.node.breaker_open": (
            "1 while the node's circuit breaker is open.",
            observe(lambda f: [(v, {"node": k}) for k, v in f.breaker_open.items()]),
        ),
        "session.engine.node.inflight": (
            "Commands sent to the node and not yet answered.",
            observe(lambda f: [(v, {"node": k}) for k, v in f.inflight.items()]),
        ),
        "session.active": (
            "Live sessions in the cluster (estimate).",
            observe(lambda f: [] if f.cluster is None else [(f.cluster.active_sessions, {})]),
        ),
        "redis.used_memory": (
            "used_memory per primary, bytes.",
            observe(
                lambda f: (
                    []
                    if f.cluster is None
                    else [
                        (v, {"node": figures._node_label(k)})
                        for k, v in f.cluster.used_memory_bytes.items()
                    ]
                )
            ),
        ),
    }
    for name, (text, callback) in gauges.items():
        meter.create_observable_gauge(name, callbacks=[callback], description=text)
    return figures
