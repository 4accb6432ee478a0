"""Read usage records back from a real topic, decoded with the envelope codec."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from schemas import envelope_codec

__all__ = ["consume"]


def consume(bootstrap: str, topic: str, n: int, timeout: float = 20.0,
            grace: float = 0.7) -> list[tuple[bytes, dict[str, Any]]]:
    """(key, record) pairs from every partition of ``topic`` from the start, until ``n``
    arrived, then ``grace`` seconds more so that extra records would show."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "log_level": 0,
                         "enable.auto.commit": False})
    md = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    codec = envelope_codec()
    out: list[tuple[bytes, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    until: float | None = None
    try:
        while time.monotonic() < deadline:
            if len(out) >= n and until is None:
                until = time.monotonic() + grace
            if until is not None and time.monotonic() > until:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            env = codec.decode(msg.value() or b"")
            out.extend((msg.key() or b"", r) for r in env["records"])
    finally:
        consumer.close()
    return out
