"""Unit tests of streams/agents.py's in-process pieces, and its dead-lettering of a failed
batch on the real broker (the agents themselves run against the real broker in
test_worker_recovery.py and tests/test_end_to_end.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from metering import topics
from metering.config import Settings
from metering.embedded import free_port
from schemas import dead_letter_codec
from streams.agents import Published, RecentlyEncoded, _dead_letter_all
from streams.output import KafkaOutput
from tests.topic_reader import read_all


def _published(envelope_id: str, samples: int) -> Published:
    return Published(envelope_id, None, samples, [], None, None)


def test_a_payload_is_taken_once_and_only_by_equal_bytes() -> None:
    recent = RecentlyEncoded()
    payload = b"H" * 100 + b"middle" + b"T" * 100
    pub = _published("e1", 3)
    recent.put(payload, pub)
    # same length, head and tail, different middle: not the same message
    assert recent.take(b"H" * 100 + b"MIDDLE" + b"T" * 100) is None
    assert recent.take(bytes(bytearray(payload))) is pub  # equal bytes, another object
    assert recent.take(payload) is None  # once
    assert recent.take(None) is None and recent.take(b"") is None


def test_a_colliding_payload_misses_instead_of_taking_the_other() -> None:
    recent = RecentlyEncoded()
    first = b"H" * 100 + b"one" + b"T" * 100
    second = b"H" * 100 + b"two" + b"T" * 100
    recent.put(first, _published("e1", 1))
    recent.put(second, _published("e2", 1))
    assert recent.take(second) is None  # a decode, never the wrong message
    taken = recent.take(first)
    assert taken is not None and taken.envelope_id == "e1"


def test_the_oldest_payloads_are_evicted_beyond_the_bound() -> None:
    recent = RecentlyEncoded(max_records=10)
    payloads = [bytes([i]) * 200 for i in range(4)]
    for i, p in enumerate(payloads):
        recent.put(p, _published(f"e{i}", 4))
    assert recent.take(payloads[0]) is None and recent.take(payloads[1]) is None
    assert [recent.take(p).envelope_id for p in payloads[2:]] == ["e2", "e3"]  # type: ignore[union-attr]


def test_room_waits_for_takes_once_half_full() -> None:
    async def run() -> bool:
        recent = RecentlyEncoded(max_records=10)
        recent.put(b"a" * 200, _published("e1", 6))
        waiter = asyncio.create_task(recent.room(timeout=5.0))
        await asyncio.sleep(0.01)
        blocked = not waiter.done()
        recent.take(b"a" * 200)
        await asyncio.wait_for(waiter, 1.0)
        return blocked

    assert asyncio.run(run())


def _failed_batch(topic: str, n: int) -> list[Any]:
    # the fields of a Faust event a dead letter is made of
    return [SimpleNamespace(message=SimpleNamespace(topic=topic, partition=0, offset=i, key=b"t",
                                                    value=b"payload %d" % i)) for i in range(n)]


def _sender(output: KafkaOutput) -> Any:
    async def send(topic: Any, key: bytes | None, value: bytes, partition: int | None = None) -> Any:
        return await output.send(topic.get_topic_name(), key, value, partition)
    return send


def test_a_failed_batch_is_dead_lettered_and_reported_so(settings: Settings) -> None:
    dlq = settings.topic(topics.DLQ)
    output = KafkaOutput(str(settings.kafka_bootstrap_servers))
    names: Any = SimpleNamespace(dlq=SimpleNamespace(get_topic_name=lambda: dlq))
    try:
        assert asyncio.run(_dead_letter_all(_sender(output), names, _failed_batch("usage.vm", 3),
                                            "normalize")) is True
    finally:
        output.close()
    letters = [dead_letter_codec().decode(m.value()) for m in read_all(settings, topics.DLQ, idle=1.0)]
    assert sorted(d["source_offset"] for d in letters) == [0, 1, 2]
    assert {(d["source_topic"], d["stage"]) for d in letters} == {("usage.vm", "normalize")}
    assert sorted(d["payload"] for d in letters) == [b"payload 0", b"payload 1", b"payload 2"]


def test_a_batch_that_cannot_be_dead_lettered_is_reported_so_it_stays_unacked() -> None:
    # no broker behind the output (a loopback port nothing listens on): the dead letters
    # time out; the normalizer then leaves the batch unacked instead of acking it unbilled
    output = KafkaOutput(f"127.0.0.1:{free_port()}", {"message.timeout.ms": 1000, "log_level": 0})
    names: Any = SimpleNamespace(dlq=SimpleNamespace(get_topic_name=lambda: "usage.dlq"))
    try:
        assert asyncio.run(_dead_letter_all(_sender(output), names, _failed_batch("usage.vm", 2),
                                            "normalize")) is False
    finally:
        output.close(timeout_s=0)
