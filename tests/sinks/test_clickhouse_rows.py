"""Unit tests of the ``webhook_deliveries`` rows built from the webhook sink's delivery records
(sinks/clickhouse/rows.py), the table's only source, dead-lettered outcomes included. No
servers: rows are plain tuples."""

from __future__ import annotations

import datetime as dt
from typing import Any

from schemas import webhook_delivery_codec
from sinks.clickhouse.rows import (
    DELIVERY_COLUMNS,
    DELIVERY_STATUSES,
    delivery_record_row,
    epoch_seconds,
    month_of_seconds,
)
from sinks.webhook import webhook_id

#: 31 January 2024, 23:59:59.999 UTC: one millisecond before February
JAN_31_LAST_MS = int(dt.datetime(2024, 2, 1, tzinfo=dt.UTC).timestamp() * 1000) - 1


def _delivery(**overrides: Any) -> dict[str, Any]:
    """A WebhookDelivery as the webhook sink publishes it, through the codec (what the
    ClickHouse sink decodes). ``last_error`` and ``reason`` are left to the schema's defaults
    unless overridden."""
    window_id = "acme|1706745540000|60000"
    record = {
        "webhook_id": webhook_id(window_id), "window_id": window_id, "alert_id": "",
        "tenant_id": "acme", "status": "delivered", "attempts": 3, "last_status": 200,
        "delivered_at_ms": JAN_31_LAST_MS, "source_topic": "p.usage.windows",
        "source_partition": 1, "source_offset": 41, "payload_format": "usage.window",
    }
    record.update(overrides)
    codec = webhook_delivery_codec()
    return codec.decode(codec.encode(record))


def _row(delivery: dict[str, Any], offset: int = 7) -> dict[str, Any]:
    row = delivery_record_row(delivery, topic="p.webhook.deliveries", partition=1, offset=offset)
    assert len(row) == len(DELIVERY_COLUMNS)
    return dict(zip(DELIVERY_COLUMNS, row, strict=True))


def test_a_delivered_window_becomes_a_row_in_column_order() -> None:
    d = _delivery()
    assert _row(d) == {
        "webhook_id": d["webhook_id"], "window_id": d["window_id"], "alert_id": "",
        "tenant_id": "acme", "status": "delivered", "attempts": 3, "last_status": 200,
        "last_error": "", "reason": "",
        "delivered_at": epoch_seconds(JAN_31_LAST_MS), "delivered_at_ms": JAN_31_LAST_MS,
        "source_topic": "p.usage.windows", "source_partition": 1, "source_offset": 41,
        "kafka_topic": "p.webhook.deliveries", "kafka_partition": 1, "kafka_offset": 7,
    }
    # delivered_at is whole seconds, rounded down: still January, the month the row is stored in
    assert _row(d)["delivered_at"] == JAN_31_LAST_MS // 1000
    assert month_of_seconds(_row(d)["delivered_at"]) == 202401
    assert month_of_seconds(_row(_delivery(delivered_at_ms=JAN_31_LAST_MS + 1))["delivered_at"]) == 202402


def test_duplicates_and_alerts_keep_their_status_and_ids() -> None:
    alert_id = "acme|score|month|1704067200000|80"
    alert = _row(_delivery(webhook_id=webhook_id(alert_id, "alert"), window_id="", alert_id=alert_id,
                           status="duplicate", attempts=1, last_status=409,
                           source_topic="p.quota.alerts", payload_format="quota.alert"))
    assert (alert["webhook_id"], alert["window_id"], alert["alert_id"], alert["status"],
            alert["attempts"], alert["last_status"], alert["source_topic"]) == (
        webhook_id(alert_id, "alert"), "", alert_id, "duplicate", 1, 409, "p.quota.alerts")
    assert {alert["status"], _row(_delivery())["status"]} <= set(DELIVERY_STATUSES)
    # the report format's scoped id is stored as the record names it, never recomputed
    scoped = webhook_id("acme|1706745540000|60000", "report:billing_score")
    assert _row(_delivery(webhook_id=scoped, payload_format="report"))["webhook_id"] == scoped


def test_a_dead_lettered_record_keeps_its_id_reason_and_last_error() -> None:
    scoped = webhook_id("acme|1706745540000|60000", "report:billing_score")
    reason = 'webhook delivery failed after 1 attempt(s); last: HTTP 400 (not retried: {"error":"x"})'
    refused = _row(_delivery(webhook_id=scoped, status="dead_lettered", attempts=1, last_status=400,
                             last_error='not retried: {"error":"x"}', reason=reason,
                             payload_format="report"))
    assert {k: refused[k] for k in ("webhook_id", "status", "attempts", "last_status", "last_error",
                                    "reason")} == {
        "webhook_id": scoped, "status": "dead_lettered", "attempts": 1, "last_status": 400,
        "last_error": 'not retried: {"error":"x"}', "reason": reason}
    assert refused["status"] in DELIVERY_STATUSES
    # never attempted (the payload could not be built): no attempt, no status, the error kept
    error = "cannot build the report payload: billing_score = 1E+30 rounds to ..."
    never = _row(_delivery(webhook_id=scoped, status="dead_lettered", attempts=0, last_status=0,
                           last_error=error, reason=f"webhook delivery not attempted: {error}"))
    assert (never["attempts"], never["last_status"], never["last_error"], never["reason"]) == (
        0, 0, error, f"webhook delivery not attempted: {error}")
    # a timeout: no HTTP status, the error text is what tells
    timeout = _row(_delivery(status="dead_lettered", attempts=8, last_status=0,
                             last_error="ReadTimeout: timed out",
                             reason="webhook delivery failed after 8 attempt(s); "
                                    "last: ReadTimeout: timed out"))
    assert (timeout["last_status"], timeout["last_error"]) == (0, "ReadTimeout: timed out")


def test_values_outside_the_column_types_are_clamped() -> None:
    row = _row(_delivery(attempts=2**31 - 1, last_status=-1, delivered_at_ms=-5,
                         source_partition=-3, source_offset=-1), offset=2**40)
    assert (row["attempts"], row["last_status"], row["delivered_at"], row["delivered_at_ms"],
            row["source_partition"], row["source_offset"], row["kafka_offset"]) == (
        2**31 - 1, 0, 0, 0, 0, 0, 2**40)
    far = _row(_delivery(delivered_at_ms=2**62))
    assert far["delivered_at"] == 2**32 - 1 and far["delivered_at_ms"] == 2**62
