"""Sinks: durable results to ClickHouse and billing reports to a webhook."""

from sinks.base import Batch, BatchingSink, SinkRecord, SinkStats
from sinks.errors import BackpressureError, SinkError, SinkUnavailableError
from sinks.webhook import WebhookSink

__all__ = [
    "BackpressureError",
    "Batch",
    "BatchingSink",
    "SinkError",
    "SinkRecord",
    "SinkStats",
    "SinkUnavailableError",
    "WebhookSink",
]
