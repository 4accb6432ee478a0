"""The one batching base every sink subclasses.

A sink consumes topics with confluent-kafka, decodes each message with the topic's codec,
groups records per topic-partition and flushes when a batch is full or old enough.

Flush order, always:
  1. persist: ``write(batch)`` for each topic-partition batch, in offset order;
     undecodable input is persisted too, as a dead letter with its reason;
  2. commit the consumed offsets (synchronously);
  3. side effects: ``after_commit(batches)``.

``write`` blocks the poll loop, so one batch must finish within librdkafka's
``max.poll.interval.ms`` (300 s unless a sink raises it).

A crash between 1 and 2 re-delivers the batch, so ``write`` must be idempotent (the
ClickHouse sink resumes from the offsets it stored; the webhook sink reuses message ids).
Overload is signalled with :class:`BackpressureError`: the base pauses the partitions, keeps
the consumer in its group and retries the same batch after ``retry_after`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, Message, Producer, TopicPartition

from metering.kafka import producer_config
from schemas import AvroCodec, CodecError, encode_dead_letter
from sinks.errors import BackpressureError, SinkError, SinkUnavailableError

__all__ = ["Batch", "BatchingSink", "SinkRecord", "SinkStats"]

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(slots=True)
class SinkRecord:
    """One decoded Kafka message and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    timestamp_ms: int


@dataclass(slots=True)
class Batch:
    """Contiguous records of one topic-partition, in offset order."""

    topic: str
    partition: int
    records: list[SinkRecord] = field(default_factory=list)

    @property
    def first_offset(self) -> int:
        """Offset of the first record."""
        return self.records[0].offset

    @property
    def last_offset(self) -> int:
        """Offset of the last record."""
        return self.records[-1].offset


@dataclass
class SinkStats:
    """Counters a health check or `/stats` can show; a stalled sink is visible here."""

    records_written: int = 0
    batches_written: int = 0
    dead_letters: int = 0
    backpressure_events: int = 0
    last_flush_monotonic: float = 0.0
    last_error: str = ""


class BatchingSink(ABC):
    """Consume, batch per topic-partition, and flush in the documented order."""

    #: stage name written into dead letters
    name = "sink"

    def __init__(
        self,
        *,
        topics: Mapping[str, AvroCodec],
        bootstrap_servers: str,
        group_id: str,
        dlq_topic: str,
        batch_size: int = 10_000,
        flush_seconds: float = 1.0,
        consumer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.codecs = dict(topics)
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.dlq_topic = dlq_topic
        self.stats = SinkStats()
        self._pending: dict[TP, Batch] = {}
        self._pending_offsets: dict[TP, int] = {}  # next offset to commit, dead letters included
        self._dead: list[bytes] = []
        self._oldest_pending: float | None = None
        self._retry_at: float | None = None
        self._paused: list[TopicPartition] = []
        self._stop = threading.Event()
        self._last_activity = time.monotonic()
        self._failures = 0
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            # librdkafka logs disconnects at info level; warnings and errors still show
            "log_level": 4,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # Apache Kafka's smallest allowed session (group.min.session.timeout.ms): a killed
            # sink's partitions move on sooner, and Tansu completes a join after about half
            # the session timeout (3 s instead of 5 s at every sink start)
            "session.timeout.ms": 6_000,
            "heartbeat.interval.ms": 1_000,
        }
        conf.update(consumer_config or {})
        self.consumer = Consumer(conf)
        self._clients_closed = False
        # dead letters carry no key, so the shared partitioner changes nothing here
        self._dlq_producer = Producer(producer_config(bootstrap_servers))

    # ---- what subclasses provide -------------------------------------------------------

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Persist one batch idempotently; raise BackpressureError or SinkUnavailableError."""

    def resume_offsets(self, partitions: Sequence[TP]) -> Mapping[TP, int]:
        """Where to start reading each newly assigned partition (default: the committed offset)."""
        return {}

    def after_commit(self, batches: Sequence[Batch]) -> None:
        """Side effects that must only happen once the batches are persisted and committed."""

    def close(self) -> None:
        """Release the sink's own resources (connections); the Kafka clients are closed by
        run(), or by :meth:`close_clients` for a sink that never ran."""

    # ---- the loop -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to flush what it can and return."""
        self._stop.set()

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`stop` was called; long waits in ``write`` should wait on it."""
        return self._stop

    def run(self, *, idle_exit_seconds: float | None = None) -> None:
        """Consume and flush until :meth:`stop`, or until idle this long with nothing pending."""
        self.consumer.subscribe(
            list(self.codecs), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last_message = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._retry_at is not None:
                    self.consumer.poll(0.1)  # paused: keeps group membership alive
                    if time.monotonic() >= self._retry_at:
                        self._flush()
                    continue
                messages = self.consumer.consume(num_messages=self.batch_size, timeout=0.2)
                if messages:
                    last_message = time.monotonic()
                    for msg in messages:
                        self._add(msg)
                if self._due():
                    self._flush()
                if (
                    idle_exit_seconds is not None
                    and not self._pending
                    and not self._dead
                    # a group join is not idleness: count from the last assignment too
                    and time.monotonic() - max(last_message, self._last_activity) > idle_exit_seconds
                ):
                    break
            if self._retry_at is None:
                self._flush()
        finally:
            self.close_clients()
            self.close()

    def close_clients(self) -> None:
        """Leave the group and close the Kafka consumer and the dead-letter producer (after
        a flush); :meth:`run` does this when it returns. Safe to call more than once.

        Released now, not when the sink object is collected: a client kept alive past its
        broker logs a reconnect failure every second.
        """
        if self._clients_closed:
            return
        self._clients_closed = True
        self.consumer.close()
        self._dlq_producer.flush(10)
        self._dlq_producer.close()

    def _due(self) -> bool:
        if not self._pending and not self._dead:
            return False
        if any(len(b.records) >= self.batch_size for b in self._pending.values()):
            return True
        return (
            self._oldest_pending is not None
            and time.monotonic() - self._oldest_pending >= self.flush_seconds
        )

    def _add(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("%s: consumer error: %s", self.name, err)
            return
        # a message without an error always has these
        topic, partition, offset = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
        tp = (topic, partition)
        if self._oldest_pending is None:
            self._oldest_pending = time.monotonic()
        self._pending_offsets[tp] = offset + 1
        raw = msg.value() or b""
        try:
            value = self.codecs[topic].decode(raw)
        except CodecError as exc:
            self._dead_letter(msg, str(exc))
            return
        batch = self._pending.get(tp)
        if batch is None:
            batch = self._pending[tp] = Batch(topic, partition)
        batch.records.append(
            SinkRecord(topic, partition, offset, msg.key(), value, msg.timestamp()[1])
        )

    def _dead_letter(self, msg: Message, reason: str) -> None:
        log.error("%s: dead letter %s[%d]@%d: %s", self.name, msg.topic(), msg.partition(),
                  msg.offset(), reason)
        self._dead.append(
            encode_dead_letter(
                topic=str(msg.topic()),
                partition=int(msg.partition() or 0),
                offset=int(msg.offset() or 0),
                stage=self.name,
                reason=reason,
                key=msg.key(),
                payload=msg.value(),
            )
        )

    def _flush(self) -> None:
        written: list[Batch] = []
        try:
            for tp in sorted(self._pending):
                batch = self._pending[tp]
                self.write(batch)
                written.append(batch)
                del self._pending[tp]
                self.stats.records_written += len(batch.records)
                self.stats.batches_written += 1
            self._flush_dead_letters()
        except SinkError as exc:
            # overload and outages say when to retry; any other sink error (a rejected
            # insert, say) is retried with a growing delay and shown in stats, never
            # skipped: billing data is not dropped to keep a sink moving
            if isinstance(exc, BackpressureError):
                retry_after = exc.retry_after
            elif isinstance(exc, SinkUnavailableError):
                retry_after = 1.0
            else:
                self._failures += 1
                retry_after = min(60.0, 0.5 * 2 ** min(self._failures, 7))
                log.error("%s: write failed (%d in a row), retrying in %.1fs: %s",
                          self.name, self._failures, retry_after, exc)
            self.stats.backpressure_events += 1
            self.stats.last_error = str(exc)
            log.warning("%s: backing off %.1fs: %s", self.name, retry_after, exc)
            self._commit(written, partial=True)
            self._pause(retry_after)
            return
        self._failures = 0
        self._commit(written, partial=False)
        self._oldest_pending = None
        self.stats.last_flush_monotonic = time.monotonic()
        if self._retry_at is not None:
            self._resume()
        if written:
            self.after_commit(written)

    def _flush_dead_letters(self) -> None:
        if not self._dead:
            return
        for payload in self._dead:
            self._dlq_producer.produce(self.dlq_topic, payload)
        if self._dlq_producer.flush(30) > 0:
            raise SinkUnavailableError("dead-letter topic did not acknowledge in 30 s")
        self.stats.dead_letters += len(self._dead)
        self._dead.clear()

    def _commit(self, written: Sequence[Batch], *, partial: bool) -> None:
        if partial:
            offsets = {(b.topic, b.partition): b.last_offset + 1 for b in written}
        else:
            offsets = dict(self._pending_offsets)
            self._pending_offsets.clear()
        if not offsets:
            return
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except Exception as exc:  # a rebalance in flight: writes are idempotent, so re-delivery is safe
            log.warning("%s: offset commit failed (will be re-delivered): %s", self.name, exc)

    def _pause(self, retry_after: float) -> None:
        self._retry_at = time.monotonic() + max(retry_after, 0.05)
        if not self._paused:
            self._paused = self.consumer.assignment()
            if self._paused:
                self.consumer.pause(self._paused)

    def _resume(self) -> None:
        self._retry_at = None
        if self._paused:
            self.consumer.resume(self._paused)
            self._paused = []

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._last_activity = time.monotonic()
        try:
            start = self.resume_offsets([(tp.topic, tp.partition) for tp in partitions])
        except SinkError as exc:
            # cannot know where the destination stands: better stop than double-write
            log.error("%s: cannot read resume offsets: %s", self.name, exc)
            raise
        for tp in partitions:
            nxt = start.get((tp.topic, tp.partition))
            tp.offset = nxt if nxt is not None else OFFSET_INVALID
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # uncommitted work is dropped; the next owner re-reads it from the committed offset
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._pending.pop(key, None)
            self._pending_offsets.pop(key, None)
        if not self._pending:
            self._oldest_pending = None
