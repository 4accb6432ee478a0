"""Per-metric aggregations of one window, exact on Decimal.

Each aggregation keeps a small state per (tenant, window, metric) and returns one Decimal.
Results depend only on the multiset of samples, never on arrival order, so a window
recomputed after a crash or a replay gives the same number.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

__all__ = [
    "AGGREGATIONS", "AGGREGATION_CONTEXT", "DEFAULT_METRIC_AGGREGATIONS", "MetricState", "new_state",
]

#: the sources' known metrics; anything else defaults to "sum" (``METRIC_AGGREGATIONS``
#: in the settings overrides or extends this)
DEFAULT_METRIC_AGGREGATIONS: dict[str, str] = {
    # billaged's VM metrics (counters already turned into per-batch amounts)
    "cpu_time_nanos": "sum",
    "memory_usage_bytes": "resource_mean",
    "disk_read_bytes": "sum",
    "disk_write_bytes": "sum",
    "network_rx_bytes": "sum",
    "network_tx_bytes": "sum",
    # Redis Enterprise gauges, one sample per poll interval (producers/redis_enterprise.py)
    "node_memory_bytes": "resource_mean",
    "node_cpu_cores": "resource_mean",
    "db_memory_bytes": "resource_mean",
    "db_shards": "resource_mean",
    "shards_max": "max",
    "shards_used": "time_weighted",  # shard-seconds: what a per-shard-hour price multiplies
}

AGGREGATIONS = ("sum", "count", "max", "latest", "unique_count", "resource_mean", "time_weighted")

_ZERO = Decimal(0)
# wide enough that a mean of decimal(38, 9) values is exact to well past 9 places
_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
#: the context every aggregation adds in (callers that inline a sum must use it too)
AGGREGATION_CONTEXT = _CTX


@dataclass(slots=True)
class MetricState:
    """Accumulator of one metric in one window of one tenant."""

    kind: str
    samples: int = 0
    total: Decimal = _ZERO
    maximum: Decimal | None = None
    latest_key: tuple[int, str] | None = None
    latest: Decimal = _ZERO
    distinct: set[Decimal] = field(default_factory=set)
    per_resource: dict[str, list[Any]] = field(default_factory=dict)  # resource -> [sum, n]
    points: dict[str, dict[int, Decimal]] = field(default_factory=dict)  # resource -> ts -> value

    def add(self, value: Decimal, ts_ms: int, event_id: str, resource_id: str) -> None:
        """Fold one sample in."""
        self.samples += 1
        kind = self.kind
        if kind == "sum":
            self.total = _CTX.add(self.total, value)
        elif kind == "max":
            if self.maximum is None or value > self.maximum:
                self.maximum = value
        elif kind == "latest":
            key = (ts_ms, event_id)  # event_id breaks ties so the result is order-independent
            if self.latest_key is None or key > self.latest_key:
                self.latest_key, self.latest = key, value
        elif kind == "unique_count":
            self.distinct.add(value)
        elif kind == "resource_mean":
            acc = self.per_resource.get(resource_id)
            if acc is None:
                self.per_resource[resource_id] = [value, 1]
            else:
                acc[0] = _CTX.add(acc[0], value)
                acc[1] += 1
        elif kind == "time_weighted":
            series = self.points.setdefault(resource_id, {})
            old = series.get(ts_ms)
            # two readings at one instant: keep the larger, so the result is order-independent
            if old is None or value > old:
                series[ts_ms] = value

    def merge(self, other: MetricState) -> None:
        """Fold in another state of the same kind: the same as adding its samples one by one
        (every aggregation is exact and order-independent, so a message can be folded once
        and merged into each of its windows)."""
        if other.kind != self.kind:
            raise ValueError(f"cannot merge a {other.kind} state into a {self.kind} state")
        self.samples += other.samples
        kind = self.kind
        if kind == "sum":
            self.total = _CTX.add(self.total, other.total)
        elif kind == "max":
            if other.maximum is not None and (self.maximum is None or other.maximum > self.maximum):
                self.maximum = other.maximum
        elif kind == "latest":
            key = other.latest_key
            if key is not None and (self.latest_key is None or key > self.latest_key):
                self.latest_key, self.latest = key, other.latest
        elif kind == "unique_count":
            self.distinct |= other.distinct
        elif kind == "resource_mean":
            mine = self.per_resource
            for resource_id, (total, n) in other.per_resource.items():
                acc = mine.get(resource_id)
                if acc is None:
                    mine[resource_id] = [total, n]  # a copy: other may be merged elsewhere too
                else:
                    acc[0] = _CTX.add(acc[0], total)
                    acc[1] += n
        elif kind == "time_weighted":
            for resource_id, theirs in other.points.items():
                series = self.points.get(resource_id)
                if series is None:
                    self.points[resource_id] = dict(theirs)
                    continue
                for ts_ms, value in theirs.items():
                    old = series.get(ts_ms)
                    if old is None or value > old:
                        series[ts_ms] = value

    def result(self, window_end_ms: int | None = None) -> Decimal:
        """The aggregated value (unrounded); ``time_weighted`` needs the window's end."""
        kind = self.kind
        if kind == "time_weighted":
            return self._time_weighted(window_end_ms)
        if kind == "sum":
            return self.total
        if kind == "count":
            return Decimal(self.samples)
        if kind == "max":
            return self.maximum if self.maximum is not None else _ZERO
        if kind == "latest":
            return self.latest
        if kind == "unique_count":
            return Decimal(len(self.distinct))
        # resource_mean: each resource's mean sample, summed over resources — a tenant's
        # average footprint of a gauge (memory) during the window. Summed as exact fractions
        # and divided once: adding rounded means made the last digit depend on the order the
        # resources first arrived in, which a total halfway between two billed values shows
        total = sum((Fraction(s) / n for s, n in self.per_resource.values()), Fraction(0))
        return _CTX.divide(Decimal(total.numerator), Decimal(total.denominator))


    def _time_weighted(self, window_end_ms: int | None) -> Decimal:
        # value x seconds, a step function per resource: each reading holds until the
        # resource's next reading in the window, the last one until the window's end (a
        # gauge sampled at the end of each interval bills that interval in full; a resource
        # that stops should report a final 0)
        total = _ZERO
        for series in self.points.values():
            times = sorted(series)
            ends = times[1:] + [window_end_ms if window_end_ms is not None else times[-1]]
            for t, end in zip(times, ends, strict=True):
                held_ms = max(0, end - t)
                total = _CTX.add(total, _CTX.multiply(series[t], _CTX.divide(Decimal(held_ms), 1000)))
        return total


def new_state(kind: str) -> MetricState:
    """A fresh accumulator; raises ValueError for an unknown aggregation."""
    if kind not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {kind!r}; known: {', '.join(AGGREGATIONS)}")
    return MetricState(kind)
