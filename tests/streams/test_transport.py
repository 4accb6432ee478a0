"""The worker's Kafka transport (streams/transport.py): the short fetch wait, and table
recovery that reads changelogs to their real end on the real broker."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from metering.config import Settings, load_settings
from metering.embedded import TansuBroker
from streams.app import create_app
from streams.quota_agent import QUOTA_TABLE
from streams.transport import FETCH_MAX_WAIT_MS, Transport, read_to_end
from streams.worker import build_worker
from tests.workers import WorkerProcess, get_json


def test_the_app_uses_the_transport_whose_consumer_fetches_with_the_short_wait() -> None:
    app = create_app(load_settings(kafka_bootstrap_servers="127.0.0.1:9"), "127.0.0.1:9")
    assert isinstance(app.transport, Transport)

    async def build() -> int:
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
        try:
            # the attribute aiokafka hands to its fetcher on start(): a rename upstream fails here
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()  # never started: releases the client it made

    assert FETCH_MAX_WAIT_MS < 1500  # Faust's own wait, which the broker may hold in full
    assert asyncio.run(build()) == FETCH_MAX_WAIT_MS


async def _produce_batches(bootstrap: str, topic: str, *sizes: int) -> list[int]:
    """Produce one record batch per size to partition 0 (lingering, so each is one batch);
    the offsets given."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=200)
    await producer.start()
    try:
        offsets = []
        for n in sizes:
            futs = [await producer.send(topic, b"v%d" % i, partition=0) for i in range(n)]
            offsets += [md.offset for md in await asyncio.gather(*futs)]
        return offsets
    finally:
        await producer.stop()


async def _list_offsets_end(bootstrap: str, tp: TopicPartition) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_read_to_end_reads_past_the_short_end_offset_the_broker_reports(
        broker: TansuBroker, topic_prefix: str) -> None:
    bs = broker.bootstrap_servers
    topic = f"{topic_prefix}batches"
    tp = TopicPartition(topic, 0)
    assert asyncio.run(_produce_batches(bs, topic, 5, 3)) == list(range(8))
    reported = asyncio.run(_list_offsets_end(bs, tp))
    assert reported < 8, "the broker now reports the real end: this test no longer shows the quirk"

    async def read(start: int, keep: bool = True) -> tuple[list[int], int]:
        msgs, ends = await read_to_end([bs], {tp: start}, keep=keep, timeout_s=20)
        return [m.offset for m in msgs[tp]], ends[tp]

    assert asyncio.run(read(0)) == (list(range(8)), 8)
    assert asyncio.run(read(reported - 1, keep=False)) == ([], 8)
    assert asyncio.run(read(7)) == ([7], 8)
    assert asyncio.run(read(8)) == ([], 8)


@pytest.mark.integration
def test_a_restarted_worker_restores_every_key_of_the_changelogs_last_batch(
        settings: Settings, tmp_path: Path) -> None:
    """Tenant states written as one record batch, as the quota agent writes a batch's states:
    Faust used to stop its recovery at the broker's short end offset, after the first."""
    s = settings
    bs = str(s.kafka_bootstrap_servers)
    app, _ = build_worker(s, bs)
    changelog = app.tables[QUOTA_TABLE].changelog_topic.get_topic_name()
    admin = AdminClient({"bootstrap.servers": bs})
    for fut in admin.create_topics([NewTopic(changelog, num_partitions=s.topic_partitions,
                                             replication_factor=1)]).values():
        fut.result(30)
    tenants = [f"tenant-{i}" for i in range(5)]
    ends = {t: 1_715_328_000_000 + 60_000 * (i + 1) for i, t in enumerate(tenants)}

    async def write_states() -> list[int]:
        producer = AIOKafkaProducer(bootstrap_servers=bs, linger_ms=200)
        await producer.start()
        try:
            futs = [await producer.send(changelog, key=t.encode(), partition=0, value=orjson.dumps({
                "hw": {"60000": ends[t]},
                "usage": {"cpu_time_nanos|day": {"start": 1_715_299_200_000, "used": f"{i + 1}00"}},
                "fired": [], "not_quotable": {}})) for i, t in enumerate(tenants)]
            return [md.offset for md in await asyncio.gather(*futs)]
        finally:
            await producer.stop()

    assert asyncio.run(write_states()) == list(range(len(tenants)))
    assert asyncio.run(_list_offsets_end(bs, TopicPartition(changelog, 0))) < len(tenants), \
        "the broker now reports the real end: this test no longer shows the quirk"

    worker = WorkerProcess(s, tmp_path).start()
    try:
        deadline = time.monotonic() + 60
        while True:
            got = {t: get_json(worker.web_port, f"/tenants/{t}/quota")["last_window_end_ms"] for t in tenants}
            if got == ends or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == ends, f"restored: {json.dumps(got)}\n{worker.log_path.read_text()[-3000:]}"
        used = get_json(worker.web_port, f"/tenants/{tenants[-1]}/quota")["quotas"][0]["used"]
        assert used == "500.000000000"
    finally:
        worker.stop()
