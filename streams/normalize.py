"""Validation of incoming usage envelopes into canonical usage records.

Checks are relative to the envelope's ``sent_at_ms``, not the wall clock, so replaying a
topic months later accepts and rejects exactly what the live run did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from streams.columns import Columns

__all__ = ["MAX_AGE_MS", "MAX_FUTURE_MS", "invalid_reason", "invalid_records"]

MAX_FUTURE_MS = 5 * 60 * 1000  # Stripe's bound: 5 minutes in the future
MAX_AGE_MS = 35 * 24 * 3600 * 1000  # and 35 days in the past
_MAX_VALUE = Decimal(10) ** 29  # decimal(38, 9) holds 29 integer digits
_ZERO = Decimal(0)
_DECIMAL_ONLY = {Decimal}


def invalid_reason(record: Mapping[str, Any], sent_at_ms: int) -> str | None:
    """Why a decoded record cannot be billed, or None when it is valid."""
    # the common case in one expression (this runs for every sample); details below
    value = record["value"]
    ts = record["event_time_ms"]
    if (
        record["event_id"] and record["tenant_id"] and record["metric"] and record["resource_id"]
        and isinstance(value, Decimal) and value.is_finite() and _ZERO <= value < _MAX_VALUE
        and sent_at_ms - MAX_AGE_MS <= ts <= sent_at_ms + MAX_FUTURE_MS
    ):
        return None
    for name in ("event_id", "tenant_id", "metric", "resource_id"):
        if not record.get(name):
            return f"{name} is empty"
    value = record["value"]
    if not isinstance(value, Decimal) or not value.is_finite():
        return f"value {value!r} is not a finite decimal"
    if value < 0:
        return f"value {value} is negative (usage is never negative; counters need deltas)"
    if value >= _MAX_VALUE:
        return f"value {value} exceeds decimal(38, 9)"
    ts = record["event_time_ms"]
    if ts > sent_at_ms + MAX_FUTURE_MS:
        return f"event_time_ms {ts} is more than 5 minutes after the envelope was sent ({sent_at_ms})"
    if ts < sent_at_ms - MAX_AGE_MS:
        return f"event_time_ms {ts} is more than 35 days before the envelope was sent ({sent_at_ms})"
    return None


def invalid_records(
    records: Sequence[Mapping[str, Any]], sent_at_ms: int, columns: Columns | None = None,
) -> list[tuple[int, str]]:
    """(index, reason) of every record of an envelope that cannot be billed; usually empty.

    :func:`invalid_reason` for a whole envelope: the common case (all valid) is checked for
    the whole envelope at once, each condition over every record at C speed (this runs for
    every sample); only an envelope that fails it is checked record by record.
    ``columns``: the records' :class:`~streams.columns.Columns`, when the caller has them."""
    lo, hi = sent_at_ms - MAX_AGE_MS, sent_at_ms + MAX_FUTURE_MS
    if not records:
        return []
    cols = columns if columns is not None else Columns.of(records)
    values, times = cols.values, cols.times
    if (
        all(cols.event_ids) and all(cols.tenants) and all(cols.metrics) and all(cols.resources)
        and set(map(type, values)) == _DECIMAL_ONLY
        and all(map(Decimal.is_finite, values)) and _ZERO <= min(values) and max(values) < _MAX_VALUE
        and lo <= min(times) and max(times) <= hi
    ):
        return []
    bad = []
    for i, record in enumerate(records):
        value = record["value"]
        if not (
            record["event_id"] and record["tenant_id"] and record["metric"] and record["resource_id"]
            and isinstance(value, Decimal) and value.is_finite() and _ZERO <= value < _MAX_VALUE
            and lo <= record["event_time_ms"] <= hi
        ):
            bad.append((i, invalid_reason(record, sent_at_ms) or "invalid"))
    return bad
