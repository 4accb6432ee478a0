"""Topic names and their creation with explicit partition counts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from metering.config import Settings
from metering.errors import MeteringError

__all__ = [
    "ALERTS",
    "ALL_TOPICS",
    "DELIVERIES",
    "DLQ",
    "LATE",
    "LIMITS",
    "RECORDS",
    "SOURCE_TOPICS",
    "TopicSpec",
    "WINDOWS",
    "ensure_topics",
]

#: raw source topics, one per source family; values are UsageEnvelope batches keyed by tenant
SOURCE_TOPICS = {
    "vm": "usage.vm",
    "containers": "usage.containers",
    "redis-enterprise": "usage.redis",
    "client": "usage.client",
}
RECORDS = "usage.records"  # normalized UsageEnvelope batches, key = tenant
WINDOWS = "usage.windows"  # WindowResult, key = tenant
LATE = "usage.late"  # UsageEnvelope of records later than the allowed lateness
DLQ = "usage.dlq"  # DeadLetter
ALERTS = "quota.alerts"  # QuotaAlert, key = tenant, partition = the tenant's usage.windows partition
DELIVERIES = "webhook.deliveries"  # WebhookDelivery, key = tenant: one per webhook delivery outcome
LIMITS = "quota.limits"  # QuotaLimit, key = tenant|metric|period; compacted (a tombstone deletes)


@dataclass(frozen=True)
class TopicSpec:
    """A topic the pipeline needs."""

    name: str
    compacted: bool = False


ALL_TOPICS = [TopicSpec(t) for t in SOURCE_TOPICS.values()] + [
    TopicSpec(RECORDS),
    TopicSpec(WINDOWS),
    TopicSpec(LATE),
    TopicSpec(DLQ),
    TopicSpec(ALERTS),
    TopicSpec(DELIVERIES),
    TopicSpec(LIMITS, compacted=True),
]


def ensure_topics(
    settings: Settings, bootstrap_servers: str, timeout: float = 30.0, only: Iterable[str] | None = None
) -> None:
    """Create every topic the pipeline uses (or the logical names in ``only``) with
    ``TOPIC_PARTITIONS`` partitions; idempotent."""
    chosen = set(only) if only is not None else None
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise MeteringError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    wanted = [
        NewTopic(
            settings.topic(spec.name),
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication_factor,
            config={"cleanup.policy": "compact"} if spec.compacted else {},
        )
        for spec in ALL_TOPICS
        if settings.topic(spec.name) not in existing and (chosen is None or spec.name in chosen)
    ]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise MeteringError(f"cannot create topic {name}: {exc}") from exc
