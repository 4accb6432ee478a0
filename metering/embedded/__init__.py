"""Real servers the project starts by itself: Tansu (Kafka), a private ClickHouse server and a
private Prometheus (for the container producer's tests)."""

from metering.embedded.broker import TansuBroker
from metering.embedded.clickhouse_server import ClickHouseServer
from metering.embedded.ports import free_port
from metering.embedded.prometheus import PrometheusServer

__all__ = ["ClickHouseServer", "PrometheusServer", "TansuBroker", "free_port"]
