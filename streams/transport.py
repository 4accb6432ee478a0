"""The stream worker's Kafka transport: Faust's aiokafka transport, fixed for the broker.

Two departures from Faust's own, both found on Tansu (the embedded broker) and harmless on
Apache Kafka:

* **A short fetch wait.** Faust builds its consumer with ``fetch_max_wait_ms=1500`` and
  offers no setting for it. A broker that answers a fetch only once that wait is half over
  (Tansu does: measured 0.75 s from a message's arrival to the fetch answering, with the
  wait at 1500 ms) then stalls the window stage between the normalizer producing
  ``usage.records`` and the window stage seeing it: the worker sat idle a third of the time
  (``python -m bench stream_throughput``: worker CPU 0.71 of a core; 0.98 with 100 ms, and
  1.3 times the samples/s). Apache Kafka answers as soon as data arrives, so there the
  shorter wait only bounds how often an idle consumer asks again (ten fetches a second).
* **Real end offsets for table recovery.** Tansu answers ListOffsets(latest) with the last
  record batch's *base* offset + 1, not the offset after its last record. Faust restores a
  table by reading its changelog up to that answer, so the rest of the last batch was never
  applied: an agent that writes several keys in one batch (the quota agent writes every
  tenant it touched) got them back older than what it had committed its input past, and
  usage counted before a crash was lost (the SIGKILL test's alerts, 3 runs in 7). The
  highwaters recovery asks for are now read off the partitions themselves
  (:func:`read_to_end`), which on Apache Kafka gives back ListOffsets' own answer.

The app selects this transport through its broker URL's scheme (:data:`SCHEME`), which this
module registers with Faust's transport registry when imported.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["FETCH_MAX_WAIT_MS", "PROBE_TIMEOUT_S", "SCHEME", "Transport", "read_to_end"]

#: how long a fetch may wait at the broker for data (Faust's own is 1500)
FETCH_MAX_WAIT_MS = 100
#: how long finding the real end of the partitions recovery reads may take before it fails
PROBE_TIMEOUT_S = 30.0
#: the broker URL scheme of this transport (``metering-kafka://host:port``)
SCHEME = "metering-kafka"


async def read_to_end(
    bootstrap_servers: list[str],
    starts: Mapping[TopicPartition, int],
    *,
    keep: bool = True,
    timeout_s: float = 60.0,
) -> tuple[dict[TopicPartition, list[Any]], dict[TopicPartition, int]]:
    """Read each partition from its start offset to its real end: the messages (none kept
    when ``keep`` is false) and the offset after each partition's last message.

    ListOffsets(latest) may answer short of the end (Tansu: the last batch's base offset
    + 1), so a partition is read until its position has passed that answer *and* a poll
    comes back empty for it (the rest of the batch, which arrives with it). Raises
    TimeoutError when a partition is not read to its end within ``timeout_s``.
    """
    tps = list(starts)
    out: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}
    ends: dict[TopicPartition, int] = {}
    if not tps:
        return out, ends
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    await consumer.start()
    try:
        consumer.assign(tps)
        for tp, offset in starts.items():
            consumer.seek(tp, max(offset, 0))
        reported = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(tps):
            reading = [tp for tp in tps if tp not in ends]
            batch = await consumer.getmany(*reading, timeout_ms=200)
            for tp in reading:
                msgs = batch.get(tp, [])
                if keep:
                    out[tp].extend(msgs)
                pos = await consumer.position(tp)
                if pos >= reported[tp] and not msgs:
                    ends[tp] = pos
            if len(ends) < len(tps) and time.monotonic() > deadline:
                stalled = {f"{tp.topic}[{tp.partition}]": reported[tp] for tp in reading if tp not in ends}
                raise TimeoutError(f"reading to the end stalled after {timeout_s:.0f} s: {stalled} "
                                   "(partition: offset ListOffsets answered)")
        return out, ends
    finally:
        await consumer.stop()


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it builds its fetcher, which comes later
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    async def _highwaters(self, partitions: Iterable[Any]) -> Mapping[Any, int]:
        # recovery's target offsets (only recovery asks): the real ends, see the module doc
        reported = await super()._highwaters(list(partitions))
        if self.consumer.in_transaction:  # last stable offsets: Faust's own answer stands
            return reported
        probe = {tp: hw - 1 for tp, hw in reported.items() if hw}
        if not probe:
            return reported
        transport: Any = self.consumer.transport  # TransportT does not declare default_port
        _, ends = await read_to_end(
            faust_aiokafka.server_list(transport.url, transport.default_port), probe,
            keep=False, timeout_s=PROBE_TIMEOUT_S)
        return {**reported, **ends}


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport whose worker consumer waits at most
    :data:`FETCH_MAX_WAIT_MS` for a fetch and gives table recovery the partitions' real
    end offsets."""

    Consumer = _Consumer


TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
