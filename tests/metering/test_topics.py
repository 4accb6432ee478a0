"""Topic creation against a real (Tansu) broker: every topic the pipeline uses, with the
configured partition count, ``quota.limits`` compacted (a limit is its latest record per
key, a tombstone removes it), idempotent because every producer and command runs it at start."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from metering import topics
from metering.config import Settings, load_settings
from metering.embedded import TansuBroker
from metering.embedded.ports import free_port
from metering.errors import MeteringError


def _settings(prefix: str, partitions: int) -> Settings:
    # not the conftest `settings` fixture: it has already created the topics under test
    return load_settings(topic_prefix=prefix, topic_partitions=partitions, topic_replication_factor=1)


def _partitions(admin: AdminClient, prefix: str) -> dict[str, int]:
    meta = admin.list_topics(timeout=10).topics
    return {name: len(t.partitions) for name, t in meta.items() if name.startswith(prefix)}


def _cleanup_policies(admin: AdminClient, names: list[str]) -> dict[str, str | None]:
    # Tansu describes only the configs a topic was created with: absent means the default
    # (delete); Apache Kafka would answer "delete" explicitly
    futures = admin.describe_configs([ConfigResource("topic", n) for n in names])
    policies: dict[str, str | None] = {}
    for resource, fut in futures.items():
        entry = fut.result(10).get("cleanup.policy")
        policies[resource.name] = entry.value if entry is not None else None
    return policies


def test_all_topics_lists_each_topic_once_and_only_limits_compacted() -> None:
    names = [spec.name for spec in topics.ALL_TOPICS]
    assert len(names) == len(set(names))
    assert set(topics.SOURCE_TOPICS.values()) <= set(names)
    assert {topics.RECORDS, topics.WINDOWS, topics.LATE, topics.DLQ, topics.ALERTS,
            topics.DELIVERIES, topics.LIMITS} <= set(names)
    # compacting any other topic would lose usage: they are logs, not latest-value tables
    assert [spec.name for spec in topics.ALL_TOPICS if spec.compacted] == [topics.LIMITS]


@pytest.mark.integration
def test_ensure_topics_creates_every_topic_partitioned_and_compacted_and_is_idempotent(
    broker: TansuBroker, topic_prefix: str
) -> None:
    settings = _settings(topic_prefix, partitions=3)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    expected = {settings.topic(spec.name): 3 for spec in topics.ALL_TOPICS}

    topics.ensure_topics(settings, broker.bootstrap_servers)
    # every topic, under the prefix only, with TOPIC_PARTITIONS partitions
    assert _partitions(admin, topic_prefix) == expected
    policies = _cleanup_policies(admin, list(expected))
    limits = settings.topic(topics.LIMITS)
    assert policies[limits] == "compact"
    assert all(policy != "compact" for name, policy in policies.items() if name != limits), policies

    # a second run (the next command or producer starting) finds them and changes nothing,
    # even when it asks for another partition count
    topics.ensure_topics(_settings(topic_prefix, partitions=5), broker.bootstrap_servers)
    assert _partitions(admin, topic_prefix) == expected
    assert _cleanup_policies(admin, [limits]) == {limits: "compact"}


@pytest.mark.integration
def test_only_creates_the_named_topics_and_a_full_run_adds_the_rest(
    broker: TansuBroker, topic_prefix: str
) -> None:
    """``metering quota`` creates just its two topics; a later full run must then create the
    others alongside the existing ones (the mixed case of idempotence)."""
    settings = _settings(topic_prefix, partitions=2)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})

    topics.ensure_topics(settings, broker.bootstrap_servers, only=[topics.LIMITS, topics.ALERTS])
    assert _partitions(admin, topic_prefix) == {
        settings.topic(topics.LIMITS): 2, settings.topic(topics.ALERTS): 2
    }
    assert _cleanup_policies(admin, [settings.topic(topics.LIMITS)]) == {
        settings.topic(topics.LIMITS): "compact"
    }

    topics.ensure_topics(settings, broker.bootstrap_servers)
    assert _partitions(admin, topic_prefix) == {settings.topic(s.name): 2 for s in topics.ALL_TOPICS}


def test_unreachable_kafka_is_a_metering_error_naming_the_address() -> None:
    # nothing listens on a fresh free port: the command must say where it looked, not crash
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(MeteringError, match=f"cannot reach Kafka at {address}"):
        topics.ensure_topics(_settings("unused.", partitions=1), address, timeout=1.0)
