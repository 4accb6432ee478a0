"""EnvelopePublisher (producers/publisher.py) on the session broker."""

from __future__ import annotations

import pytest

from metering.config import Settings
from producers import EnvelopePublisher, usage_record
from producers.errors import PublishError
from tests.producers.kafka_reader import consume


def _record(i: int) -> dict[str, object]:
    return usage_record(event_id=f"ev-{i}", tenant_id="acme", source="vm", resource_id="vm-1",
                        metric="cpu_seconds", value=i, event_time_ms=1_700_000_000_000 + i)


def test_close_releases_the_producer_after_what_was_flushed(settings: Settings) -> None:
    topic = settings.topic("usage.vm")
    pub = EnvelopePublisher(settings.kafka_bootstrap_servers or "", topic, source="vm")
    pub.send([_record(i) for i in range(3)])
    pub.flush(10)
    pub.close()
    pub.close()  # twice is harmless
    with pytest.raises(PublishError, match="closed"):
        pub.send([_record(3)])  # a clear error, not librdkafka's RuntimeError
    assert sorted(r["event_id"] for _, r in consume(settings.kafka_bootstrap_servers or "", topic, 3)) == [
        "ev-0", "ev-1", "ev-2"]
