"""Real servers the project starts by itself: Tansu (Kafka) and a private ClickHouse server."""

from metering.embedded.broker import TansuBroker
from metering.embedded.clickhouse_server import ClickHouseServer
from metering.embedded.ports import free_port

__all__ = ["ClickHouseServer", "TansuBroker", "free_port"]
