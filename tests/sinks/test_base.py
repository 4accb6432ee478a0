"""The batching base (sinks/base.py) on the real broker, with a small in-memory sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from metering.config import Settings
from schemas import dead_letter_codec, window_codec
from sinks.base import Batch, BatchingSink
from sinks.errors import BackpressureError, SinkError


class ListSink(BatchingSink):
    """Keeps what it was given; fails on demand; logs the order of write and side effects."""

    name = "list-sink"

    def __init__(self, fail: list[Exception], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail = fail
        self.events: list[tuple[str, Any]] = []
        self.rows: list[tuple[int, int]] = []

    def write(self, batch: Batch) -> None:
        if self.fail:
            self.events.append(("failed", batch.first_offset))
            raise self.fail.pop(0)
        committed = self.consumer.committed([TopicPartition(batch.topic, batch.partition)], timeout=5)
        self.events.append(("write", (batch.first_offset, committed[0].offset)))
        self.rows.extend((r.partition, r.offset) for r in batch.records)

    def after_commit(self, batches: Sequence[Batch]) -> None:
        b = batches[0]
        committed = self.consumer.committed([TopicPartition(b.topic, b.partition)], timeout=5)
        self.events.append(("after_commit", committed[0].offset))


def window(i: int) -> dict[str, Any]:
    from decimal import Decimal
    return {"window_id": f"t|{i}|60000", "tenant_id": "t", "window_start_ms": i, "window_end_ms": i + 1,
            "totals": [], "sample_count": 0, "score": Decimal("0E-9"), "late_samples": 0, "has_gap": False}


def run(settings: Settings, sink: ListSink, until: Any, timeout: float = 60) -> None:
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not until() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sink.stop()
        thread.join(30)
    assert until(), f"not reached in {timeout}s: {sink.events} {sink.stats}"


def make(settings: Settings, fail: list[Exception]) -> ListSink:
    return ListSink(
        fail, topics={settings.topic("usage.windows"): window_codec()},
        bootstrap_servers=str(settings.kafka_bootstrap_servers), group_id=f"{settings.topic_prefix}g",
        dlq_topic=settings.topic("usage.dlq"), batch_size=100, flush_seconds=0.2,
        consumer_config={"session.timeout.ms": 6000},
    )


def produce(settings: Settings, n: int, garbage_at: int | None = None) -> None:
    p = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for i in range(n):
        value = b"\x07not avro" if i == garbage_at else window_codec().encode(window(i))
        p.produce(settings.topic("usage.windows"), value, partition=0)
    p.flush(10)


def test_persist_then_commit_then_side_effects(settings: Settings) -> None:
    produce(settings, 5)
    sink = make(settings, [])
    run(settings, sink, lambda: len(sink.rows) == 5 and any(e[0] == "after_commit" for e in sink.events))
    first_write = next(e for e in sink.events if e[0] == "write")
    assert first_write[1][1] < 0  # nothing committed while persisting
    after = next(e for e in sink.events if e[0] == "after_commit")
    assert after[1] == 5  # side effects run once the offsets are committed
    assert sink.rows == [(0, i) for i in range(5)]


def test_backpressure_and_errors_are_retried_never_skipped(settings: Settings) -> None:
    produce(settings, 4)
    sink = make(settings, [BackpressureError("busy", retry_after=0.3), SinkError("rejected")])
    run(settings, sink, lambda: len(sink.rows) == 4)
    assert [e[0] for e in sink.events][:3] == ["failed", "failed", "write"]
    assert sink.rows == [(0, i) for i in range(4)]  # once each, in order
    assert sink.stats.backpressure_events == 2


def test_undecodable_input_becomes_a_dead_letter(settings: Settings) -> None:
    produce(settings, 3, garbage_at=1)
    sink = make(settings, [])
    run(settings, sink, lambda: len(sink.rows) == 2 and sink.stats.dead_letters == 1)
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "dlq-reader"})
    c.assign([TopicPartition(settings.topic("usage.dlq"), p, 0) for p in range(settings.topic_partitions)])
    found = []
    deadline = time.monotonic() + 20
    while not found and time.monotonic() < deadline:
        found = [m for m in c.consume(10, timeout=1) if not m.error()]
    c.close()
    dead = dead_letter_codec().decode(found[0].value())
    assert (dead["source_offset"], dead["stage"]) == (1, "list-sink")
    assert "unknown wire format" in dead["reason"] and dead["payload"] == b"\x07not avro"


def test_a_sink_that_never_ran_releases_its_kafka_clients(settings: Settings) -> None:
    sink = make(settings, [])
    sink.close_clients()
    sink.close_clients()  # twice is harmless
    # closed now, not when the object is collected (a live client logs reconnects forever)
    with pytest.raises(RuntimeError, match="Consumer closed"):
        sink.consumer.poll(0)
    with pytest.raises(RuntimeError, match="closed"):
        sink._dlq_producer.produce(sink.dlq_topic, b"x")
