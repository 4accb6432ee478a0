"""Rows of the derived tables: quota alerts, dead letters and webhook deliveries.

``webhook_deliveries`` has two sources: the webhook sink's dead letters on ``usage.dlq``
(:func:`delivery_row`, status ``dead_lettered``) and its records of successful deliveries on
``webhook.deliveries`` (:func:`delivery_record_row`, status ``delivered`` or ``duplicate``).

Each builder takes one decoded Kafka message and where it came from, and returns the row (or
rows) in its table's column order. Like the records and windows rows in
:mod:`sinks.clickhouse.sink`, every row carries the Kafka topic/partition/offset of the message
it was built from: that is how the sink knows what is stored (DESIGN rule 4).

DateTime values are epoch seconds (``int``), which both backends insert as they are.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NamedTuple

from schemas import CodecError, quota_alert_codec, window_codec
from sinks.webhook import ALERT_SCOPE, webhook_id

__all__ = [
    "ALERT_COLUMNS",
    "DEAD_LETTER_COLUMNS",
    "DELIVERY_COLUMNS",
    "DELIVERY_STATUSES",
    "WEBHOOK_STAGE",
    "WebhookFailure",
    "alert_row",
    "dead_letter_row",
    "delivery_record_row",
    "delivery_row",
    "epoch_seconds",
    "month_of_seconds",
    "parse_webhook_reason",
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

#: the dead-letter stage of the webhook sink (``sinks.webhook.WebhookSink.name``)
WEBHOOK_STAGE = "webhook-sink"
#: what ``webhook_deliveries.status`` may hold
DELIVERY_STATUSES: tuple[str, ...] = ("delivered", "dead_lettered", "duplicate")

_MAX_DATETIME_SECONDS = 2**32 - 1  # DateTime is UInt32 seconds on every version
_MAX_UINT64 = 2**64 - 1
_MAX_UINT32 = 2**32 - 1
_MAX_UINT16 = 2**16 - 1
_EPOCH_DATE = dt.date(1970, 1, 1)

# the reasons sinks.webhook.DeliveryOutcome.reason() writes
_FAILED = re.compile(r"^webhook delivery failed after (\d+) attempt\(s\); last: (.*)$", re.S)
_NOT_ATTEMPTED = re.compile(r"^webhook delivery not attempted: (.*)$", re.S)
_HTTP = re.compile(r"^HTTP (\d{3})(?: \((.*)\))?$", re.S)


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


class WebhookFailure(NamedTuple):
    """What a webhook dead letter's reason says about the delivery."""

    attempts: int
    last_status: int  # 0: no HTTP status (a timeout, a connection error, not attempted)
    last_error: str


def parse_webhook_reason(reason: str) -> WebhookFailure:
    """Read attempts, last HTTP status and last error from a webhook dead letter's reason.

    Understands what ``DeliveryOutcome.reason()`` writes: ``webhook delivery failed after N
    attempt(s); last: HTTP 503 (error)``, ``... last: <error>`` and ``webhook delivery not
    attempted: <error>``. Any other text is kept whole as the error, with 0 attempts.
    """
    failed = _FAILED.match(reason)
    if failed is not None:
        attempts, last = int(failed.group(1)), failed.group(2)
        http = _HTTP.match(last)
        if http is not None:
            return WebhookFailure(attempts, int(http.group(1)), http.group(2) or "")
        return WebhookFailure(attempts, 0, last)
    not_attempted = _NOT_ATTEMPTED.match(reason)
    if not_attempted is not None:
        return WebhookFailure(0, 0, not_attempted.group(1))
    return WebhookFailure(0, 0, reason)


def delivery_row(
    dead: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> Row | None:
    """The ``webhook_deliveries`` row of a webhook dead letter, or None for other stages.

    The payload of a webhook dead letter is the undelivered WindowResult; its ``window_id``
    gives the ``webhook-id`` every delivery of it carried (the default payload format's id: a
    sink configured with the ``report`` format scopes its ids by report name); that of a quota
    alert is the QuotaAlert, whose ``alert_id`` gives its id. Any other payload leaves both ids
    empty; the tenant then comes from the message key.
    """
    if dead.get("stage") != WEBHOOK_STAGE:
        return None
    reason = str(dead.get("reason", ""))
    failure = parse_webhook_reason(reason)
    key = dead.get("key")
    tenant = key.decode("utf-8", "replace") if key else ""
    window_id = alert_id = msg_id = ""
    payload = dead.get("payload") or b""
    try:
        window = window_codec().decode(payload)
        window_id, tenant = str(window["window_id"]), str(window["tenant_id"])
        msg_id = webhook_id(window_id)
    except CodecError:
        try:
            alert = quota_alert_codec().decode(payload)
            alert_id, tenant = str(alert["alert_id"]), str(alert["tenant_id"])
            msg_id = webhook_id(alert_id, ALERT_SCOPE)
        except CodecError:
            pass
    failed_ms = _ms(dead["failed_at_ms"])
    return (
        msg_id, window_id, alert_id, tenant, "dead_lettered",
        min(failure.attempts, _MAX_UINT32), min(failure.last_status, _MAX_UINT16),
        failure.last_error, reason, epoch_seconds(failed_ms), failed_ms,
        dead["source_topic"], min(max(int(dead["source_partition"]), 0), _MAX_UINT32),
        _ms(dead["source_offset"]), topic, partition, offset,
    )


def delivery_record_row(
    delivery: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> Row:
    """The ``webhook_deliveries`` row (in :data:`DELIVERY_COLUMNS` order) of one
    WebhookDelivery record: a window or alert the webhook sink delivered.

    The record names the ``webhook-id`` the receiver got (already scoped as the sink's payload
    format scopes it), so nothing is recomputed here. ``status`` is ``delivered`` or
    ``duplicate`` (the receiver answered 409); ``reason`` and ``last_error`` are empty;
    ``delivered_at`` comes from ``delivered_at_ms``. A crash of the webhook sink between
    recording and committing makes a second record (a real second POST), so count unique
    deliveries with ``uniqExact(webhook_id)``.
    """
    at_ms = _ms(delivery["delivered_at_ms"])
    return (
        str(delivery["webhook_id"]), str(delivery["window_id"]), str(delivery["alert_id"]),
        str(delivery["tenant_id"]), str(delivery["status"]),
        min(max(int(delivery["attempts"]), 0), _MAX_UINT32),
        min(max(int(delivery["last_status"]), 0), _MAX_UINT16),
        "", "", epoch_seconds(at_ms), at_ms,
        str(delivery["source_topic"]), min(max(int(delivery["source_partition"]), 0), _MAX_UINT32),
        _ms(delivery["source_offset"]), topic, partition, offset,
    )
