"""The agents' output producer (streams/output.py) on the real broker: acknowledged sends,
the partition aiokafka would pick for a key, order within a partition, a full local queue
waited out, failures as OutputError, and close delivering what is queued."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from metering.embedded import TansuBroker, free_port
from metering.errors import MeteringError
from streams.output import KafkaOutput, OutputError

PARTITIONS = 4


def _topic(broker: TansuBroker, partitions: int = PARTITIONS) -> str:
    name = f"out-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers, "log_level": 0})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
    return name


def _read_all(broker: TansuBroker, topic: str, count: int, partitions: int = PARTITIONS,
              timeout_s: float = 30) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False, "log_level": 0})
    # assigned, not subscribed: no group join to wait for
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            for m in consumer.consume(500, 1.0):
                assert m.error() is None, m.error()
                got.append(m)
    finally:
        consumer.close()
    return got


async def _send_all(output: KafkaOutput, topic: str, messages: list[tuple[bytes | None, bytes]],
                    partition: int | None = None) -> None:
    futs = [await output.send(topic, key, value, partition) for key, value in messages]
    await asyncio.gather(*futs)


def test_an_acknowledged_send_is_on_the_partition_aiokafka_picks_for_its_key(broker: TansuBroker) -> None:
    topic = _topic(broker)
    output = KafkaOutput(broker.bootstrap_servers)
    tenants = [f"tenant-{i}".encode() for i in range(40)]
    try:
        asyncio.run(_send_all(output, topic, [(t, b"usage of " + t) for t in tenants]))
    finally:
        assert output.close() == 0
    got = _read_all(broker, topic, len(tenants))
    assert sorted(m.value() for m in got) == sorted(b"usage of " + t for t in tenants)
    # the Java client's partitioner, as aiokafka's default: Faust's producer put a tenant on
    # the same partition, and the normalizer's watermark marks rely on it
    for m in got:
        assert m.partition() == (murmur2(m.key()) & 0x7FFFFFFF) % PARTITIONS, m.key()
    assert len({m.partition() for m in got}) > 1


def test_sends_to_one_partition_keep_their_order(broker: TansuBroker) -> None:
    topic = _topic(broker, 1)
    output = KafkaOutput(broker.bootstrap_servers)
    values = [b"%06d" % i for i in range(3000)]
    try:
        asyncio.run(_send_all(output, topic, [(b"tenant-a", v) for v in values]))
    finally:
        output.close()
    assert [m.value() for m in _read_all(broker, topic, len(values), 1)] == values


def test_an_explicit_partition_is_kept(broker: TansuBroker) -> None:
    topic = _topic(broker)
    output = KafkaOutput(broker.bootstrap_servers)
    try:
        asyncio.run(_send_all(output, topic, [(None, b"mark-%d" % p) for p in range(PARTITIONS)]))
        asyncio.run(_send_all(output, topic, [(b"tenant-x", b"on 3")], partition=3))
    finally:
        output.close()
    got = {m.value(): m.partition() for m in _read_all(broker, topic, PARTITIONS + 1)}
    assert got[b"on 3"] == 3


def test_a_full_local_queue_is_waited_out_and_nothing_is_lost(broker: TansuBroker) -> None:
    topic = _topic(broker, 1)
    # room for two messages: most sends find the queue full and wait for deliveries
    output = KafkaOutput(broker.bootstrap_servers, {"queue.buffering.max.messages": 2})
    values = [b"m%04d" % i for i in range(200)]
    try:
        asyncio.run(_send_all(output, topic, [(None, v) for v in values]))
    finally:
        output.close()
    assert [m.value() for m in _read_all(broker, topic, len(values), 1)] == values


def test_a_message_the_producer_refuses_fails_the_send_with_output_error(broker: TansuBroker) -> None:
    topic = _topic(broker, 1)
    output = KafkaOutput(broker.bootstrap_servers, {"message.max.bytes": 10_000})
    try:
        with pytest.raises(OutputError, match=topic) as caught:
            asyncio.run(_send_all(output, topic, [(None, b"x" * 20_000)]))
        assert isinstance(caught.value, MeteringError)
        assert caught.value.__cause__ is not None  # the librdkafka error, kept
    finally:
        output.close()


def test_an_undeliverable_message_fails_its_future_with_output_error(broker: TansuBroker) -> None:
    # a topic that does not exist (and is not created on use) cannot be delivered to
    output = KafkaOutput(broker.bootstrap_servers, {"message.timeout.ms": 2000,
                                                    "allow.auto.create.topics": False})

    async def run() -> None:
        fut = await output.send(f"missing-{uuid.uuid4().hex[:8]}", None, b"lost?")
        await asyncio.wait_for(fut, 30)

    try:
        with pytest.raises(OutputError, match="delivery failed"):
            asyncio.run(run())
    finally:
        output.close(timeout_s=5)


def test_close_delivers_what_is_queued_and_later_sends_fail(broker: TansuBroker) -> None:
    topic = _topic(broker, 1)
    output = KafkaOutput(broker.bootstrap_servers, {"linger.ms": 500})
    values = [b"q%03d" % i for i in range(50)]

    async def queue_then_close() -> None:
        for v in values:
            await output.send(topic, None, v)  # not awaited: still queued, lingering
        assert await asyncio.to_thread(output.close) == 0
        with pytest.raises(OutputError, match="closed"):
            await output.send(topic, None, b"too late")

    asyncio.run(queue_then_close())
    assert [m.value() for m in _read_all(broker, topic, len(values), 1)] == values


def test_an_output_never_sent_to_opens_no_connection(capfd: pytest.CaptureFixture[str]) -> None:
    # a worker built but not run (tests inspect apps that way) must not leave a producer
    # behind that logs a reconnect failure every second once the broker is gone
    output = KafkaOutput(f"127.0.0.1:{free_port()}")
    time.sleep(1.5)  # librdkafka would have tried (and logged) its first connect by now
    assert output.close() == 0
    assert "Connect to" not in capfd.readouterr().err


def test_close_gives_up_what_cannot_be_delivered_and_fails_its_futures(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # no broker: the message stays queued. close() waits its timeout, then gives it up at
    # once instead of destroying the producer only after message.timeout.ms (5 minutes)
    output = KafkaOutput(f"127.0.0.1:{free_port()}", {"log_level": 3})

    async def queue_then_close() -> None:
        fut = await output.send("nowhere", None, b"x")
        await asyncio.sleep(1.5)
        started = time.monotonic()
        assert await asyncio.to_thread(output.close, 0.5) == 1
        assert time.monotonic() - started < 30
        with pytest.raises(OutputError, match="delivery failed"):
            await asyncio.wait_for(fut, 5)

    asyncio.run(queue_then_close())
    # the control for the test above: an output that sends does try to connect, and the
    # refused connection shows on stderr
    assert "Connect to" in capfd.readouterr().err
