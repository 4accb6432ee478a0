"""The ClickHouse sink: backends (native server or in-process chdb), migrations, the sink,
its spool and retention."""

from sinks.clickhouse.backends import (
    ChdbBackend,
    ClickHouseBackend,
    ClickHouseBusyError,
    ClickHouseError,
    NativeBackend,
    backend_from_settings,
)
from sinks.clickhouse.migrations import migrate, render_statement
from sinks.clickhouse.retention import drop_expired_partitions
from sinks.clickhouse.sink import ClickHouseSink, SpoolStats
from sinks.clickhouse.spool import Spool, SpoolCorruptError, SpoolFullError

__all__ = [
    "ChdbBackend",
    "ClickHouseBackend",
    "ClickHouseBusyError",
    "ClickHouseError",
    "ClickHouseSink",
    "NativeBackend",
    "Spool",
    "SpoolCorruptError",
    "SpoolFullError",
    "SpoolStats",
    "backend_from_settings",
    "drop_expired_partitions",
    "migrate",
    "render_statement",
]
