"""Rows of the derived tables: quota alerts, dead letters and webhook deliveries.

``webhook_deliveries`` has one source: the webhook sink's ``metering.v1.WebhookDelivery``
records on ``webhook.deliveries`` (:func:`delivery_record_row`), one per outcome (status
``delivered``, ``duplicate`` or ``dead_lettered``). Its dead letters on ``usage.dlq`` go to
``dead_letters`` only: the record names the ``webhook-id`` the receiver saw, which a dead
letter cannot tell (the report format scopes it by report name).

Each builder takes one decoded Kafka message and where it came from, and returns the row (or
rows) in its table's column order. Like the records and windows rows in
:mod:`sinks.clickhouse.sink`, every row carries the Kafka topic/partition/offset of the message
it was built from: that is how the sink knows what is stored (DESIGN rule 4).

DateTime values are epoch seconds (``int``), which both backends insert as they are.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = [
    "ALERT_COLUMNS",
    "DEAD_LETTER_COLUMNS",
    "DELIVERY_COLUMNS",
    "DELIVERY_STATUSES",
    "alert_row",
    "dead_letter_row",
    "delivery_record_row",
    "epoch_seconds",
    "month_of_seconds",
]

Row = tuple[Any, ...]

ALERT_COLUMNS: tuple[str, ...] = (
    "alert_id", "tenant_id", "metric", "period", "period_start", "period_start_ms",
    "threshold_percent", "limit_value", "used", "crossed_at_window_end_ms",
    "kafka_topic", "kafka_partition", "kafka_offset",
)
DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "stage", "reason", "source_topic", "source_partition", "source_offset", "key_base64",
    "payload_base64", "payload_bytes", "failed_at", "failed_at_ms",
    "kafka_topic", "kafka_partition", "kafka_offset",
)
DELIVERY_COLUMNS: tuple[str, ...] = (
    "webhook_id", "window_id", "alert_id", "tenant_id", "status", "attempts", "last_status",
    "last_error", "reason", "delivered_at", "delivered_at_ms", "source_topic", "source_partition",
    "source_offset", "kafka_topic", "kafka_partition", "kafka_offset",
)

#: what ``webhook_deliveries.status`` may hold
DELIVERY_STATUSES: tuple[str, ...] = ("delivered", "dead_lettered", "duplicate")

_MAX_DATETIME_SECONDS = 2**32 - 1  # DateTime is UInt32 seconds on every version
_MAX_UINT64 = 2**64 - 1
_MAX_UINT32 = 2**32 - 1
_MAX_UINT16 = 2**16 - 1
_EPOCH_DATE = dt.date(1970, 1, 1)


def epoch_seconds(ms: int) -> int:
    """Milliseconds since the epoch as DateTime seconds, clamped to what DateTime holds.

    Clamping keeps the month the sink computes equal to the month ClickHouse stores (an
    out-of-range value would wrap around inside ClickHouse).
    """
    return min(max(ms // 1000, 0), _MAX_DATETIME_SECONDS)


_MONTHS: dict[int, int] = {}


def month_of_seconds(seconds: int) -> int:
    """``toYYYYMM`` of a UTC DateTime given in epoch seconds (cached per day)."""
    day = seconds // 86_400
    month = _MONTHS.get(day)
    if month is None:
        date = _EPOCH_DATE + dt.timedelta(days=day)
        month = _MONTHS[day] = date.year * 100 + date.month
    return month


def _ms(value: Any) -> int:
    return min(max(int(value), 0), _MAX_UINT64)


def alert_row(alert: Mapping[str, Any], *, topic: str, partition: int, offset: int) -> Row:
    """The ``quota_alerts`` row (in :data:`ALERT_COLUMNS` order) of one quota alert.

    The alert's fields (schema ``metering.v1.QuotaAlert``) are named like the columns, except
    ``limit``, stored as ``limit_value`` (a reserved-looking word kept out of SQL);
    ``period_start`` is derived from ``period_start_ms``. ``limit`` and ``used`` stay exact
    decimals.
    """
    start_ms = _ms(alert["period_start_ms"])
    return (
        alert["alert_id"], alert["tenant_id"], alert["metric"], alert["period"],
        epoch_seconds(start_ms), start_ms,
        min(max(int(alert["threshold_percent"]), 0), _MAX_UINT32),
        Decimal(alert["limit"]), Decimal(alert["used"]),
        _ms(alert["crossed_at_window_end_ms"]),
        topic, partition, offset,
    )


def dead_letter_row(dead: Mapping[str, Any], *, topic: str, partition: int, offset: int) -> Row:
    """The ``dead_letters`` row (in :data:`DEAD_LETTER_COLUMNS` order) of one DeadLetter.

    Key and payload are kept whole as base64 (both backends take any text, not any bytes), so
    a dead letter can be replayed from ClickHouse too.
    """
    key = dead.get("key")
    payload = dead.get("payload") or b""
    failed_ms = _ms(dead["failed_at_ms"])
    return (
        dead["stage"], dead["reason"], dead["source_topic"],
        min(max(int(dead["source_partition"]), 0), _MAX_UINT32), _ms(dead["source_offset"]),
        base64.b64encode(key).decode("ascii") if key is not None else "",
        base64.b64encode(payload).decode("ascii"), len(payload),
        epoch_seconds(failed_ms), failed_ms,
        topic, partition, offset,
    )


def delivery_record_row(
    delivery: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> Row:
    """The ``webhook_deliveries`` row (in :data:`DELIVERY_COLUMNS` order) of one
    WebhookDelivery record: one outcome of the webhook sink's delivery of a window or alert.

    The record names the ``webhook-id`` the receiver got (already scoped as the sink's payload
    format scopes it), so nothing is recomputed here. ``status`` is ``delivered``,
    ``duplicate`` (the receiver answered 409) or ``dead_lettered``; ``reason`` (the dead
    letter's) and ``last_error`` come from the record, empty unless dead-lettered;
    ``delivered_at`` comes from ``delivered_at_ms`` (when the outcome was decided). A crash of
    the webhook sink between recording and committing makes a second record (a real second
    POST), so count unique deliveries with ``uniqExact(webhook_id)``.
    """
    at_ms = _ms(delivery["delivered_at_ms"])
    return (
        str(delivery["webhook_id"]), str(delivery["window_id"]), str(delivery["alert_id"]),
        str(delivery["tenant_id"]), str(delivery["status"]),
        min(max(int(delivery["attempts"]), 0), _MAX_UINT32),
        min(max(int(delivery["last_status"]), 0), _MAX_UINT16),
        str(delivery.get("last_error") or ""), str(delivery.get("reason") or ""),
        epoch_seconds(at_ms), at_ms,
        str(delivery["source_topic"]), min(max(int(delivery["source_partition"]), 0), _MAX_UINT32),
        _ms(delivery["source_offset"]), topic, partition, offset,
    )
