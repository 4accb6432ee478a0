"""The ClickHouse sink: backends (native server or in-process chdb), migrations, the sink."""

from sinks.clickhouse.backends import (
    ChdbBackend,
    ClickHouseBackend,
    ClickHouseBusyError,
    ClickHouseError,
    NativeBackend,
    backend_from_settings,
)
from sinks.clickhouse.migrations import migrate
from sinks.clickhouse.sink import ClickHouseSink

__all__ = [
    "ChdbBackend",
    "ClickHouseBackend",
    "ClickHouseBusyError",
    "ClickHouseError",
    "ClickHouseSink",
    "NativeBackend",
    "backend_from_settings",
    "migrate",
]
