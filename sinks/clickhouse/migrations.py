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

Tables (all partitioned by month, so retention drops whole partitions, see
:mod:`sinks.clickhouse.retention`):

* ``usage_records``, ``usage_windows``: what the streams produce (raw records, closed windows);
* ``quota_alerts``: threshold crossings from ``quota.alerts``;
* ``dead_letters``: everything on ``usage.dlq``, payload in base64;
* ``webhook_deliveries``: outcomes of webhook deliveries, next to the data they came from,
  all from the webhook sink's records on ``webhook.deliveries`` (status ``delivered``,
  ``duplicate`` or ``dead_lettered``, under the ``webhook-id`` the receiver saw; a
  dead-lettered one carries its dead letter's ``reason`` and the ``last_error``). Dead letters
  on ``usage.dlq`` go to ``dead_letters`` only (rows an earlier version derived from them here
  keep ``kafka_topic`` = the dead-letter topic). A webhook sink that crashed before committing
  re-delivers and records again, so count deliveries with ``uniqExact(webhook_id)``; the key
  keeps one row per Kafka message;
* ``usage_rollup_hourly``, ``usage_rollup_daily``: per tenant and metric, the sum of ``value``
  and the number of records, filled by materialized views over ``usage_records``. The views
  write into named tables (``CREATE MATERIALIZED VIEW ... TO``): the same name on 18.16 and
  chdb (an implicit ``.inner`` table is named differently by each), so retention and cluster
  DDL can address them. ``SummingMergeTree`` folds rows on merge, not on insert: always read
  them with ``sum()``. They only ever see first inserts (the sink never inserts a row twice),
  so a rollup equals the same sums over ``usage_records``.

Cluster mode (``cluster=``): every DDL statement gets ``ON CLUSTER`` and every MergeTree engine
its ``Replicated`` variant, with the ZooKeeper path ``/clickhouse/tables/{shard}/<db>/<table>``
and the ``{replica}`` macro (see :func:`render_statement`). Inserts go to the local replica and
replicate from there; exactly-once rests on one shard (its replicas all hold every row), so a
sharded cluster needs one sink group per shard.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sinks.clickhouse.backends import ClickHouseBackend

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "ALERTS_TABLE",
    "DAILY_ROLLUP_TABLE",
    "DEAD_LETTERS_TABLE",
    "DELIVERIES_TABLE",
    "HOURLY_ROLLUP_TABLE",
    "MIGRATIONS",
    "MIGRATIONS_TABLE",
    "RECORDS_TABLE",
    "RETAINED_TABLES",
    "WINDOWS_TABLE",
    "Migration",
    "applied_versions",
    "migrate",
    "render_statement",
]

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "schema_migrations"
RECORDS_TABLE = "usage_records"
WINDOWS_TABLE = "usage_windows"
ALERTS_TABLE = "quota_alerts"
DEAD_LETTERS_TABLE = "dead_letters"
DELIVERIES_TABLE = "webhook_deliveries"
HOURLY_ROLLUP_TABLE = "usage_rollup_hourly"
DAILY_ROLLUP_TABLE = "usage_rollup_daily"

#: every table whose monthly partitions retention drops (all but the bookkeeping table)
RETAINED_TABLES: tuple[str, ...] = (
    RECORDS_TABLE, WINDOWS_TABLE, ALERTS_TABLE, DEAD_LETTERS_TABLE, DELIVERIES_TABLE,
    HOURLY_ROLLUP_TABLE, DAILY_ROLLUP_TABLE,
)

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


_CREATE_ALERTS = f"""
CREATE TABLE IF NOT EXISTS {ALERTS_TABLE} (
    alert_id String,
    tenant_id String,
    metric String,
    period String,
    period_start DateTime('UTC'),
    period_start_ms UInt64,
    threshold_percent UInt32,
    limit_value Decimal(38, 9),
    used Decimal(38, 9),
    crossed_at_window_end_ms UInt64,
    kafka_topic String,
    kafka_partition UInt32,
    kafka_offset UInt64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant_id, alert_id)
"""

# the key is where the dead letter sits on usage.dlq: a re-delivered copy collapses, two
# dead letters of the same input (a replay that failed again) are two rows
_CREATE_DEAD_LETTERS = f"""
CREATE TABLE IF NOT EXISTS {DEAD_LETTERS_TABLE} (
    stage String,
    reason String,
    source_topic String,
    source_partition UInt32,
    source_offset UInt64,
    key_base64 String,
    payload_base64 String,
    payload_bytes UInt32,
    failed_at DateTime('UTC'),
    failed_at_ms UInt64,
    kafka_topic String,
    kafka_partition UInt32,
    kafka_offset UInt64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(failed_at)
ORDER BY (kafka_topic, kafka_partition, kafka_offset)
"""

# status: delivered | dead_lettered | duplicate (the receiver already had the webhook-id);
# last_status 0 = no HTTP status (timeout, connection error, not attempted)
_CREATE_DELIVERIES = f"""
CREATE TABLE IF NOT EXISTS {DELIVERIES_TABLE} (
    webhook_id String,
    window_id String,
    alert_id String,
    tenant_id String,
    status String,
    attempts UInt32,
    last_status UInt16,
    last_error String,
    reason String,
    delivered_at DateTime('UTC'),
    delivered_at_ms UInt64,
    source_topic String,
    source_partition UInt32,
    source_offset UInt64,
    kafka_topic String,
    kafka_partition UInt32,
    kafka_offset UInt64
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(delivered_at)
ORDER BY (tenant_id, webhook_id, kafka_topic, kafka_partition, kafka_offset)
"""


def _rollup(table: str, period: str, period_type: str) -> tuple[str, ...]:
    """A rollup table, its backfill from ``usage_records``, then its materialized view.

    The backfill runs before the view exists and after a TRUNCATE, so re-running the
    migration after a crash gives the same result (the sink migrates before it consumes;
    stop older sink processes while upgrading, or their inserts between the backfill and the
    view would be missed by the rollup).
    """
    select = (
        f"SELECT tenant_id, metric, {period} AS period_start, sum(value) AS total, "
        f"count() AS samples FROM {RECORDS_TABLE} GROUP BY tenant_id, metric, period_start"
    )
    return (
        f"""
CREATE TABLE IF NOT EXISTS {table} (
    tenant_id String,
    metric String,
    period_start {period_type},
    total Decimal(38, 9),
    samples UInt64
) ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant_id, metric, period_start)
""",
        f"TRUNCATE TABLE IF EXISTS {table}",
        f"INSERT INTO {table} (tenant_id, metric, period_start, total, samples) {select}",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table} AS {select}",
    )


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
    Migration(3, "create quota_alerts", (_CREATE_ALERTS,)),
    Migration(4, "create dead_letters", (_CREATE_DEAD_LETTERS,)),
    Migration(5, "create webhook_deliveries", (_CREATE_DELIVERIES,)),
    Migration(6, "create usage_rollup_hourly",
              _rollup(HOURLY_ROLLUP_TABLE, "toStartOfHour(event_time)", "DateTime('UTC')")),
    Migration(7, "create usage_rollup_daily",
              _rollup(DAILY_ROLLUP_TABLE, "toDate(event_time)", "Date")),
)

# ---- cluster mode ----------------------------------------------------------------------------

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ON_CLUSTER_AFTER_NAME = re.compile(
    r"^(\s*(?:CREATE TABLE IF NOT EXISTS|CREATE MATERIALIZED VIEW IF NOT EXISTS|"
    r"ALTER TABLE|DROP TABLE IF EXISTS|TRUNCATE TABLE IF EXISTS)\s+([A-Za-z_][A-Za-z0-9_.]*))"
)
_ENGINE = re.compile(r"ENGINE = (Replacing|Summing|Aggregating|Collapsing|)MergeTree\(([^)]*)\)")


def render_statement(sql: str, cluster: str | None, database: str = "default") -> str:
    """``sql`` as it runs: unchanged without a cluster, else with ``ON CLUSTER`` and a
    Replicated engine.

    ``ON CLUSTER <cluster>`` goes after the object name of CREATE TABLE, CREATE MATERIALIZED
    VIEW, ALTER TABLE, DROP TABLE and TRUNCATE TABLE; ``XMergeTree(args)`` becomes
    ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/<database>/<table>', '{replica}', args)``
    (18.16 has no ``{database}``/``{table}`` macros, so they are spelled out). INSERT and
    SELECT are left alone: they run on the replica the sink is connected to.
    """
    if cluster is None:
        return sql
    if not _PLAIN_NAME.match(cluster) or not _PLAIN_NAME.match(database):
        raise ValueError(f"not a plain ClickHouse identifier: {cluster!r} / {database!r}")
    match = _ON_CLUSTER_AFTER_NAME.match(sql)
    if match is None:
        return sql
    table = match.group(2).rsplit(".", 1)[-1]
    out = f"{match.group(1)} ON CLUSTER {cluster}{sql[match.end():]}"

    def replicated(m: re.Match[str]) -> str:
        args = f"'/clickhouse/tables/{{shard}}/{database}/{table}', '{{replica}}'"
        if m.group(2).strip():
            args += f", {m.group(2).strip()}"
        return f"ENGINE = Replicated{m.group(1)}MergeTree({args})"

    return _ENGINE.sub(replicated, out)



def _database(backend: ClickHouseBackend) -> str:
    return str(backend.query("SELECT currentDatabase()")[0][0])


def applied_versions(backend: ClickHouseBackend, cluster: str | None = None) -> set[int]:
    """The migration versions recorded as applied (creates the bookkeeping table if needed)."""
    database = _database(backend) if cluster else "default"
    backend.execute(render_statement(_CREATE_MIGRATIONS, cluster, database))
    return {int(v) for (v,) in backend.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")}


def migrate(
    backend: ClickHouseBackend,
    settings: Settings | None = None,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
    cluster: str | None = None,
) -> list[int]:
    """Apply the migrations not yet recorded, in version order; return their versions.

    Running it again is a no-op. ``cluster`` (or ``settings.clickhouse_cluster``, when the
    settings have it) switches the DDL to ``ON CLUSTER`` with Replicated engines, see
    :func:`render_statement`.
    """
    if cluster is None and settings is not None:
        cluster = getattr(settings, "clickhouse_cluster", None)
    database = _database(backend) if cluster else "default"
    done = applied_versions(backend, cluster)
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
            backend.execute(render_statement(statement, cluster, database))
        backend.insert(
            MIGRATIONS_TABLE,
            ("version", "name", "applied_at"),
            [(migration.version, migration.name, dt.datetime.now(dt.UTC).replace(tzinfo=None))],
        )
        applied.append(migration.version)
    return applied
