"""The live views' payloads (the HTTP routes run in tests/streams/test_quota_agent.py)."""

from __future__ import annotations

import json
from decimal import Decimal
from types import SimpleNamespace

from aiokafka.partitioner import DefaultPartitioner

from metering.config import DEFAULT_SCORE_WEIGHTS
from producers import usage_record
from streams.quotas import LimitBook, TenantQuota, make_limit
from streams.views import partition_of, quota_payload, usage_payload
from streams.windows import PartitionWindows, WindowConfig

T0 = 1_715_328_000_000  # 2024-05-10 08:00 UTC
MIN = 60_000


def rec(i: int, tenant: str, metric: str, value: str, ts: int, resource: str = "vm-1") -> dict:
    return usage_record(event_id=f"e{i}", tenant_id=tenant, source="vm", resource_id=resource,
                        metric=metric, value=value, event_time_ms=ts)


def test_usage_lists_the_tenants_open_windows_with_exact_decimals_as_strings() -> None:
    pw = PartitionWindows(WindowConfig(sizes_ms=(MIN, 60 * MIN), lateness_ms=0,
                                       weights=DEFAULT_SCORE_WEIGHTS))
    pw.add(0, [
        rec(1, "acme", "cpu_time_nanos", "1500000000", T0 + 1_000),
        rec(2, "acme", "cpu_time_nanos", "0.1", T0 + 2_000),
        rec(3, "acme", "memory_usage_bytes", "2000000000", T0 + 3_000),
        rec(4, "acme", "memory_usage_bytes", "4000000000", T0 + 4_000),
        rec(5, "other", "cpu_time_nanos", "7", T0 + 5_000),
    ])
    state = SimpleNamespace(partitions={0: pw})
    got = json.loads(json.dumps(usage_payload(state, "acme", DEFAULT_SCORE_WEIGHTS)))
    assert got["tenant_id"] == "acme"
    assert [(w["window_size_seconds"], w["window_start_ms"]) for w in got["open_windows"]] == [
        (60, T0), (3600, T0)]
    minute = got["open_windows"][0]
    assert minute["metrics"]["cpu_time_nanos"] == {
        "aggregation": "sum", "value": "1500000000.100000000", "samples": 2}
    assert minute["metrics"]["memory_usage_bytes"]["value"] == "3000000000.000000000"  # mean
    # score = 1.5000000001 cpu-s * 1.0 + 3 GB * 0.5
    assert minute["score"] == "3.000000000"
    assert minute["samples"] == 4
    assert usage_payload(state, "nobody", DEFAULT_SCORE_WEIGHTS)["open_windows"] == []
    assert usage_payload(None, "acme", DEFAULT_SCORE_WEIGHTS)["open_windows"] == []


def test_quota_lists_limits_usage_and_fired_thresholds() -> None:
    tq = TenantQuota("acme")
    book = LimitBook([make_limit("acme", "cpu", "day", 100, source="file"),
                      make_limit("*", "score", "month", 10, [50], source="file")])
    tq.apply_window({"window_start_ms": T0, "window_end_ms": T0 + MIN, "score": Decimal("6"),
                     "totals": [{"metric": "cpu", "aggregation": "sum", "value": Decimal("85.5")},
                                {"metric": "mem", "aggregation": "resource_mean", "value": Decimal(1)}]},
                    book.for_tenant("acme"), MIN)
    got = json.loads(json.dumps(quota_payload("acme", tq.to_json(), book, (80, 100))))
    rows = {(r["metric"], r["period"]): r for r in got["quotas"]}
    assert rows[("cpu", "day")] == {
        "metric": "cpu", "period": "day", "period_start_ms": 1_715_299_200_000,
        "period_end_ms": 1_715_299_200_000 + 86_400_000, "limit": "100.000000000", "limit_source": "file",
        "used": "85.500000000", "percent_used": "85.500000000", "thresholds_percent": [80, 100],
        "fired_thresholds": [80], "quotable": True}
    assert rows[("score", "month")]["limit_source"] == "file (*)"
    assert rows[("score", "month")]["fired_thresholds"] == [50]
    assert rows[("cpu", "month")]["limit"] is None  # usage without a limit is shown too
    assert got["not_quotable_metrics"] == {"mem": "resource_mean"}
    assert got["last_window_end_ms"] == T0 + MIN
    # a tenant without state still sees its limits
    empty = quota_payload("new", None, book, (80, 100))
    assert [(r["metric"], r["used"], r["fired_thresholds"]) for r in empty["quotas"]] == [
        ("score", "0.000000000", [])]


def test_routing_partition_is_the_producers_murmur2() -> None:
    part = DefaultPartitioner()
    for tenant in ["acme", "t-1", "tenant-ü", "x" * 40]:
        for n in (1, 2, 4, 12):
            assert partition_of(tenant, n) == part(tenant.encode(), list(range(n)), list(range(n)))


def test_usage_shows_the_running_seconds_the_window_would_close_with() -> None:
    pw = PartitionWindows(WindowConfig(sizes_ms=(MIN,), lateness_ms=0, weights=DEFAULT_SCORE_WEIGHTS))
    started = rec(1, "acme", "vm_started", "1", T0 + 15_000)
    pw.add(0, [started, rec(2, "acme", "vm_heartbeat", "1", T0 + 30_000)])
    got = usage_payload(SimpleNamespace(partitions={0: pw}), "acme", DEFAULT_SCORE_WEIGHTS)
    assert got["open_windows"][0]["metrics"]["vm_running_seconds"] == {
        "aggregation": "time_weighted", "value": "45.000000000", "samples": 1}
