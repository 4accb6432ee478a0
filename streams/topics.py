"""The Faust topic objects of the stream stage. Values stay raw bytes: our Avro codec
decodes them inside the agents, so a bad message becomes a dead letter, not a crash."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from metering import topics as names
from metering.config import Settings

__all__ = ["StreamTopics", "declare_topics"]


@dataclass(frozen=True)
class StreamTopics:
    """Every topic the agents read or write."""

    sources: faust.TopicT
    records: faust.TopicT
    windows: faust.TopicT
    late: faust.TopicT
    dlq: faust.TopicT


def declare_topics(app: faust.App, settings: Settings) -> StreamTopics:
    """Declare the topics on the app (they are created beforehand with explicit partitions)."""

    def topic(*logical: str) -> faust.TopicT:
        return app.topic(
            *(settings.topic(n) for n in logical),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.topic_partitions,
        )

    return StreamTopics(
        sources=topic(*names.SOURCE_TOPICS.values()),
        records=topic(names.RECORDS),
        windows=topic(names.WINDOWS),
        late=topic(names.LATE),
        dlq=topic(names.DLQ),
    )
