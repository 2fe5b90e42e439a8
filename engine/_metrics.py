"""In-process counters and a latency window: cheap enough for the hot path."""

from __future__ import annotations

from array import array

__all__ = ["Metrics"]


class Metrics:
    """Counters of one engine; read by ``SessionEngine.stats``.

    Latencies go to a fixed ring of the last ``window`` validate calls (milliseconds);
    percentiles are computed only when asked for, so recording costs one store.
    """

    __slots__ = (
        "_lat",
        "_lat_i",
        "_lat_n",
        "errors",
        "hits",
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

    def latency(self, ms: float) -> None:
        i = self._lat_i
        self._lat[i] = ms
        i += 1
        self._lat_i = 0 if i == len(self._lat) else i
        if self._lat_n < len(self._lat):
            self._lat_n += 1

    def percentiles(self, *qs: float) -> list[float | None]:
        """Nearest-rank percentiles (0-100) of the recorded window, or None if empty."""
        n = self._lat_n
        if n == 0:
            return [None for _ in qs]
        data = sorted(self._lat[:n])
        return [data[min(n - 1, max(0, round(q / 100 * n + 0.5) - 1))] for q in qs]
