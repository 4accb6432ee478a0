"""Publish batches of usage records to Kafka as UsageEnvelope messages keyed by tenant.

Every producer (simulators, the VM gateway, the client library) goes through this module,
so idempotence, acks=all and batching are set in one place.
"""

from __future__ import annotations

import decimal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from metering.kafka import producer_config
from producers.errors import PublishError
from schemas import DECIMAL_QUANTUM, envelope_codec

__all__ = ["EnvelopePublisher", "usage_record"]

# decimal(38, 9) needs 38 digits; the default context has 28
_CTX = decimal.Context(prec=40)


def usage_record(
    *,
    event_id: str,
    tenant_id: str,
    source: str,
    resource_id: str,
    metric: str,
    value: Decimal | int | str,
    event_time_ms: int,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A canonical usage record dict; value becomes an exact decimal(38, 9)."""
    return {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "source": source,
        "resource_id": resource_id,
        "metric": metric,
        "value": Decimal(value).quantize(DECIMAL_QUANTUM, context=_CTX),
        "event_time_ms": int(event_time_ms),
        "metadata": dict(metadata or {}),
    }


class EnvelopePublisher:
    """Group records per tenant into envelopes and publish them with acks=all, idempotently."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        source: str,
        producer_name: str = "metering",
        max_records_per_envelope: int = 500,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.source = source
        self.producer_name = producer_name
        self.max_records = max_records_per_envelope
        self._producer = Producer(producer_config(
            bootstrap_servers, {"linger.ms": 5, "compression.type": "lz4", **(config or {})}))
        self._closed = False
        self._codec = envelope_codec()
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(
        self, records: Iterable[Mapping[str, Any]], *, watermark_ms: int | None = None
    ) -> int:
        """Queue records (grouped per tenant into envelopes); returns the envelopes queued."""
        by_tenant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in records:
            by_tenant[r["tenant_id"]].append(r)
        sent = 0
        for tenant, recs in by_tenant.items():
            for i in range(0, len(recs), self.max_records):
                self._produce(tenant, recs[i : i + self.max_records], watermark_ms)
                sent += 1
        return sent

    def send_watermark(self, watermark_ms: int, partitions: Iterable[int]) -> None:
        """Send an empty envelope carrying only a watermark to each partition.

        Lets a bounded run (a demo, a test, a replay) close its last windows without waiting
        for the worker's idle timeout.
        """
        for p in partitions:
            payload = self._codec.encode(self._envelope([], watermark_ms))
            self._call(lambda payload=payload, p=p: self._producer.produce(
                self.topic, payload, partition=p, on_delivery=self._on_delivery))

    def _envelope(self, recs: list[Mapping[str, Any]], watermark_ms: int | None) -> dict[str, Any]:
        return {
            "envelope_id": uuid.uuid4().hex,
            "source": self.source,
            "producer": self.producer_name,
            "sent_at_ms": int(time.time() * 1000),
            "watermark_ms": watermark_ms,
            "records": recs,
        }

    def _produce(self, tenant: str, recs: list[Mapping[str, Any]], wm: int | None) -> None:
        payload = self._codec.encode(self._envelope(recs, wm))
        self._call(lambda: self._producer.produce(
            self.topic, payload, key=tenant.encode(), on_delivery=self._on_delivery))

    def _call(self, fn: Any) -> None:
        if self._closed:
            raise PublishError(f"the publisher to {self.topic} is closed")
        while True:
            try:
                fn()
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
            except KafkaException as exc:
                raise PublishError(str(exc)) from exc
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until Kafka acknowledged everything queued; raise PublishError otherwise."""
        left = self._producer.flush(timeout)
        if left:
            raise PublishError(f"{left} envelopes not acknowledged within {timeout}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise PublishError(f"{len(errors)} envelopes rejected: {errors[0]}")

    def close(self) -> None:
        """Release the Kafka producer (its connections and threads) now, not when the object
        is collected: a producer kept past its broker logs a reconnect failure every second.
        :meth:`flush` first; nothing can be sent afterwards. Idempotent."""
        if not self._closed:
            self._closed = True
            self._producer.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def partitions(self, timeout: float = 10.0) -> list[int]:
        """The partition ids of the target topic."""
        md = self._producer.list_topics(self.topic, timeout=timeout)
        return sorted(md.topics[self.topic].partitions)
