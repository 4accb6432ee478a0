"""The agents' output producer: librdkafka (confluent-kafka) instead of Faust's aiokafka one.

The window stage's input, ``usage.records``, carries every sample a second time. Written
through Faust's producer, building, compressing and sending those batches ran in Python on
the worker's one busy thread (aiokafka's sender is a task of the event loop): 7 % of the
worker's time under the GIL in a py-spy profile of ``python -m bench stream_throughput``.
librdkafka batches, compresses and sends in threads of its own, without the GIL; what is
left on the event loop is one ``produce`` call and one future per message.

Same guarantees as the Faust producer it replaces for these topics (the project's producer
settings, :func:`metering.kafka.producer_config`): acks from all in-sync replicas, an
idempotent producer (no duplicate and no reordering within a partition on a retry: message
order in ``usage.records`` decides lateness), and the Java client's key partitioner, so a
tenant's records land on the partition aiokafka would pick.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from metering.errors import MeteringError
from metering.kafka import producer_config

__all__ = ["KafkaOutput", "OutputError"]

#: how long a poll of delivery reports blocks in the reporting thread
_POLL_S = 0.05
#: how long a full local queue is waited on before ``produce`` is tried again
_QUEUE_FULL_WAIT_S = 0.005
#: the delivery errors of messages ``close`` gave up
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class OutputError(MeteringError):
    """A message the output producer could not deliver; the message says why."""


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(OutputError(f"delivery failed: {err}"))


class KafkaOutput:
    """Produce from the event loop; each send's future resolves when Kafka acknowledged it.

    Delivery reports are served by a thread of this class (``poll``), which hands each
    result to the loop that sent the message.
    """

    def __init__(self, bootstrap_servers: str, config: dict[str, Any] | None = None) -> None:
        self._conf = producer_config(bootstrap_servers, {
            # no linger: an agent waits for the acknowledgement of its batch's last message
            # before it acks its input, so a linger would add its whole length to every
            # batch (bench stream_throughput, three alternated rounds each: stage/raw 0.55,
            # 0.54, 0.53 without, 0.56, 0.47, 0.52 with 5 ms); envelopes are tens of KB, and
            # librdkafka still batches what queues while a request is in flight
            "linger.ms": 0,
            "compression.type": "lz4",
            **(config or {}),
        })
        # made at the first send: a worker built but never run (or only inspected) opens no
        # connection, and leaves none behind to log reconnect failures once its broker is gone
        self._producer: Producer | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # messages given up at close; counted from their delivery reports, since what
        # flush() returns also counts librdkafka's own queued events (a connection error)
        self._given_up = 0
        self._given_up_lock = threading.Lock()

    def _start(self) -> Producer:
        try:
            producer = self._producer = Producer(self._conf)
        except KafkaException as exc:
            raise OutputError(f"cannot create the output producer: {exc}") from exc
        self._thread = threading.Thread(target=self._serve_reports, args=(producer,),
                                        name="kafka-output", daemon=True)
        self._thread.start()
        return producer

    def _serve_reports(self, producer: Producer) -> None:
        while not self._stopping.is_set():
            producer.poll(_POLL_S)

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   partition: int | None = None) -> asyncio.Future[None]:
        """Queue one message; returns a future that resolves once Kafka acknowledged it
        (or fails with :class:`OutputError`)."""
        if self._closed:
            raise OutputError("the output producer is closed")
        producer = self._producer or self._start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def report(err: KafkaError | None, _msg: Any) -> None:
            # runs in the thread that polled; an exception here would end that thread
            if err is not None and err.code() in _PURGED:
                with self._given_up_lock:  # close() and the report thread both poll
                    self._given_up += 1
            try:
                loop.call_soon_threadsafe(_settle, fut, err)
            except RuntimeError:  # the loop is closed: nobody waits for this message
                pass

        kwargs: dict[str, Any] = {"on_delivery": report}
        if key is not None:
            kwargs["key"] = key
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, value, **kwargs)
                return fut
            except BufferError:
                # the local queue is full: Kafka is slower than the agents right now
                await asyncio.sleep(_QUEUE_FULL_WAIT_S)
            except KafkaException as exc:
                raise OutputError(f"cannot produce to {topic}: {exc}") from exc

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is queued (at most ``timeout_s``; what is left then is given up, its
        futures failed), then release the producer (its connections and threads: kept past
        its broker, it would log a reconnect failure every second); returns how many messages
        it gave up. Later sends fail."""
        if self._closed:
            return 0
        self._closed = True
        producer = self._producer
        if producer is None:
            return 0
        if producer.flush(timeout_s):
            # undeliverable for now: give them up (their futures fail), or destroying the
            # producer would wait out message.timeout.ms (5 minutes) for them
            producer.purge()
            producer.flush(1.0)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        producer.close()
        with self._given_up_lock:
            return self._given_up
