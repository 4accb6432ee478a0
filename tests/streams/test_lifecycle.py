"""VM running time from lifecycle records (streams/lifecycle.py), alone and in closed windows."""

from __future__ import annotations

import itertools
from decimal import Decimal

from metering.config import DEFAULT_SCORE_WEIGHTS
from streams.lifecycle import running_ms, vm_running_seconds
from streams.windows import PartitionWindows, WindowConfig
from tests.streams.test_windows import life, rec

MIN = 60_000


def test_running_time_inside_one_window() -> None:
    assert running_ms(0, MIN, [], []) == MIN  # seen (heartbeats only): ran the whole window
    assert running_ms(0, MIN, [20_000], []) == 40_000  # started inside
    assert running_ms(0, MIN, [], [15_000]) == 15_000  # started before, stopped inside
    assert running_ms(0, MIN, [10_000], [25_000]) == 15_000
    # stopped, restarted: two runs
    assert running_ms(0, MIN, [30_000], [10_000]) == 10_000 + 30_000
    # a restart at one instant is one unbroken run
    assert running_ms(0, MIN, [30_000], [30_000]) == MIN
    # a repeated start (a retried notice with another id) or stop counts once
    assert running_ms(0, MIN, [10_000, 12_000], [50_000, 55_000]) == 40_000


def test_vm_running_seconds_sums_vms_exactly_and_counts_them() -> None:
    got = vm_running_seconds(0, MIN, ["a", "b"], {"a": [1]}, {"b": [2_500]})
    assert got == (Decimal("59.999") + Decimal("2.5"), 2)
    assert vm_running_seconds(0, MIN, [], {}, {}) is None


def running_totals(windows: list[dict]) -> dict[str, dict]:
    return {w["window_id"]: next((t for t in w["totals"] if t["metric"] == "vm_running_seconds"),
                                 None) for w in windows}


def lifecycle_run() -> list[dict]:
    # vm-1 starts at 20 s, heartbeats, stops at 130 s; vm-2 only heartbeats in window 1;
    # vm-3 sends usage but no lifecycle record: nothing to judge its running time by
    return [
        life("a", "vm_started", 20_000), life("a", "vm_heartbeat", 40_000),
        rec("a", "cpu_time_nanos", 5, 30_000, "vm-3"),
        life("a", "vm_heartbeat", 70_000), life("a", "vm_heartbeat", 70_000, "vm-2"),
        life("a", "vm_heartbeat", 125_000), life("a", "vm_stopped", 130_000),
    ]


def closed(records: list[dict]) -> list[dict]:
    pw = PartitionWindows(WindowConfig(sizes_ms=(MIN,), lateness_ms=MIN,
                                       weights=DEFAULT_SCORE_WEIGHTS))
    for i, r in enumerate(records):
        pw.add(i, [r])
    pw.promise(10**12)
    return pw.close_due()


def test_closed_windows_carry_the_vms_running_seconds_between_start_and_stop() -> None:
    got = running_totals(closed(lifecycle_run()))
    assert got == {
        "a|0|60000": {"metric": "vm_running_seconds", "aggregation": "time_weighted",
                      "value": Decimal(40), "samples": 1},
        "a|60000|60000": {"metric": "vm_running_seconds", "aggregation": "time_weighted",
                          "value": Decimal(120), "samples": 2},
        "a|120000|60000": {"metric": "vm_running_seconds", "aggregation": "time_weighted",
                           "value": Decimal(10), "samples": 1},
    }


def test_running_seconds_do_not_depend_on_arrival_order() -> None:
    records = lifecycle_run()
    expected = closed(records)
    for order in itertools.islice(itertools.permutations(records), 0, None, 97):
        assert closed(list(order)) == expected


def test_windows_without_lifecycle_records_have_no_running_total() -> None:
    windows = closed([rec("b", "cpu_time_nanos", 1, 10_000)])
    assert [t["metric"] for t in windows[0]["totals"]] == ["cpu_time_nanos"]
