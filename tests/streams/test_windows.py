"""Unit tests of the event-time windows (streams/windows.py)."""

from __future__ import annotations

from decimal import Decimal

from metering.config import DEFAULT_SCORE_WEIGHTS
from streams.windows import PartitionWindows, WindowConfig


def rec(tenant: str, metric: str, value: int | str, ts: int, resource: str = "vm-1",
        eid: str | None = None) -> dict:
    return {
        "event_id": eid or f"{tenant}:{resource}:{metric}:{ts}",
        "tenant_id": tenant,
        "resource_id": resource,
        "metric": metric,
        "value": Decimal(value),
        "event_time_ms": ts,
    }


def cfg(size: int = 60_000, lateness: int = 10_000) -> WindowConfig:
    return WindowConfig(size_ms=size, lateness_ms=lateness, weights=DEFAULT_SCORE_WEIGHTS)


def test_window_closes_only_when_watermark_passes_its_end() -> None:
    pw = PartitionWindows(cfg())
    pw.add([rec("a", "cpu_time_nanos", 5, 1_000)])
    pw.add([rec("a", "cpu_time_nanos", 7, 65_000)])  # watermark 55 s: window 0 still open
    assert pw.close_due() == []
    pw.add([rec("a", "cpu_time_nanos", 1, 70_000)])  # watermark 60 s: window 0 closes
    (closed,) = pw.close_due()
    assert closed["window_id"] == "a|0|60000"
    assert closed["totals"] == [
        {"metric": "cpu_time_nanos", "aggregation": "sum", "value": Decimal("5"), "samples": 1}
    ]


def test_out_of_order_within_lateness_is_counted_and_late_is_returned() -> None:
    pw = PartitionWindows(cfg())
    pw.add([rec("a", "cpu_time_nanos", 1, 65_000), rec("a", "cpu_time_nanos", 2, 59_000)])
    assert pw.close_due() == []
    pw.add([rec("a", "cpu_time_nanos", 3, 75_000)])
    (w0,) = pw.close_due()
    assert w0["totals"][0]["value"] == Decimal(2)
    late = pw.add([rec("a", "cpu_time_nanos", 4, 30_000)])
    assert [r["value"] for r in late] == [Decimal(4)]
    assert pw.late_total == 1
    pw.promise(200_000)
    w1, = pw.close_due()
    assert w1["late_samples"] == 1  # late samples are reported, never silently dropped
    assert w1["totals"][0]["value"] == Decimal(4)  # 1 + 3


def test_result_is_independent_of_arrival_order() -> None:
    samples = [
        rec("t", "cpu_time_nanos", 3_000_000_000, 1_000, "vm-1"),
        rec("t", "memory_usage_bytes", 2_000_000_000, 1_000, "vm-1"),
        rec("t", "memory_usage_bytes", 4_000_000_000, 11_000, "vm-1"),
        rec("t", "memory_usage_bytes", 1_000_000_000, 1_000, "vm-2"),
        rec("t", "disk_read_bytes", 1_500_000, 2_000, "vm-2"),
        rec("t", "disk_write_bytes", 500_000, 2_000, "vm-2"),
    ]
    results = []
    for order in (samples, list(reversed(samples))):
        pw = PartitionWindows(cfg())
        pw.add(order)
        pw.promise(60_000)
        results.append(pw.close_due())
    assert results[0] == results[1]
    (w,) = results[0]
    totals = {t["metric"]: t["value"] for t in w["totals"]}
    # memory: vm-1 mean 3 GB + vm-2 mean 1 GB
    assert totals["memory_usage_bytes"] == Decimal(4_000_000_000)
    # 3 cpu s * 1.0 + 4 GB * 0.5 + 2 MB * 0.3
    assert w["score"] == Decimal("5.600000000")


def test_windows_of_tenants_close_in_deterministic_order() -> None:
    pw = PartitionWindows(cfg(size=10_000, lateness=0))
    pw.add([rec("b", "x", 1, 1), rec("a", "x", 1, 2), rec("a", "x", 1, 10_001)])
    pw.promise(20_000)
    ids = [w["window_id"] for w in pw.close_due()]
    assert ids == ["a|0|10000", "b|0|10000", "a|10000|10000"]
