"""Sinks: durable results to ClickHouse and billing reports to a webhook."""

from sinks.base import Batch, BatchingSink, SinkRecord, SinkStats
from sinks.errors import BackpressureError, SinkError, SinkUnavailableError

__all__ = [
    "BackpressureError",
    "Batch",
    "BatchingSink",
    "SinkError",
    "SinkRecord",
    "SinkStats",
    "SinkUnavailableError",
]
