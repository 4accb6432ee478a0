"""VM running time from lifecycle records (streams/lifecycle.py), alone and in closed windows."""

from __future__ import annotations

import itertools
import time
from decimal import Decimal
from pathlib import Path

import pytest

from metering import topics
from metering.config import DEFAULT_SCORE_WEIGHTS, Settings
from producers.simulators.metald import MetaldSimulator
from producers.vm_gateway import VmGateway
from schemas import window_codec
from streams.lifecycle import running_ms, vm_running_seconds
from streams.windows import PartitionWindows, WindowConfig
from tests.streams.test_windows import life, rec
from tests.topic_reader import read_all
from tests.workers import WorkerProcess

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


# ---- end to end: metald -> VM gateway -> usage.vm -> the real worker -> usage.windows ----------

SIZE_S = 10


@pytest.mark.integration
def test_running_seconds_from_the_gateways_start_and_stop_notices(
        settings: Settings, tmp_path: Path) -> None:
    """Two VMs of one customer, started and stopped through the real VM gateway (metald's
    Connect JSON calls, simulated), windowed by the real worker on the real broker: each
    closed window carries the VMs' running time between their start and stop. No heartbeats:
    they carry the gateway's receive time, and each VM has a start or stop in every window
    it runs in."""
    s = settings.model_copy(update={"window_sizes_seconds": [SIZE_S], "allowed_lateness_seconds": 1,
                                    "idle_close_seconds": 2})
    # ten-second boundary two minutes ago: in the past (valid input), closed by the idle clock
    t0 = (time.time_ns() // 10**9 - 120) // SIZE_S * SIZE_S * 10**9
    gateway = VmGateway(s.kafka_bootstrap_servers or "", s.topic(topics.SOURCE_TOPICS["vm"]),
                        ack_timeout=15).start()
    worker = WorkerProcess(s, tmp_path).start()
    try:
        with MetaldSimulator(gateway.url, tenants=1, vms_per_tenant=2, interval_ms=1_000,
                             points_per_batch=5, seed=11) as sim:
            a, b = sim.vms
            second = 10**9
            assert sim.start(a, t0 + 2 * second).status_code == 200
            assert sim.send_batch(a, t0 + 3 * second).status_code == 200  # 3 s .. 7 s
            assert sim.stop(a, t0 + 13 * second).status_code == 200
            assert sim.start(b, t0 + 15 * second).status_code == 200
            assert sim.send_batch(b, t0 + 16 * second).status_code == 200  # 16 s .. 20 s
            assert sim.stop(b, t0 + 27 * second).status_code == 200
        start_ms = t0 // 10**6
        got = wait_for_windows(s, {start_ms, start_ms + 10_000, start_ms + 20_000})
    finally:
        worker.stop()
        gateway.stop()
    running = {w["window_start_ms"] - start_ms: next(
        (t["value"], t["samples"]) for t in w["totals"] if t["metric"] == "vm_running_seconds")
        for w in got}
    # a: 2 s .. 13 s; b: 15 s .. 27 s
    assert running == {0: (Decimal(8), 1), 10_000: (Decimal(3 + 5), 2), 20_000: (Decimal(7), 1)}


def wait_for_windows(s: Settings, starts: set[int], timeout: float = 60) -> list[dict]:
    """The closed windows starting at ``starts``, read from usage.windows once all are there."""
    codec = window_codec()
    deadline = time.monotonic() + timeout
    while True:
        windows = [codec.decode(m.value()) for m in read_all(s, topics.WINDOWS, idle=1.0)]
        got = [w for w in windows if w["window_start_ms"] in starts]
        if {w["window_start_ms"] for w in got} == starts:
            assert len(got) == len(starts), f"a window was emitted twice: {got}"
            return got
        assert time.monotonic() < deadline, f"windows never closed; got {windows}"
        time.sleep(1)
