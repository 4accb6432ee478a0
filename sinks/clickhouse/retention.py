"""Retention: drop whole monthly partitions once they are older than the retention period.

Every table of the schema is partitioned by ``toYYYYMM`` of its time column, so retention is
``ALTER TABLE ... DROP PARTITION <yyyymm>``, which ClickHouse 18.16 and chdb both run, and
which costs nothing like a ``DELETE`` (no TTL: 18.16's SQL is the common ground). Partitions
are listed from ``system.parts`` (active parts of the current database).

A month is dropped once ``retention_months`` whole months have passed after it: with 36 and
today in 2026-11, 2023-11 is kept and 2023-10 dropped. Raw tables and everything derived from
them (windows, alerts, dead letters, deliveries, rollups) share the same cut, so a rollup never
outlives the records it sums.

The sink runs :func:`drop_expired_partitions` when it starts and then once a day.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from sinks.clickhouse.backends import ClickHouseBackend, sql_string
from sinks.clickhouse.migrations import RETAINED_TABLES, render_statement

__all__ = ["cutoff_month", "drop_expired_partitions", "monthly_partitions"]

log = logging.getLogger(__name__)


def cutoff_month(retention_months: int, now: dt.datetime | None = None) -> int:
    """The oldest month (``yyyymm``) still kept: partitions of earlier months are dropped."""
    if retention_months < 1:
        raise ValueError("retention_months must be at least 1")
    now = now or dt.datetime.now(dt.UTC)
    index = now.year * 12 + (now.month - 1) - retention_months
    return (index // 12) * 100 + index % 12 + 1


def monthly_partitions(backend: ClickHouseBackend, table: str) -> list[int]:
    """The ``yyyymm`` partitions of ``table`` that hold active parts, ascending."""
    rows = backend.query(
        "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() "
        f"AND table = {sql_string(table)} AND active"
    )
    months: list[int] = []
    for (partition,) in rows:
        text = str(partition).strip("'")
        if text.isdigit() and len(text) == 6:
            months.append(int(text))
        else:
            log.warning("retention: %s has a partition %r that is not a month; left alone",
                        table, partition)
    return sorted(months)


def drop_expired_partitions(
    backend: ClickHouseBackend,
    retention_months: int,
    *,
    tables: Sequence[str] = RETAINED_TABLES,
    now: dt.datetime | None = None,
    cluster: str | None = None,
) -> dict[str, list[int]]:
    """Drop the monthly partitions older than ``retention_months``; return what was dropped.

    Idempotent: a second run finds nothing to drop. ``cluster`` adds ``ON CLUSTER``.
    """
    keep_from = cutoff_month(retention_months, now)
    database = str(backend.query("SELECT currentDatabase()")[0][0]) if cluster else "default"
    dropped: dict[str, list[int]] = {}
    for table in tables:
        old = [m for m in monthly_partitions(backend, table) if m < keep_from]
        for month in old:
            backend.execute(
                render_statement(f"ALTER TABLE {table} DROP PARTITION {month}", cluster, database)
            )
        if old:
            dropped[table] = old
            log.info("retention: dropped %s partitions %s (keeping %d months, from %d)",
                     table, old, retention_months, keep_from)
    return dropped
