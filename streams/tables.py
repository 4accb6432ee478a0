"""Faust tables of the stream stage (changelog-backed, restored before agents run)."""

from __future__ import annotations

import faust

from metering.config import Settings

__all__ = ["declare_tables", "StreamTables"]


class StreamTables:
    """The tables the agents keep durable state in."""

    def __init__(self, window_state: faust.types.TableT, dedup: faust.types.TableT) -> None:
        self.window_state = window_state
        self.dedup = dedup


def declare_tables(app: faust.App, settings: Settings) -> StreamTables:
    """Declare the tables; one key per input partition, written once per batch."""
    window_state = app.Table(
        "window-state",
        default=None,
        partitions=settings.topic_partitions,
        schema=faust.Schema(key_serializer="json", value_serializer="json"),
        help="per input partition: the window close log (see streams/windows.py)",
    )
    dedup = app.Table(
        "dedup",
        default=None,
        partitions=settings.topic_partitions,
        schema=faust.Schema(key_serializer="json", value_serializer="json"),
        help="per input partition, hour and batch: event-id digests passed on (streams/dedup.py)",
    )
    return StreamTables(window_state, dedup)
