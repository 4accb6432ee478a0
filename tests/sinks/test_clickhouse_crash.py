"""SIGKILL the real ClickHouse sink process (``python -m metering sink clickhouse``) again and
again while it stores about a million usage records; afterwards every event is stored exactly
once and the rollups equal the sums over the raw table.

Real servers only: the session Tansu broker and Debian's clickhouse-server 18.16 (a fresh
database). Merges of ``usage_records`` are stopped for the whole run, so a row inserted twice
would stay visible to ``count()`` (ReplacingMergeTree could otherwise hide it), and the rollups
(materialized views, which see every insert whatever merges do) would count it twice.

Each sink process joins a NEW consumer group: the join takes about 3 s on Tansu instead of
waiting out the killed member's 6 s session, and it leaves the stored offsets as the only way
to know where to resume (committed offsets of the old groups are not even visible).

``CLICKHOUSE_CRASH_RECORDS`` overrides the number of records (default 1,000,000);
``CLICKHOUSE_CRASH_SEED`` replays a kill plan (the seed is printed with ``-s``).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client

from metering.config import Settings
from metering.embedded import ClickHouseServer
from producers import EnvelopePublisher
from tests.workers import ChildProcess

pytestmark = pytest.mark.integration

N_RECORDS = int(os.environ.get("CLICKHOUSE_CRASH_RECORDS", "1000000"))
PER_ENVELOPE = 1000
KILLS = 12
TENANTS = 16
METRICS = ("cpu_time_nanos", "memory_bytes", "disk_read_bytes")
WIDE = Context(prec=60)
REPO = Path(__file__).resolve().parents[2]


class SinkProcess(ChildProcess):
    """``python -m metering sink clickhouse`` configured by environment variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__()
        self.env = env
        self.log_path = log_path

    def start(self, group_prefix: str) -> SinkProcess:
        """Start a sink process in consumer group ``<group_prefix>.clickhouse-sink``."""
        env = dict(self.env, CONSUMER_GROUP_PREFIX=group_prefix)
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {group_prefix} ----\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metering", "-v", "sink", "clickhouse"],
            env=env, cwd=REPO, stdout=open(self.log_path, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the processes' shared log."""
        return self.log_path.read_text(errors="replace")[-chars:]


def sink_env(settings: Settings, clickhouse_url: str, spool_dir: Path) -> dict[str, str]:
    """Environment configuring a sink process like ``settings``, storing to ``clickhouse_url``."""
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=str(settings.kafka_bootstrap_servers),
        TOPIC_PREFIX=settings.topic_prefix,
        TOPIC_PARTITIONS=str(settings.topic_partitions),
        CLICKHOUSE_URL=clickhouse_url,
        SPOOL_DIR=str(spool_dir),  # the sink spools only while ClickHouse is unreachable
        SINK_FLUSH_SECONDS="0.5",
    )
    env.pop("METERING_CONFIG", None)
    return env


@pytest.fixture
def crash_db(clickhouse_server: ClickHouseServer) -> Iterator[tuple[str, Client]]:
    """A fresh database on the session server: its URL and an admin client using it."""
    database = f"crash_{uuid.uuid4().hex[:10]}"
    admin = Client("127.0.0.1", port=clickhouse_server.tcp_port)
    admin.execute(f"CREATE DATABASE {database}")
    client = Client("127.0.0.1", port=clickhouse_server.tcp_port, database=database)
    yield clickhouse_server.url.rsplit("/", 1)[0] + "/" + database, client
    client.disconnect()
    admin.execute(f"DROP DATABASE IF EXISTS {database}")
    admin.disconnect()


def produce_envelopes(
    settings: Settings, n: int, *, seed: int = 7
) -> tuple[int, Decimal, dict[tuple[str, str], Decimal]]:
    """Publish ``n`` records to ``usage.records`` in envelopes of ``PER_ENVELOPE``.

    Records sit in the month before the current one; every tenth envelope also has records
    in the current month, so it is stored by two INSERTs (a kill between them leaves it half
    stored). Returns the count, the exact total and the totals per (tenant, metric).
    """
    from producers import usage_record

    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    boundary = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)
    boundary_ms = int(boundary.timestamp() * 1000)
    publisher = EnvelopePublisher(
        settings.kafka_bootstrap_servers or "", settings.topic("usage.records"), source="vm",
        max_records_per_envelope=PER_ENVELOPE, producer_name="crash-test",
    )
    total = Decimal(0)
    per_key: dict[tuple[str, str], Decimal] = {}
    quantum = Decimal("0.000001")
    made = 0
    envelope = 0
    while made < n:
        tenant = f"tenant-{envelope % TENANTS:02d}"
        size = min(PER_ENVELOPE, n - made)
        straddles = envelope % 10 == 0
        records = []
        for j in range(size):
            i = made + j
            if straddles and j % 3 == 0:
                when = boundary_ms + rng.randrange(0, 3_600_000)  # this month, first hour
            else:
                when = boundary_ms - rng.randrange(1, 20 * 86_400_000)  # the last 20 days before
            metric = METRICS[i % len(METRICS)]
            value = Decimal(rng.randrange(0, 10**12)) * quantum
            records.append(usage_record(
                event_id=f"ev-{i}", tenant_id=tenant, source="vm", resource_id=f"vm-{i % 97}",
                metric=metric, value=value, event_time_ms=when,
                metadata={"region": "eu-west-1"} if i % 2 else {},
            ))
            total = WIDE.add(total, value)
            per_key[(tenant, metric)] = WIDE.add(per_key.get((tenant, metric), Decimal(0)), value)
        publisher.send(records)
        made += size
        envelope += 1
    publisher.flush(120)
    return made, total, per_key


def _count(client: Client) -> int:
    try:
        return int(client.execute("SELECT count() FROM usage_records")[0][0])
    except Exception:  # the table appears when the first sink process migrates
        return 0


def kill_plan(rng: random.Random, n: int) -> list[float | int]:
    """Where each of the :data:`KILLS` kills lands: an ``int`` is a stored-row count to wait
    for (then kill at once: right after an INSERT, usually mid-batch, often between the two
    INSERTs of an envelope that straddles two months), a ``float`` is seconds after the
    process started (anywhere: start-up, the group join, the first batch)."""
    progress: list[float | int] = sorted(int(rng.uniform(0.03, 0.95) * n) for _ in range(KILLS - 3))
    for _ in range(3):
        progress.insert(rng.randrange(len(progress) + 1), rng.uniform(0.2, 7.0))
    return progress


def test_sigkilled_sink_stores_every_record_exactly_once(
    settings: Settings, crash_db: tuple[str, Client], tmp_path: Path
) -> None:
    url, client = crash_db
    from sinks.clickhouse import NativeBackend, migrate

    # the schema exists before any sink runs, so merges can be stopped for the whole run
    with NativeBackend(url) as backend:
        migrate(backend)
    client.execute("SYSTEM STOP MERGES usage_records")

    t0 = time.monotonic()
    n, total, per_key = produce_envelopes(settings, N_RECORDS)
    produced_s = time.monotonic() - t0

    seed = int(os.environ.get("CLICKHOUSE_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    plan = kill_plan(rng, n)
    spool_dir = tmp_path / "spool"
    sink = SinkProcess(sink_env(settings, url, spool_dir), tmp_path / "sink.log")
    prefix = f"{settings.topic_prefix}crash"
    stored_at_kill: list[int] = []
    try:
        for k, where in enumerate(plan):
            before = _count(client)
            sink.start(f"{prefix}{k}")
            if isinstance(where, float) or before >= n:  # (all stored: nothing to wait for)
                time.sleep(where if isinstance(where, float) else rng.uniform(0.2, 3.0))
            else:
                # at least one new INSERT from this process, and the planned progress
                target = max(where, before + 1)
                deadline = time.monotonic() + 120
                while _count(client) < target:
                    assert sink.alive(), sink.log_tail()
                    assert time.monotonic() < deadline, f"no progress past {_count(client)}"
                    time.sleep(0.02)
            assert sink.alive(), sink.log_tail()
            sink.kill()
            stored_at_kill.append(_count(client))

        sink.start(f"{prefix}-final")
        deadline = time.monotonic() + 240
        # running, not just started: when the killed ones stored everything already, a SIGTERM
        # during start-up would end the process before it has its handler (exit -15)
        while _count(client) < n or "resuming from" not in sink.log_tail(10**9).rsplit(
                f"---- start {prefix}-final ----", 1)[-1]:
            assert sink.alive(), sink.log_tail()
            assert time.monotonic() < deadline, f"only {_count(client)} of {n} stored"
            time.sleep(0.2)
        # a clean stop: once the process is gone nothing more can arrive, so the checks
        # below see the final state (a late duplicate INSERT would be counted)
        assert sink.stop() == 0, sink.log_tail()
    finally:
        sink.kill()
    log_text = sink.log_tail(10**9)
    half = log_text.count("is half stored")
    print(f"\n{n} records produced in {produced_s:.1f}s; seed {seed}; plan {plan}; stored at each "
          f"kill: {stored_at_kill}; half-stored envelopes completed: {half}; "
          f"total {time.monotonic() - t0:.1f}s")
    assert len(stored_at_kill) == KILLS >= 10
    # most kills hit a sink that had written part of the data, not an idle or finished one
    assert sum(1 for s in stored_at_kill if 0 < s < n) >= KILLS // 2, stored_at_kill
    assert log_text.count("---- start") == KILLS + 1
    # no outage happened, so nothing was spooled, and nothing is left in the spool
    assert not [p for p in spool_dir.rglob("*.spool")]

    one = lambda sql: client.execute(sql)[0]  # noqa: E731
    # no FINAL anywhere: merges are stopped, a duplicate would be counted
    count, distinct_events, distinct_positions, stored_total = one(
        "SELECT count(), uniqExact(event_id), uniqExact(kafka_partition, kafka_offset, kafka_index), "
        "sum(value) FROM usage_records"
    )
    assert count == n
    assert distinct_events == count
    assert distinct_positions == count
    assert stored_total == total
    # every envelope complete: each message holds record_count rows, indices 0..count-1
    (incomplete,) = one(
        "SELECT count() FROM (SELECT kafka_partition, kafka_offset, count() AS c, "
        "max(record_count) AS rc, max(kafka_index) AS hi FROM usage_records "
        "GROUP BY kafka_partition, kafka_offset) WHERE c != rc OR hi + 1 != rc"
    )
    assert incomplete == 0

    # rollups see every insert: a double insert would show here even if merges had run
    raw_hourly = dict(_grouped(client.execute(
        "SELECT tenant_id, metric, toStartOfHour(event_time) AS h, sum(value), count() "
        "FROM usage_records GROUP BY tenant_id, metric, h")))
    hourly = dict(_grouped(client.execute(
        "SELECT tenant_id, metric, period_start, sum(total), sum(samples) "
        "FROM usage_rollup_hourly GROUP BY tenant_id, metric, period_start")))
    assert hourly == raw_hourly
    daily = client.execute(
        "SELECT tenant_id, metric, sum(total), sum(samples) FROM usage_rollup_daily "
        "GROUP BY tenant_id, metric")
    assert {(t, m): v for t, m, v, _ in daily} == per_key
    assert sum(c for *_, c in daily) == n


def _grouped(rows: list[tuple[Any, ...]]) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    for tenant, metric, period, value, count in rows:
        yield (tenant, metric, period), (value, count)
