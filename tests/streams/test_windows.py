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
    return WindowConfig(sizes_ms=(size,), lateness_ms=lateness, weights=DEFAULT_SCORE_WEIGHTS)


def test_window_closes_only_when_watermark_passes_its_end() -> None:
    pw = PartitionWindows(cfg())
    pw.add(1, [rec("a", "cpu_time_nanos", 5, 1_000)])
    pw.add(2, [rec("a", "cpu_time_nanos", 7, 65_000)])  # watermark 55 s: window 0 still open
    assert pw.close_due() == []
    pw.add(3, [rec("a", "cpu_time_nanos", 1, 70_000)])  # watermark 60 s: window 0 closes
    (closed,) = pw.close_due()
    assert closed["window_id"] == "a|0|60000"
    assert closed["totals"] == [
        {"metric": "cpu_time_nanos", "aggregation": "sum", "value": Decimal("5"), "samples": 1}
    ]


def test_out_of_order_within_lateness_is_counted_and_late_is_returned() -> None:
    pw = PartitionWindows(cfg())
    pw.add(4, [rec("a", "cpu_time_nanos", 1, 65_000), rec("a", "cpu_time_nanos", 2, 59_000)])
    assert pw.close_due() == []
    pw.add(5, [rec("a", "cpu_time_nanos", 3, 75_000)])
    (w0,) = pw.close_due()
    assert w0["totals"][0]["value"] == Decimal(2)
    late = pw.add(6, [rec("a", "cpu_time_nanos", 4, 30_000)]).late
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
        pw.add(1, order)
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
    pw.add(7, [rec("b", "x", 1, 1), rec("a", "x", 1, 2), rec("a", "x", 1, 10_001)])
    pw.promise(20_000)
    ids = [w["window_id"] for w in pw.close_due()]
    assert ids == ["a|0|10000", "b|0|10000", "a|10000|10000"]


def test_duplicates_inside_a_window_count_once() -> None:
    pw = PartitionWindows(cfg())
    out = pw.add(1, [rec("a", "cpu_time_nanos", 5, 1_000, eid="x"),
                     rec("a", "cpu_time_nanos", 5, 1_000, eid="x")])
    assert out.duplicates == 1
    pw.promise(60_000)
    (w,) = pw.close_due()
    assert w["sample_count"] == 1 and w["totals"][0]["value"] == Decimal(5)


def test_several_window_sizes() -> None:
    pw = PartitionWindows(WindowConfig(sizes_ms=(10_000, 60_000), lateness_ms=0,
                                       weights=DEFAULT_SCORE_WEIGHTS))
    pw.add(1, [rec("a", "x", 1, 1_000), rec("a", "x", 2, 15_000)])
    pw.promise(60_000)
    ids = sorted(w["window_id"] for w in pw.close_due())
    assert ids == ["a|0|10000", "a|0|60000", "a|10000|10000"]


def test_restart_from_snapshot_replays_without_double_emission() -> None:
    """Crash after window 0 closed while window 1 is open: replay from the oldest held
    message rebuilds window 1 exactly and does not emit window 0 again."""
    msgs = [
        (0, [rec("a", "x", 1, 1_000)]),
        (1, [rec("a", "x", 2, 50_000), rec("a", "x", 3, 61_000)]),
        (2, [rec("a", "x", 4, 75_000)]),  # watermark 65 s: window 0 closes
        (3, [rec("a", "x", 5, 30_000), rec("a", "x", 6, 80_000)]),  # 30 s is late
    ]
    live = PartitionWindows(cfg())
    emitted, snap, held = [], None, {}
    for off, recs in msgs:
        out = live.add(off, recs)
        emitted += live.close_due()
        held[off] = out.release_at
        held = {o: r for o, r in held.items() if r > (live.closed_wm or -1)}
        snap = live.snapshot(min(held, default=None))
    assert [w["window_id"] for w in emitted] == ["a|0|60000"]
    assert sorted(held) == [1, 2, 3]  # message 1 also feeds window 1

    restored = PartitionWindows(cfg(), saved=snap)
    again = []
    for off, recs in msgs[min(held):]:
        out = restored.add(off, recs)
        assert out.late == []  # late samples were already sent before the crash
        again += restored.close_due()
    assert again == []
    for pw in (live, restored):
        pw.add(4, [rec("a", "x", 7, 200_000)])
    (w1_live,) = [w for w in live.close_due() if w["window_start_ms"] == 60_000]
    (w1_restored,) = [w for w in restored.close_due() if w["window_start_ms"] == 60_000]
    assert w1_live == w1_restored
    assert w1_live["totals"][0]["value"] == Decimal(3 + 4 + 6)
    assert w1_live["late_samples"] == 1


def life(tenant: str, metric: str, ts: int, vm: str = "vm-1", **meta: str) -> dict:
    r = rec(tenant, metric, 1, ts, vm)
    r["metadata"] = meta
    r["source"] = "vm"
    return r


def gap_config() -> WindowConfig:
    return WindowConfig(sizes_ms=(60_000,), lateness_ms=0, weights=DEFAULT_SCORE_WEIGHTS,
                        heartbeat_timeout_ms=20_000)


def closed_flags(pw: PartitionWindows) -> dict[str, bool]:
    pw.promise(10**12)
    return {w["window_id"]: w["has_gap"] for w in pw.close_due()}


def test_possible_gap_notice_flags_every_window_it_overlaps() -> None:
    pw = PartitionWindows(gap_config())
    pw.add(1, [rec("a", "cpu_time_nanos", 1, 5_000), rec("a", "cpu_time_nanos", 1, 65_000),
               rec("a", "cpu_time_nanos", 1, 125_000), rec("b", "cpu_time_nanos", 1, 65_000)])
    pw.add(2, [life("a", "vm_possible_gap", 50_000, resume_time_ms="70000")])
    assert closed_flags(pw) == {"a|0|60000": True, "a|60000|60000": True,
                                "a|120000|60000": False, "b|60000|60000": False}


def test_missing_heartbeats_flag_a_gap_only_where_heartbeats_are_used() -> None:
    pw = PartitionWindows(gap_config())
    beats = [life("a", "vm_heartbeat", t) for t in (0, 15_000, 30_000, 45_000)]
    # window 0: steady heartbeats; window 1: heartbeats stop at 70 s, usage continues
    pw.add(1, [*beats, rec("a", "cpu_time_nanos", 1, 10_000, "vm-1"),
               life("a", "vm_heartbeat", 60_000), life("a", "vm_heartbeat", 70_000),
               rec("a", "cpu_time_nanos", 1, 100_000, "vm-1"),
               rec("b", "cpu_time_nanos", 1, 10_000, "vm-9")])  # b sends no heartbeats
    assert closed_flags(pw) == {"a|0|60000": False, "a|60000|60000": True, "b|0|60000": False}


def test_a_stopped_vm_needs_no_heartbeats_after_its_stop() -> None:
    pw = PartitionWindows(gap_config())
    pw.add(1, [life("a", "vm_heartbeat", 0), life("a", "vm_heartbeat", 15_000),
               life("a", "vm_stopped", 20_000), rec("a", "cpu_time_nanos", 1, 10_000)])
    assert closed_flags(pw) == {"a|0|60000": False}


def test_replay_from_a_lagging_commit_skips_released_messages() -> None:
    """The commit lags the releases: a replay re-reads messages whose windows all closed;
    they must change nothing (found by the SIGKILL test as spurious late counts)."""
    c = WindowConfig(sizes_ms=(10_000,), lateness_ms=0, weights=DEFAULT_SCORE_WEIGHTS)
    msgs = [
        (0, [rec("a", "x", 1, 5_000)], None),
        (1, [rec("a", "x", 2, 15_000)], None),  # closes window 0
        (2, [rec("a", "x", 3, 16_000)], None),
        (3, [], 20_000),  # a watermark promise closes window 1; nothing is held after it
        (4, [rec("a", "x", 4, 25_000)], None),
    ]
    live = PartitionWindows(c)
    held: dict[int, int] = {}
    emitted = []
    snap = None
    for off, recs, wm in msgs[:4]:
        out = live.add(off, recs, wm)
        emitted += live.close_due()
        held[off] = out.release_at
        held = {o: r for o, r in held.items() if r > (live.closed_wm or -1)}
        snap = live.snapshot(min(held, default=None))
    assert held == {}
    restored = PartitionWindows(c, saved=snap)
    for off, recs, wm in msgs[1:]:  # the committed offset was still 1
        restored.add(off, recs, wm)
        assert restored.close_due() == []
    live.add(4, msgs[4][1])
    restored.promise(10**9)
    live.promise(10**9)
    assert restored.close_due() == live.close_due()
