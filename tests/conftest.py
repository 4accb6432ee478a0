"""Session fixtures that start real servers. A server that cannot start fails the run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from metering.config import Settings, load_settings
from metering.embedded import ClickHouseServer, TansuBroker
from metering.topics import ensure_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A real Tansu broker on a free loopback port (memory storage)."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    b = TansuBroker(log_path=log).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """Debian's clickhouse-server with a private config, native protocol on a free port."""
    server = ClickHouseServer(root=tmp_path_factory.mktemp("clickhouse")).start()
    yield server
    server.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix, so tests sharing the session broker never see each other."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def settings(broker: TansuBroker, topic_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at the session broker, with this test's own topics created."""
    s = load_settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=topic_prefix,
        topic_partitions=2,
        chdb_path=str(tmp_path_factory.mktemp("chdb")),
        worker_datadir=str(tmp_path_factory.mktemp("faust")),
    )
    ensure_topics(s, broker.bootstrap_servers)
    return s
