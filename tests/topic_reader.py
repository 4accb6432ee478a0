"""Read a pipeline topic back whole, from the start of every partition, until it goes quiet."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from metering import topics
from metering.config import Settings
from streams.quotas import alert_codec

__all__ = ["alerts", "read_all"]


def read_all(s: Settings, name: str, idle: float = 1.5) -> list[Any]:
    """Every message of topic ``name`` (unprefixed), read until none came for ``idle`` seconds."""
    c = Consumer({"bootstrap.servers": s.kafka_bootstrap_servers, "group.id": "reader",
                  "enable.auto.commit": False, "log_level": 4})
    c.assign([TopicPartition(s.topic(name), p, 0) for p in range(s.topic_partitions)])
    out: list[Any] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle:
            for m in c.consume(500, timeout=0.3):
                if not m.error():
                    out.append(m)
                    last = time.monotonic()
    finally:
        c.close()
    return out


def alerts(s: Settings, idle: float = 1.5) -> list[dict[str, Any]]:
    """Every quota alert on ``quota.alerts``, decoded, in partition order."""
    return [alert_codec().decode(m.value()) for m in read_all(s, topics.ALERTS, idle)]
