"""Issue 4 acceptance on the real broker: a SIGKILLed and restarted worker, and two workers
sharing one consumer group, produce exactly the closed windows of one uninterrupted worker.

Windows are compared from ``usage.windows`` itself: every window id must map to one value
(a window re-emitted after a crash must be byte-identical) and the set must equal the
uninterrupted run's. ClickHouse stores them deduplicated by window id (see the sink tests).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from metering import topics
from metering.config import Settings, load_settings
from metering.embedded import TansuBroker
from metering.topics import ensure_topics
from producers import EnvelopePublisher
from producers.simulators import VmSimulator
from schemas import window_codec
from tests.workers import WorkerProcess

pytestmark = pytest.mark.integration

SIZE_S = 4
BATCHES = 60
# one event-time origin for every run of this module, so their windows are comparable
START_MS = (int(time.time() * 1000) - 600_000) // 60_000 * 60_000


def make_settings(broker: TansuBroker, prefix: str) -> Settings:
    s = load_settings(
        kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix, topic_partitions=4,
        window_sizes_seconds=[SIZE_S], allowed_lateness_seconds=2,
        idle_close_seconds=3600,  # no wall-clock closes: runs must be comparable
    )
    ensure_topics(s, broker.bootstrap_servers)
    return s


def produce(s: Settings, pause: float = 0.0) -> int:
    """The same deterministic input every time: 12 tenants, out-of-order samples."""
    sim = VmSimulator(tenants=12, vms_per_tenant=2, interval_ms=1_000, seed=5)
    pub = EnvelopePublisher(str(s.kafka_bootstrap_servers), s.topic(topics.SOURCE_TOPICS["vm"]),
                            source="vm")
    start = START_MS
    n = 0
    for batch in sim.run(start, BATCHES, disorder=0.3):
        pub.send(batch)
        n += len(batch)
        if pause:
            pub.flush()
            time.sleep(pause)
    pub.send_watermark(start + (BATCHES + 2) * 1_000 + SIZE_S * 1000 + 2_000, pub.partitions())
    pub.flush()
    return n


def windows(s: Settings, expect: int | None = None, timeout: float = 90,
            settle: float = 3.0) -> dict[str, Any]:
    """Read usage.windows until ``expect`` ids were seen and nothing new came for ``settle``
    seconds; every window id must always carry the same result."""
    c = Consumer({"bootstrap.servers": s.kafka_bootstrap_servers, "group.id": "reader",
                  "enable.auto.commit": False})
    name = s.topic(topics.WINDOWS)
    c.assign([TopicPartition(name, p, 0) for p in range(s.topic_partitions)])
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msgs = c.consume(500, timeout=0.5)
            if msgs:
                idle_since = time.monotonic()
            for m in msgs:
                if m.error():
                    continue
                w = window_codec().decode(m.value())
                prev = out.setdefault(w["window_id"], w)
                assert prev == w, f"window {w['window_id']} emitted with two different results"
            if expect is not None and len(out) >= expect and time.monotonic() - idle_since >= settle:
                break
            if expect is None and out and time.monotonic() - idle_since > 8:
                break
    finally:
        c.close()
    return out


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Readable differences between two window sets (field by field)."""
    out = [f"missing {k}" for k in want.keys() - got.keys()]
    out += [f"extra {k}" for k in got.keys() - want.keys()]
    for k in want.keys() & got.keys():
        for field, value in want[k].items():
            if got[k][field] != value:
                out.append(f"{k} {field}: {got[k][field]!r} != {value!r}")
    return out


@pytest.fixture(scope="module")
def baseline(broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Closed windows of one uninterrupted worker."""
    s = make_settings(broker, "base.")
    produce(s)
    w = WorkerProcess(s, tmp_path_factory.mktemp("base")).start()
    try:
        result = windows(s)
    finally:
        w.stop()
    assert len(result) >= 12 * (BATCHES // SIZE_S)
    return result


def test_sigkill_and_restart_gives_the_uninterrupted_windows(
        broker: TansuBroker, baseline: dict[str, Any], tmp_path: Path) -> None:
    s = make_settings(broker, "kill.")
    w = WorkerProcess(s, tmp_path).start()
    feeder = threading.Thread(target=produce, args=(s, 0.4))
    feeder.start()
    # kill as soon as a third of the windows are out, while input is still arriving
    seen = windows(s, expect=len(baseline) // 3, timeout=60, settle=0)
    assert feeder.is_alive(), "input finished before the kill: the test would prove nothing"
    w.kill()
    assert len(seen) < len(baseline)
    w.start()
    feeder.join()
    try:
        result = windows(s, expect=len(baseline))
    finally:
        w.stop()
    diffs = differences(result, baseline)
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs)
    assert w.log_path.read_text().count("Worker ready") >= 2  # the restarted worker did the rest


def test_two_workers_in_one_group_give_one_workers_windows(
        broker: TansuBroker, baseline: dict[str, Any], tmp_path: Path) -> None:
    s = make_settings(broker, "pair.")
    a = WorkerProcess(s, tmp_path, "a").start()
    b = WorkerProcess(s, tmp_path, "b").start()
    try:
        time.sleep(8)  # let both join, so partitions are shared
        produce(s, pause=0.05)
        result = windows(s, expect=len(baseline))
        assert a.alive() and b.alive()
    finally:
        a.stop()
        b.stop()
    diffs = differences(result, baseline)
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs)
    logs = a.log_path.read_text() + b.log_path.read_text()
    assert "windows" in logs
