"""In-process counters, a latency window and a latency histogram: cheap enough for the hot path."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import Final

__all__ = ["LATENCY_BUCKETS_MS", "Metrics"]

LATENCY_BUCKETS_MS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
)  # fmt: skip
"""Upper bounds (milliseconds, inclusive) of the ``validate`` latency histogram: 50 us
(a local-cache hit) to 1 s (a call that waited through a failover); slower calls land in
the overflow bucket."""


class Metrics:
    """Counters of one engine; read by ``SessionEngine.stats``.

    Latencies go to a fixed ring of the last ``window`` validate calls (milliseconds);
    percentiles are computed only when asked for, so recording costs one store. They also
    go to ``lat_buckets`` (one count per bucket of ``LATENCY_BUCKETS_MS``, the overflow
    last; not cumulative, so recording is one bisect and one increment) and ``lat_sum``:
    a histogram that Prometheus can add up across processes, which percentiles are not.
    """

    __slots__ = (
        "_lat",
        "_lat_i",
        "_lat_n",
        "errors",
        "hits",
        "lat_buckets",
        "lat_sum",
        "miss_expired",
        "miss_malformed",
        "miss_state",
        "miss_unknown",
        "validations",
    )

    def __init__(self, window: int) -> None:
        self.validations = 0
        self.hits = 0
        self.miss_unknown = 0
        self.miss_expired = 0
        self.miss_state = 0
        self.miss_malformed = 0
        self.errors = 0
        self._lat = array("d", bytes(8 * window))
        self._lat_i = 0
        self._lat_n = 0
        self.lat_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.lat_sum = 0.0

    def latency(self, ms: float) -> None:
        i = self._lat_i
        self._lat[i] = ms
        i += 1
        self._lat_i = 0 if i == len(self._lat) else i
        if self._lat_n < len(self._lat):
            self._lat_n += 1
        self.lat_buckets[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.lat_sum += ms

    def percentiles(self, *qs: float) -> list[float | None]:
        """Nearest-rank percentiles (0-100) of the recorded window, or None if empty."""
        n = self._lat_n
        if n == 0:
            return [None for _ in qs]
        data = sorted(self._lat[:n])
        return [data[min(n - 1, max(0, round(q / 100 * n + 0.5) - 1))] for q in qs]
