"""Event-time tumbling windows with our own watermark, one instance per input partition.

Faust's windowed tables close windows by wall clock and lose late, replayed and restored
data (DESIGN rule 2), so windows are kept here in plain dicts and closed explicitly:

* the watermark of a partition is the highest event time seen minus the allowed lateness
  (or a producer's promise carried in an envelope, or wall clock when the partition idles);
* a window [start, start+size) closes once, when the watermark reaches its end, and its
  result is deterministic: the same samples give the same bytes, whatever their order;
* a sample whose window has already closed is late: it is returned to the caller (which
  sends it to ``usage.late``) and counted on the next window of that tenant, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from schemas import DECIMAL_QUANTUM
from streams.aggregations import DEFAULT_METRIC_AGGREGATIONS, MetricState, new_state
from streams.scoring import score

__all__ = ["PartitionWindows", "WindowConfig", "window_id"]


@dataclass(frozen=True)
class WindowConfig:
    """How windows are cut and aggregated."""

    size_ms: int
    lateness_ms: int
    weights: Mapping[str, Decimal]
    aggregations: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_METRIC_AGGREGATIONS)
    )
    default_aggregation: str = "sum"

    def aggregation(self, metric: str) -> str:
        """The aggregation declared for a metric (``sum`` when none is)."""
        return self.aggregations.get(metric, self.default_aggregation)


def window_id(tenant_id: str, start_ms: int, size_ms: int) -> str:
    """The deterministic identity of a tenant's window."""
    return f"{tenant_id}|{start_ms}|{size_ms}"


@dataclass(slots=True)
class _Window:
    metrics: dict[str, MetricState] = field(default_factory=dict)
    samples: int = 0


class PartitionWindows:
    """Open windows of one input partition, its watermark, and the closed-window results."""

    def __init__(self, config: WindowConfig) -> None:
        self.config = config
        self.max_event_ms: int | None = None
        self.promised_ms: int | None = None  # producers' watermark promises
        self.closed_before_ms: int | None = None  # every window ending at or before is closed
        self.open: dict[tuple[str, int], _Window] = {}
        self.late_counts: dict[str, int] = {}  # tenant -> late samples not yet reported
        self.late_total = 0

    @property
    def watermark_ms(self) -> int | None:
        """Event time below which no more samples are expected."""
        candidates = []
        if self.max_event_ms is not None:
            candidates.append(self.max_event_ms - self.config.lateness_ms)
        if self.promised_ms is not None:
            candidates.append(self.promised_ms)
        return max(candidates) if candidates else None

    def add(self, records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Fold canonical usage records in; return those that arrived after their window closed."""
        size = self.config.size_ms
        late: list[Mapping[str, Any]] = []
        closed_before = self.closed_before_ms
        open_ = self.open
        for r in records:
            ts = r["event_time_ms"]
            start = ts - ts % size
            if closed_before is not None and start + size <= closed_before:
                late.append(r)
                tenant = r["tenant_id"]
                self.late_counts[tenant] = self.late_counts.get(tenant, 0) + 1
                self.late_total += 1
                continue
            key = (r["tenant_id"], start)
            win = open_.get(key)
            if win is None:
                win = open_[key] = _Window()
            metric = r["metric"]
            state = win.metrics.get(metric)
            if state is None:
                state = win.metrics[metric] = new_state(self.config.aggregation(metric))
            state.add(r["value"], ts, r["event_id"], r["resource_id"])
            win.samples += 1
            if self.max_event_ms is None or ts > self.max_event_ms:
                self.max_event_ms = ts
        return late

    def promise(self, watermark_ms: int | None) -> None:
        """Record a producer's or the idle clock's promise that earlier event times are done."""
        if watermark_ms is not None and (self.promised_ms is None or watermark_ms > self.promised_ms):
            self.promised_ms = watermark_ms

    def close_due(self) -> list[dict[str, Any]]:
        """Close every window whose end is at or before the watermark; WindowResult dicts."""
        wm = self.watermark_ms
        if wm is None:
            return []
        size = self.config.size_ms
        due = sorted((k for k in self.open if k[1] + size <= wm), key=lambda k: (k[1], k[0]))
        results = [self._result(tenant, start, self.open.pop((tenant, start)))
                   for tenant, start in due]
        boundary = wm - wm % size  # windows ending at or before this are now closed
        if self.closed_before_ms is None or boundary > self.closed_before_ms:
            self.closed_before_ms = boundary
        return results

    def _result(self, tenant: str, start: int, win: _Window) -> dict[str, Any]:
        size = self.config.size_ms
        raw_totals = {m: st.result() for m, st in win.metrics.items()}
        totals = [
            {
                "metric": m,
                "aggregation": win.metrics[m].kind,
                "value": raw_totals[m].quantize(DECIMAL_QUANTUM),
                "samples": win.metrics[m].samples,
            }
            for m in sorted(win.metrics)
        ]
        return {
            "window_id": window_id(tenant, start, size),
            "tenant_id": tenant,
            "window_start_ms": start,
            "window_end_ms": start + size,
            "totals": totals,
            "sample_count": win.samples,
            "score": score(raw_totals, self.config.weights),
            "late_samples": self.late_counts.pop(tenant, 0),
            "has_gap": False,
        }
