"""Versioned, idempotent schema migrations, recorded in ``schema_migrations``.

The same SQL runs on ClickHouse 18.16 (Debian's server) and on chdb (ClickHouse 26.x), so
it avoids DateTime64, Map, JSON functions and TTL: millisecond times are UInt64 columns
beside a second-resolution DateTime. DateTime columns are declared ``DateTime('UTC')`` so
that ``toYYYYMM`` (the partition key) and text rendering do not depend on the server's time
zone: the sink computes the same month in Python to keep each INSERT inside one partition.

Every statement must be safe to run twice (``CREATE TABLE IF NOT EXISTS`` ...): a crash
between applying a migration and recording it re-applies it. 18.16 has no
``ADD COLUMN IF NOT EXISTS``, so a future ALTER migration must look at ``system.columns``
first (see :class:`Migration`'s ``skip_if`` hook).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sinks.clickhouse.backends import ClickHouseBackend

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "MIGRATIONS",
    "MIGRATIONS_TABLE",
    "RECORDS_TABLE",
    "WINDOWS_TABLE",
    "Migration",
    "applied_versions",
    "migrate",
]

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "schema_migrations"
RECORDS_TABLE = "usage_records"
WINDOWS_TABLE = "usage_windows"

# ReplacingMergeTree: two processes migrating at once may both record a version; the
# duplicate rows collapse, and applied_versions() reads DISTINCT anyway
_CREATE_MIGRATIONS = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version UInt32,
    name String,
    applied_at DateTime('UTC')
) ENGINE = ReplacingMergeTree() ORDER BY version
"""

_CREATE_RECORDS = f"""
CREATE TABLE IF NOT EXISTS {RECORDS_TABLE} (
    event_id String,
    tenant_id String,
    source String,
    resource_id String,
    metric String,
    value Decimal(38, 9),
    event_time DateTime('UTC'),
    event_time_ms UInt64,
    event_date Date,
    metadata_keys Array(String),
    metadata_values Array(String),
    kafka_topic String,
    kafka_partition UInt32,
    kafka_offset UInt64,
    kafka_index UInt32,
    record_count UInt32
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_date)
ORDER BY (tenant_id, event_id)
"""

_CREATE_WINDOWS = f"""
CREATE TABLE IF NOT EXISTS {WINDOWS_TABLE} (
    window_id String,
    tenant_id String,
    window_start DateTime('UTC'),
    window_start_ms UInt64,
    window_end_ms UInt64,
    metrics Array(String),
    aggregations Array(String),
    metric_values Array(Decimal(38, 9)),
    metric_samples Array(UInt64),
    sample_count UInt64,
    score Decimal(38, 9),
    late_samples UInt64,
    has_gap UInt8,
    kafka_topic String,
    kafka_partition UInt32,
    kafka_offset UInt64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant_id, window_start_ms, window_id)
"""


@dataclass(frozen=True)
class Migration:
    """One schema change: statements applied in order, each safe to repeat.

    ``skip_if`` (optional) is asked before a statement runs and may return True to skip it,
    for changes ClickHouse 18.16 cannot express idempotently (``ADD COLUMN IF NOT EXISTS``).
    """

    version: int
    name: str
    statements: tuple[str, ...]
    skip_if: Callable[[ClickHouseBackend, str], bool] | None = field(default=None, compare=False)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create usage_records", (_CREATE_RECORDS,)),
    Migration(2, "create usage_windows", (_CREATE_WINDOWS,)),
)


def applied_versions(backend: ClickHouseBackend) -> set[int]:
    """The migration versions recorded as applied (creates the bookkeeping table if needed)."""
    backend.execute(_CREATE_MIGRATIONS)
    return {int(v) for (v,) in backend.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")}


def migrate(
    backend: ClickHouseBackend,
    settings: Settings | None = None,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> list[int]:
    """Apply the migrations not yet recorded, in version order; return their versions.

    Running it again is a no-op. ``settings`` is accepted so callers can pass their
    configuration; the schema does not depend on it today (the database is the backend's).
    """
    del settings  # reserved: version-gated storage options would read it
    done = applied_versions(backend)
    known = {m.version for m in migrations}
    if done - known:
        # a newer release migrated this database; this one can still write the tables it knows
        log.warning("database has migrations %s unknown to this release", sorted(done - known))
    applied: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in done:
            continue
        log.info("applying ClickHouse migration %d: %s", migration.version, migration.name)
        for statement in migration.statements:
            if migration.skip_if is not None and migration.skip_if(backend, statement):
                continue
            backend.execute(statement)
        backend.insert(
            MIGRATIONS_TABLE,
            ("version", "name", "applied_at"),
            [(migration.version, migration.name, dt.datetime.now(dt.UTC).replace(tzinfo=None))],
        )
        applied.append(migration.version)
    return applied
