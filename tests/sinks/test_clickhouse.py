"""The ClickHouse sink against real servers: Debian's clickhouse-server 18.16 (native) and
chdb (ClickHouse 26 in-process), with a real Tansu broker. Nothing is mocked.

Each sink run joins a consumer group (about 5 s on Tansu), so the sink tests keep runs few.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from decimal import Context, Decimal, localcontext
from typing import Any

import pytest
from clickhouse_driver import Client
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from metering.config import Settings
from metering.embedded import ClickHouseServer
from producers import EnvelopePublisher, usage_record
from schemas import (
    dead_letter_codec,
    encode_dead_letter,
    envelope_codec,
    quota_alert_codec,
    webhook_delivery_codec,
    window_codec,
)
from sinks.base import Batch, SinkRecord
from sinks.clickhouse import (
    ChdbBackend,
    ClickHouseBackend,
    ClickHouseError,
    ClickHouseSink,
    NativeBackend,
    backend_from_settings,
    drop_expired_partitions,
    migrate,
    render_statement,
)
from sinks.clickhouse.migrations import MIGRATIONS, RETAINED_TABLES, Migration
from sinks.clickhouse.retention import cutoff_month
from sinks.clickhouse.sink import (
    RECORD_COLUMNS,
    WINDOW_COLUMNS,
    _Message,
    _plan_inserts,
    _record_chunk,
    envelope_rows,
    window_row,
)
from sinks.errors import SinkUnavailableError
from sinks.receiver import ReceiverServer
from sinks.webhook import WebhookSink, webhook_id

pytestmark = pytest.mark.integration

JAN_31_LATE = int(dt.datetime(2024, 1, 31, 23, 59, 0, tzinfo=dt.UTC).timestamp() * 1000)
FEB_1 = int(dt.datetime(2024, 2, 1, 0, 0, 0, tzinfo=dt.UTC).timestamp() * 1000)
TINY = Decimal("0.000000001")
HUGE = Decimal("12345678901234567890.123456789")
MAX_DEC = Decimal("99999999999999999999999999999.999999999")
#: Python's default context has 28 digits and rounds decimal(38, 9) arithmetic silently
WIDE = Context(prec=80)


# ---- fixtures ------------------------------------------------------------------------------


def _db_url(server: ClickHouseServer, database: str) -> str:
    return server.url.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(params=["native", "chdb"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClickHouseBackend]:
    """The same tests on both engines; native gets its own database on the session server."""
    if request.param == "native":
        server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
        database = f"t_{uuid.uuid4().hex[:12]}"
        admin = Client("127.0.0.1", port=server.tcp_port)
        admin.execute(f"CREATE DATABASE {database}")
        b: ClickHouseBackend = NativeBackend(_db_url(server, database))
        yield b
        b.close()
        admin.execute(f"DROP DATABASE IF EXISTS {database}")
        admin.disconnect()
    else:
        # chdb is one embedded server per process, bound to one path: always close it
        b = ChdbBackend(str(tmp_path_factory.mktemp("chdb-backend")))
        yield b
        b.close()


# ---- helpers -------------------------------------------------------------------------------


def _usage_record(**kwargs: Any) -> dict[str, Any]:
    # producers.usage_record quantizes in the default 28-digit context, which rejects valid
    # decimal(38, 9) values longer than 28 digits; give it the 38 digits the schema allows
    with localcontext(Context(prec=38)):
        return usage_record(**kwargs)


def _scalar(backend: ClickHouseBackend, sql: str) -> Any:
    return backend.query(sql)[0][0]


def _run_sink_until(
    sink: ClickHouseSink, done: Callable[[], bool], timeout: float = 60.0
) -> None:
    """Run the sink in a thread until ``done()`` holds, then stop it and re-raise its errors."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="clickhouse-sink", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if errors or not thread.is_alive():
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"sink did not get there in {timeout}s: {sink.stats}")
            time.sleep(0.2)
    finally:
        sink.stop()
        thread.join(30)
    assert not thread.is_alive(), "sink did not stop"
    if errors:
        raise errors[0]


def _sink(settings: Settings, backend: ClickHouseBackend, **kwargs: Any) -> ClickHouseSink:
    # a fresh group each time: only offsets stored in ClickHouse can tell a sink where to resume;
    # no spool here (tests/sinks/test_clickhouse_spool.py has those), so an outage raises;
    # no retention: the data here sits in 2024 and must not age out as the calendar moves on
    kwargs.setdefault("spool_dir", None)
    kwargs.setdefault("retention_months", None)
    return ClickHouseSink.from_settings(
        settings,
        settings.kafka_bootstrap_servers or "",
        backend=backend,
        group_id=f"{settings.topic_prefix}ch-{uuid.uuid4().hex[:6]}",
        flush_seconds=0.2,
        **kwargs,
    )


def _produce(
    bootstrap: str, topic: str, values: Sequence[bytes], *, partition: int = 0
) -> list[int]:
    """Produce raw values to one partition; return their offsets."""
    offsets: list[int] = []
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            offsets.append(msg.offset())

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value, key=b"k", partition=partition, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not failures, failures
    return offsets


def _window(
    tenant: str, start_ms: int, values: Sequence[Decimal], score: Decimal
) -> dict[str, Any]:
    return {
        "window_id": f"{tenant}|{start_ms}|60000",
        "tenant_id": tenant,
        "window_start_ms": start_ms,
        "window_end_ms": start_ms + 60_000,
        "totals": [
            {"metric": f"m{i}", "aggregation": "sum", "value": v, "samples": i + 1}
            for i, v in enumerate(values)
        ],
        "sample_count": sum(range(1, len(values) + 1)),
        "score": score,
        "late_samples": 1,
        "has_gap": True,
    }


def _records(tenant: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` records straddling the January/February boundary, with awkward exact values."""
    out = []
    for i in range(start, start + n):
        t = JAN_31_LATE + (i % 7) * 15_000  # every 7: 4 in January, 3 in February
        out.append(_usage_record(
            event_id=f"{tenant}-{i}",
            tenant_id=tenant,
            source="vm",
            resource_id=f"vm-{i % 3}",
            metric="cpu_time_nanos",
            value=HUGE if i % 10 == 0 else TINY * (i + 1),
            event_time_ms=t,
            metadata={"region": "eu'west\\1", "note": f"line\n{i}\t\u00e9"},
        ))
    return out


def _dsum(values: Sequence[Decimal]) -> Decimal:
    total = Decimal(0)
    for v in values:
        total = WIDE.add(total, v)
    return total


def _expected_sum(records: Sequence[dict[str, Any]]) -> Decimal:
    return _dsum([r["value"] for r in records])


def _dead_letters(
    bootstrap: str, topic: str, want: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Read the dead-letter topic from the beginning (assigned, not subscribed: a group join
    on Tansu takes half the session timeout)."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"dlq-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
    })
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            out.append(dead_letter_codec().decode(msg.value() or b""))
    finally:
        consumer.close()
    return out


# ---- backend and schema --------------------------------------------------------------------


def test_migrations_are_idempotent(backend: ClickHouseBackend) -> None:
    known = [m.version for m in MIGRATIONS]
    assert known[:2] == [1, 2]
    assert migrate(backend) == known
    assert migrate(backend) == []  # second run: nothing to do, nothing recorded twice
    versions = backend.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [v for v, _ in versions] == known
    cols = {
        (table, name): typ
        for table, name, typ in backend.query(
            "SELECT table, name, type FROM system.columns WHERE database = currentDatabase()"
        )
    }
    assert [n for (t, n) in cols if t == "usage_records"] == list(RECORD_COLUMNS)
    assert [n for (t, n) in cols if t == "usage_windows"] == list(WINDOW_COLUMNS)
    assert cols[("usage_records", "value")] == "Decimal(38, 9)"
    assert cols[("usage_windows", "metric_values")] == "Array(Decimal(38, 9))"
    engines = dict(backend.query(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
    ))
    assert engines["usage_records"] == engines["usage_windows"] == "ReplacingMergeTree"

    # a later release adds a migration: only that one runs, once
    extra = Migration(1000, "create probe", (
        "CREATE TABLE IF NOT EXISTS probe (x UInt8) ENGINE = MergeTree() ORDER BY x",
    ))
    assert migrate(backend, migrations=(*MIGRATIONS, extra)) == [1000]
    assert migrate(backend, migrations=(*MIGRATIONS, extra)) == []
    assert _scalar(backend, "SELECT count() FROM schema_migrations") == len(known) + 1


def test_decimals_strings_and_times_round_trip_exactly(backend: ClickHouseBackend) -> None:
    migrate(backend)
    values = [TINY, HUGE, HUGE.copy_negate(), MAX_DEC, Decimal("0"), Decimal("-1.5")]
    awkward = [
        "it's", "back\\slash", "new\nline", "tab\there", "\u00e9\u4e2d\U0001f600", '{"j": 1}',
    ]
    envelope = {"records": [
        _usage_record(
            event_id=f"e{i}", tenant_id=awkward[i], source="vm", resource_id="r",
            metric="m", value=v, event_time_ms=FEB_1 + i * 1001,
            metadata={"k": awkward[i], "z": "1"},
        )
        for i, v in enumerate(values)
    ]}
    backend.insert("usage_records", RECORD_COLUMNS,
                   envelope_rows(envelope, topic="t", partition=0, offset=7))
    rows = backend.query(
        "SELECT kafka_index, value, tenant_id, metadata_keys, metadata_values, event_time, "
        "event_time_ms, event_date FROM usage_records ORDER BY kafka_index"
    )
    assert [r[1] for r in rows] == values
    assert [r[2] for r in rows] == awkward
    assert [r[4] for r in rows] == [[a, "1"] for a in awkward]
    assert rows[0][3] == ["k", "z"]
    assert rows[3][5] == dt.datetime(2024, 2, 1, 0, 0, 3)  # naive UTC, whole seconds
    assert rows[3][6] == FEB_1 + 3003
    assert rows[3][7] == dt.date(2024, 2, 1)
    # the sum is computed by ClickHouse in Decimal128: exact, never via float
    assert _scalar(backend, "SELECT sum(value) FROM usage_records") == _dsum(values) == \
        Decimal("99999999999999999999999999998.5")
    assert _scalar(backend, "SELECT sum(value) FROM usage_records WHERE value < 1") == \
        _dsum([TINY, HUGE.copy_negate(), Decimal("-1.5")])

    window = _window("acme", FEB_1, [TINY, HUGE, MAX_DEC], TINY.copy_negate())
    backend.insert("usage_windows", WINDOW_COLUMNS,
                   [window_row(window, topic="w", partition=1, offset=3)])
    (row,) = backend.query("SELECT metric_values, score, window_start, has_gap FROM usage_windows")
    assert row == ([TINY, HUGE, MAX_DEC], TINY.copy_negate(), dt.datetime(2024, 2, 1), 1)

    # aware datetimes are converted, not reinterpreted
    cet = dt.timezone(dt.timedelta(hours=1))
    backend.execute("CREATE TABLE tz (t DateTime('UTC'), d Date) ENGINE = MergeTree() ORDER BY t")
    backend.insert("tz", ["t", "d"],
                   [(dt.datetime(2024, 2, 1, 1, 0, tzinfo=cet), dt.date(1970, 1, 2))])
    assert backend.query("SELECT t, d FROM tz") == [(dt.datetime(2024, 2, 1), dt.date(1970, 1, 2))]


def test_errors_are_translated(backend: ClickHouseBackend) -> None:
    with pytest.raises(ClickHouseError) as info:
        backend.query("SELECT no_such_column FROM system.one")
    assert info.value.code == 47 and isinstance(info.value.__cause__, Exception)
    with pytest.raises(ClickHouseError):
        backend.insert("no_such_table", ["x"], [(1,)])
    assert backend.server_version()[0] in (18, 26)


def test_unreachable_server_is_unavailable_and_settings_pick_the_backend(
    clickhouse_server: ClickHouseServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dead = NativeBackend("clickhouse://default:@127.0.0.1:1/default?connect_timeout=2")
    with pytest.raises(SinkUnavailableError):
        dead.query("SELECT 1")
    dead.close()

    native = backend_from_settings(Settings(clickhouse_url=clickhouse_server.url))
    assert isinstance(native, NativeBackend) and native.server_version()[:2] == (18, 16)
    native.close()
    embedded = backend_from_settings(Settings(chdb_path=str(tmp_path_factory.mktemp("chdb-s"))))
    try:
        assert isinstance(embedded, ChdbBackend) and embedded.query("SELECT 1") == [(1,)]
    finally:
        embedded.close()


def test_plan_keeps_inserts_single_month_in_offset_order() -> None:
    def msg(offset: int, months: Sequence[int]) -> _Message:
        rows = [(m, i, (offset, i)) for i, m in enumerate(months)]
        return _Message(offset, rows, set(), len(rows))

    messages = [msg(0, [1, 1]), msg(1, [1, 2, 1, 2]), msg(2, [2]), msg(3, [1, 2, 3]), msg(4, [3])]
    month_of = {row: m for message in messages for m, _, row in message.rows}
    inserts = _plan_inserts(messages, max_rows=3)
    assert [(ins.month, ins.rows) for ins in inserts] == [
        (1, [(0, 0), (0, 1), (1, 0)]),  # message 1's January rows join the open insert
        (1, [(1, 2)]),  # ... which was full
        (2, [(1, 1), (1, 3), (2, 0)]),  # its February rows continue with message 2
        (2, [(3, 1)]),  # message 3 starts with the open month
        (1, [(3, 0)]),
        (3, [(3, 2), (4, 0)]),
    ]
    for ins in inserts:
        assert {month_of[row] for row in ins.rows} == {ins.month}
    # whatever prefix of the inserts a crash leaves, only the highest message can be partial
    for k in range(1, len(inserts) + 1):
        stored = {row for ins in inserts[:k] for row in ins.rows}
        top = max(offset for offset, _ in stored)
        for message in messages:
            if message.offset < top:
                assert all(row in stored for _, _, row in message.rows), (k, message.offset)


def test_whole_message_columns_equal_the_row_path_and_are_planned_whole() -> None:
    env = {"records": [_usage_record(
        event_id=f"e{i}", tenant_id="acme", source="vm", resource_id="r", metric="m",
        value=TINY * i, event_time_ms=FEB_1 + i * 28_800_000,  # 8 h apart: three days
        metadata={"b": "2", "a": "1"} if i % 2 else {}) for i in range(7)]}
    chunk = _record_chunk(env, "t", 3, 42)
    assert chunk is not None and chunk[0] == 202402
    assert list(zip(*chunk[1], strict=True)) == envelope_rows(env, topic="t", partition=3, offset=42)
    # two months, or a repeated event id: the row path handles those
    assert _record_chunk({"records": _records("acme", 7)}, "t", 0, 0) is None
    assert _record_chunk({"records": env["records"] + env["records"][:1]}, "t", 0, 0) is None

    def whole(offset: int, month: int, n: int) -> _Message:
        return _Message(offset, [], set(), n, (month, [[(offset, i) for i in range(n)]]))

    def by_row(offset: int, months: Sequence[int]) -> _Message:
        rows = [(m, i, ((offset, i),)) for i, m in enumerate(months)]
        return _Message(offset, rows, set(), len(rows))

    messages = [whole(0, 1, 2), by_row(1, [1, 2]), whole(2, 2, 2), whole(3, 2, 1), whole(4, 2, 5)]
    inserts = _plan_inserts(messages, max_rows=4)
    assert [(ins.month, ins.columns(1)[0]) for ins in inserts] == [
        (1, [(0, 0), (0, 1), (1, 0)]),
        (2, [(2, 0), (2, 1), (3, 0), (1, 1)]),  # whole messages first; order inside is free
        (2, [(4, 0), (4, 1), (4, 2), (4, 3)]),  # too big for one INSERT: cut row by row
        (2, [(4, 4)]),
    ]
    assert [[m.offset for m, _ in ins.segments] for ins in inserts] == [[0, 1], [1, 2, 3], [4], [4]]


def _rollups_and_raw(backend: ClickHouseBackend) -> list[tuple[Any, Any]]:
    """(rollup, the same sums over usage_records) per rollup table, no FINAL anywhere."""
    out = []
    for table, period in (("usage_rollup_hourly", "toStartOfHour(event_time)"),
                          ("usage_rollup_daily", "toDate(event_time)")):
        rollup = backend.query(
            f"SELECT tenant_id, metric, period_start, sum(total), sum(samples) FROM {table} "
            "GROUP BY tenant_id, metric, period_start ORDER BY tenant_id, metric, period_start")
        raw = backend.query(
            f"SELECT tenant_id, metric, {period} AS p, sum(value), count() FROM usage_records "
            "GROUP BY tenant_id, metric, p ORDER BY tenant_id, metric, p")
        out.append((rollup, raw))
    return out


def _month_rows(months: Sequence[tuple[int, int]], offset: int) -> list[tuple[Any, ...]]:
    """usage_records rows: two tenants, two metrics, a few hours of each (year, month)."""
    records = []
    for m, (year, month) in enumerate(months):
        start = int(dt.datetime(year, month, 28, 22, 0, tzinfo=dt.UTC).timestamp() * 1000)
        for i in range(12):
            records.append(_usage_record(
                event_id=f"{offset}-{m}-{i}", tenant_id=f"t{i % 2}", source="vm",
                resource_id="vm", metric=("cpu", "mem")[i // 6], value=HUGE if i == 0 else TINY * i,
                event_time_ms=start + i * 1_200_000))  # 20 min apart: 4 hours, 2 days
    return envelope_rows({"records": records}, topic="t", partition=0, offset=offset)


def test_rollups_backfill_follow_inserts_and_retention_drops_whole_months(
    backend: ClickHouseBackend,
) -> None:
    # a database from before the rollups: its records are backfilled when they arrive
    migrate(backend, migrations=[m for m in MIGRATIONS if m.version <= 5])
    old = [(2023, 6), (2023, 10), (2023, 11), (2024, 2)]
    backend.insert("usage_records", RECORD_COLUMNS, _month_rows(old, offset=0))
    assert migrate(backend) == [m.version for m in MIGRATIONS if m.version > 5]
    for rollup, raw in _rollups_and_raw(backend):
        assert rollup == raw and len(raw) > 8
    # from now on the materialized views add every INSERT
    backend.insert("usage_records", RECORD_COLUMNS, _month_rows([(2023, 10), (2024, 2)], 1))
    for rollup, raw in _rollups_and_raw(backend):
        assert rollup == raw
    assert _scalar(backend, "SELECT sum(samples) FROM usage_rollup_daily") == 6 * 12

    # 36 months before November 2026: November 2023 is kept, October 2023 goes
    now = dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
    assert cutoff_month(36, now) == 202311 and cutoff_month(1, dt.datetime(2026, 1, 3)) == 202512
    dropped = drop_expired_partitions(backend, 36, now=now)
    assert dropped == {table: [202306, 202310] for table in
                       ("usage_records", "usage_rollup_hourly", "usage_rollup_daily")}
    assert set(dropped) <= set(RETAINED_TABLES)
    assert [m for (m,) in backend.query(
        "SELECT DISTINCT toYYYYMM(event_date) AS m FROM usage_records ORDER BY m")] == [202311, 202402]
    for rollup, raw in _rollups_and_raw(backend):
        assert rollup == raw  # the rollups lost the same months as the raw table
    assert drop_expired_partitions(backend, 36, now=now) == {}


def test_cluster_mode_renders_on_cluster_and_replicated_engines() -> None:
    create = render_statement(MIGRATIONS[0].statements[0], "billing", "metering")
    assert create.lstrip().startswith("CREATE TABLE IF NOT EXISTS usage_records ON CLUSTER billing (")
    assert ("ENGINE = ReplicatedReplacingMergeTree("
            "'/clickhouse/tables/{shard}/metering/usage_records', '{replica}')") in create
    hourly = [m for m in MIGRATIONS if m.name == "create usage_rollup_hourly"][0].statements
    rendered = [render_statement(sql, "billing", "metering") for sql in hourly]
    assert "ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/metering/usage_rollup_hourly'" \
        in rendered[0]
    assert rendered[1] == "TRUNCATE TABLE IF EXISTS usage_rollup_hourly ON CLUSTER billing"
    assert rendered[2] == hourly[2]  # INSERT ... SELECT runs on the replica the sink uses
    assert rendered[3].startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS usage_rollup_hourly_mv ON CLUSTER billing TO ")
    drop = render_statement("ALTER TABLE usage_records DROP PARTITION 202301", "billing", "db")
    assert drop == "ALTER TABLE usage_records ON CLUSTER billing DROP PARTITION 202301"
    # without a cluster nothing changes; a name that is not an identifier is refused
    assert render_statement(MIGRATIONS[0].statements[0], None) == MIGRATIONS[0].statements[0]
    with pytest.raises(ValueError):
        render_statement("ALTER TABLE x DROP PARTITION 1", "a; DROP", "db")


# ---- the sink through a real broker ----------------------------------------------------------


def test_sink_end_to_end_with_dead_letter(settings: Settings, backend: ClickHouseBackend) -> None:
    bootstrap = settings.kafka_bootstrap_servers or ""
    records = _records("acme", 180) + _records("globex", 120)
    publisher = EnvelopePublisher(bootstrap, settings.topic("usage.records"), source="vm",
                                  max_records_per_envelope=50)
    envelopes = publisher.send(records)
    publisher.flush()
    _produce(bootstrap, settings.topic("usage.records"), [b"\x00garbage that is not avro"])
    windows = [
        _window("acme", FEB_1, [TINY, HUGE], HUGE),
        _window("acme", FEB_1 - 60_000, [Decimal("2.5")], TINY),
        _window("globex", FEB_1, [MAX_DEC], Decimal("-1")),
    ]
    window_offsets = _produce(bootstrap, settings.topic("usage.windows"),
                              [window_codec().encode(w) for w in windows], partition=1)
    alert = {
        "alert_id": f"acme|score|month|{FEB_1}|80", "tenant_id": "acme", "metric": "score",
        "period": "month", "period_start_ms": FEB_1, "threshold_percent": 80,
        "limit": MAX_DEC, "used": HUGE, "crossed_at_window_end_ms": FEB_1 + 60_000,
    }
    (alert_offset,) = _produce(bootstrap, settings.topic("quota.alerts"),
                               [quota_alert_codec().encode(alert)])
    # a window the webhook sink gave up on, as it dead-letters it
    webhook_reason = "webhook delivery failed after 3 attempt(s); last: HTTP 503 (busy)"
    (webhook_dead_offset,) = _produce(bootstrap, settings.topic("usage.dlq"), [encode_dead_letter(
        topic=settings.topic("usage.windows"), partition=1, offset=window_offsets[0],
        stage="webhook-sink", reason=webhook_reason, key=b"acme",
        payload=window_codec().encode(windows[0]),
    )])

    sink = _sink(settings, backend)
    _run_sink_until(sink, lambda: (
        _scalar(backend, "SELECT count() FROM usage_records") >= len(records)
        and _scalar(backend, "SELECT count() FROM usage_windows") >= len(windows)
        and _scalar(backend, "SELECT count() FROM quota_alerts") >= 1
        # the webhook's dead letter and the one this sink wrote for the garbage message
        and _scalar(backend, "SELECT count() FROM dead_letters") >= 2
        and sink.stats.dead_letters >= 1
    ))

    assert _scalar(backend, "SELECT count() FROM usage_records") == 300
    assert _scalar(backend, "SELECT uniqExact(event_id) FROM usage_records") == 300
    for tenant, expect in (("acme", records[:180]), ("globex", records[180:])):
        got = _scalar(backend, f"SELECT sum(value) FROM usage_records WHERE tenant_id = '{tenant}'")
        assert got == _expected_sum(expect)
    by_month = dict(backend.query(
        "SELECT toYYYYMM(event_date), count() FROM usage_records GROUP BY toYYYYMM(event_date)"
    ))
    january = sum(1 for r in records if r["event_time_ms"] < FEB_1)
    assert 0 < january < 300 and by_month == {202401: january, 202402: 300 - january}
    # every envelope complete; kafka_index runs 0..record_count-1
    per_message = backend.query(
        "SELECT kafka_topic, kafka_partition, kafka_offset, count(), max(record_count), "
        "min(kafka_index), max(kafka_index) FROM usage_records "
        "GROUP BY kafka_topic, kafka_partition, kafka_offset"
    )
    assert len(per_message) == envelopes == 7
    assert all(n == rc == hi + 1 and lo == 0 for _, _, _, n, rc, lo, hi in per_message)
    (meta,) = backend.query(
        "SELECT metadata_keys, metadata_values, source FROM usage_records "
        "WHERE event_id = 'acme-3'"
    )
    assert meta == (["note", "region"], ["line\n3\t\u00e9", "eu'west\\1"], "vm")

    stored = backend.query(
        "SELECT window_id, metric_values, metric_samples, score, kafka_partition, kafka_offset "
        "FROM usage_windows ORDER BY kafka_offset"
    )
    assert [(w[0], w[1], w[3]) for w in stored] == [
        (w["window_id"], [t["value"] for t in w["totals"]], w["score"]) for w in windows
    ]
    assert [w[4:] for w in stored] == [(1, o) for o in window_offsets]
    assert _scalar(backend, "SELECT sum(score) FROM usage_windows") == \
        _dsum([HUGE, TINY, Decimal(-1)])

    dlq = _dead_letters(bootstrap, settings.topic("usage.dlq"), want=2)
    assert sorted(d["stage"] for d in dlq) == ["clickhouse-sink", "webhook-sink"]
    (dead,) = [d for d in dlq if d["stage"] == "clickhouse-sink"]
    assert dead["source_topic"] == settings.topic("usage.records")
    assert dead["payload"] == b"\x00garbage that is not avro"
    assert "UsageEnvelope" in dead["reason"]

    assert backend.query(
        "SELECT alert_id, period_start, limit_value, used, threshold_percent, kafka_offset "
        "FROM quota_alerts"
    ) == [(alert["alert_id"], dt.datetime(2024, 2, 1), MAX_DEC, HUGE, 80, alert_offset)]
    stored_dead = backend.query(
        "SELECT stage, source_topic, payload_bytes FROM dead_letters ORDER BY stage"
    )
    assert stored_dead == [
        ("clickhouse-sink", settings.topic("usage.records"), len(dead["payload"])),
        ("webhook-sink", settings.topic("usage.windows"), len(window_codec().encode(windows[0]))),
    ]
    # the webhook's dead letter is stored in dead_letters only: webhook_deliveries is filled
    # from webhook.deliveries alone, whose records name the webhook-id the receiver saw
    assert backend.query(
        "SELECT reason, source_offset, kafka_offset FROM dead_letters WHERE stage = 'webhook-sink'"
    ) == [(webhook_reason, window_offsets[0], webhook_dead_offset)]
    assert _scalar(backend, "SELECT count() FROM webhook_deliveries") == 0


def _delivery(window: dict[str, Any], offset: int, *, attempts: int = 1, status: str = "delivered",
              at_ms: int = FEB_1 + 90_000) -> dict[str, Any]:
    """A WebhookDelivery as the webhook sink records a delivered window (no ``last_error`` or
    ``reason``: the schema's defaults, empty, fill them in)."""
    return {
        "webhook_id": webhook_id(window["window_id"]), "window_id": window["window_id"],
        "alert_id": "", "tenant_id": window["tenant_id"], "status": status, "attempts": attempts,
        "last_status": 409 if status == "duplicate" else 200, "delivered_at_ms": at_ms,
        "source_topic": "usage.windows", "source_partition": 1, "source_offset": offset,
        "payload_format": "usage.window",
    }


def test_delivery_records_are_stored_once_beside_dead_letters_across_a_restart(
    settings: Settings, backend: ClickHouseBackend
) -> None:
    """``webhook.deliveries`` alone feeds ``webhook_deliveries``; the webhook sink's dead letters
    on ``usage.dlq`` go to ``dead_letters`` only. Each topic resumes from its own table's stored
    offsets, so a restart stores every new message of both once, though their offsets
    interleave (usage.dlq's new offsets lie below webhook.deliveries' highest stored one)."""
    bootstrap = settings.kafka_bootstrap_servers or ""
    deliveries, dlq = settings.topic("webhook.deliveries"), settings.topic("usage.dlq")
    windows = [_window("acme", FEB_1 + i * 60_000, [TINY], TINY) for i in range(6)]
    alert_id = f"acme|score|month|{FEB_1}|80"
    alert = {**_delivery(windows[0], 0), "webhook_id": webhook_id(alert_id, "alert"),
             "window_id": "", "alert_id": alert_id, "status": "duplicate", "last_status": 409,
             "source_topic": "quota.alerts", "source_partition": 0, "source_offset": 9,
             "payload_format": "quota.alert"}
    # January's last second and February: one INSERT per month, each stored once
    first = [_delivery(windows[0], 0, attempts=3, at_ms=FEB_1 - 1), _delivery(windows[1], 1), alert]
    first_offsets = _produce(bootstrap, deliveries, [webhook_delivery_codec().encode(d) for d in first])

    def dead(window: dict[str, Any], offset: int) -> bytes:
        return encode_dead_letter(
            topic="usage.windows", partition=1, offset=offset, stage="webhook-sink",
            reason="webhook delivery failed after 2 attempt(s); last: HTTP 500", key=b"acme",
            payload=window_codec().encode(window))

    (dead_offset,) = _produce(bootstrap, dlq, [dead(windows[2], 2)])
    assert first_offsets == [0, 1, 2] and dead_offset == 0

    sink = _sink(settings, backend)
    assert set(sink.codecs) >= {deliveries, dlq}
    _run_sink_until(sink, lambda: (
        _scalar(backend, "SELECT count() FROM webhook_deliveries") >= 3
        and _scalar(backend, "SELECT count() FROM dead_letters") >= 1
    ))
    columns = ("webhook_id, window_id, alert_id, tenant_id, status, attempts, last_status, "
               "last_error, reason, delivered_at, delivered_at_ms, source_topic, source_partition, "
               "source_offset, kafka_topic, kafka_partition, kafka_offset")
    stored = backend.query(f"SELECT {columns} FROM webhook_deliveries "
                           f"WHERE kafka_topic = '{deliveries}' ORDER BY kafka_offset")
    assert stored == [
        (webhook_id(windows[0]["window_id"]), windows[0]["window_id"], "", "acme", "delivered", 3,
         200, "", "", dt.datetime(2024, 1, 31, 23, 59, 59), FEB_1 - 1, "usage.windows", 1, 0,
         deliveries, 0, 0),
        (webhook_id(windows[1]["window_id"]), windows[1]["window_id"], "", "acme", "delivered", 1,
         200, "", "", dt.datetime(2024, 2, 1, 0, 1, 30), FEB_1 + 90_000, "usage.windows", 1, 1,
         deliveries, 0, 1),
        (webhook_id(alert_id, "alert"), "", alert_id, "acme", "duplicate", 1, 409, "", "",
         dt.datetime(2024, 2, 1, 0, 1, 30), FEB_1 + 90_000, "quota.alerts", 0, 9, deliveries, 0, 2),
    ]
    assert sorted(backend.query(
        "SELECT toYYYYMM(delivered_at), count() FROM webhook_deliveries "
        f"WHERE kafka_topic = '{deliveries}' GROUP BY toYYYYMM(delivered_at)"
    )) == [(202401, 1), (202402, 2)]
    # the dead letter is not a webhook_deliveries row (its record on webhook.deliveries would be)
    assert _scalar(backend, "SELECT count() FROM webhook_deliveries") == 3
    assert backend.query("SELECT stage, source_offset, kafka_topic, kafka_offset FROM dead_letters") == [
        ("webhook-sink", 2, dlq, 0)]

    # merges off: a row inserted twice would stay visible instead of collapsing
    backend.execute("SYSTEM STOP MERGES webhook_deliveries")
    backend.execute("SYSTEM STOP MERGES dead_letters")
    # a new sink (a NEW group: only what ClickHouse stored can tell it where to resume) is told
    # each topic's own next offset, not the table's highest
    probe = _sink(settings, backend)
    try:
        assert probe.resume_offsets([(deliveries, 0), (deliveries, 1), (dlq, 0), (dlq, 1)]) == {
            (deliveries, 0): 3, (dlq, 0): 1}
    finally:
        probe.close_clients()
        probe.close()

    # more of both: usage.dlq's offsets 1 and 2 lie below webhook.deliveries' stored 2; and a
    # second record of windows[1] (re-delivered after a crash before the webhook sink committed)
    second = [_delivery(windows[3], 3), _delivery(windows[1], 1)]
    assert _produce(bootstrap, deliveries, [webhook_delivery_codec().encode(d) for d in second]) == [3, 4]
    assert _produce(bootstrap, deliveries, [webhook_delivery_codec().encode(_delivery(windows[4], 4))],
                    partition=1) == [0]
    assert _produce(bootstrap, dlq, [dead(windows[5], 5), dead(windows[2], 2)]) == [1, 2]

    again = _sink(settings, backend)
    _run_sink_until(again, lambda: (
        _scalar(backend, "SELECT count() FROM webhook_deliveries") >= 6
        and _scalar(backend, "SELECT count() FROM dead_letters") >= 3
    ))
    assert again.stats.records_written == 5  # only the new messages came back
    assert backend.query(
        "SELECT count(), uniqExact(kafka_topic, kafka_partition, kafka_offset) FROM webhook_deliveries"
    ) == [(6, 6)]
    assert sorted(backend.query(
        "SELECT kafka_topic, kafka_partition, kafka_offset, status FROM webhook_deliveries"
    )) == sorted([(deliveries, 0, o, "delivered") for o in (0, 1, 3, 4)]
                 + [(deliveries, 0, 2, "duplicate"), (deliveries, 1, 0, "delivered")])
    assert backend.query(
        "SELECT count(), uniqExact(kafka_topic, kafka_partition, kafka_offset) FROM dead_letters"
    ) == [(3, 3)]
    # rows are deliveries as they happened; unique deliveries are uniqExact(webhook_id)
    assert _scalar(backend, "SELECT uniqExact(webhook_id) FROM webhook_deliveries "
                            "WHERE status IN ('delivered', 'duplicate')") == 5
    assert _scalar(backend, "SELECT count() FROM webhook_deliveries WHERE webhook_id = "
                            f"'{webhook_id(windows[1]['window_id'])}'") == 2


def test_dead_lettered_reports_are_stored_from_their_records_under_the_ids_sent(
    settings: Settings, backend: ClickHouseBackend
) -> None:
    """The webhook sink in the report format, against a receiver that refuses one report (400,
    dead-lettered at once) and keeps failing another (500 until the attempts run out), and a
    window whose report cannot be built: the ClickHouse sink stores each outcome once in
    ``webhook_deliveries``, from its WebhookDelivery record, under the report-scoped id the
    receiver saw (never the default format's id), with status, reason and last error; the
    dead letters themselves go to ``dead_letters`` only."""
    bootstrap = settings.kafka_bootstrap_servers or ""
    windows_topic, deliveries = settings.topic("usage.windows"), settings.topic("webhook.deliveries")
    # reports of 3, 0, and a score beyond int64 (never attempted)
    windows = [_window("acme", FEB_1 + i * 60_000, [TINY], score)
               for i, score in enumerate((Decimal("2.5"), TINY, MAX_DEC))]
    batch = Batch(windows_topic, 1, [SinkRecord(windows_topic, 1, i, b"acme", w, FEB_1)
                                     for i, w in enumerate(windows)])
    # max_concurrency=1: request 1 is windows[0]'s, requests 2 and 3 windows[1]'s
    with ReceiverServer(failure_plan=lambda n: "400" if n == 1 else "500") as receiver:
        webhook = WebhookSink.from_settings(
            settings, bootstrap, url=receiver.url, payload_format="report",
            report_name="billing_score", max_attempts=2, max_concurrency=1,
            backoff_base_seconds=0.01, backoff_max_seconds=0.05)
        try:
            webhook.write(batch)  # write() only: no group to join
        finally:
            webhook.close()
            webhook.close_clients()
        posts = receiver.posts_by_id()
    assert (webhook.delivered, webhook.dead_lettered, webhook.delivery_records) == (0, 3, 3)
    ids = [webhook_id(w["window_id"], "report:billing_score") for w in windows]
    assert posts == {ids[0]: 1, ids[1]: 2}  # the webhook-id headers the receiver got

    sink = _sink(settings, backend)
    _run_sink_until(sink, lambda: (
        _scalar(backend, "SELECT count() FROM webhook_deliveries") >= 3
        and _scalar(backend, "SELECT count() FROM dead_letters") >= 3
    ))
    stored = backend.query(
        "SELECT source_offset, webhook_id, window_id, status, attempts, last_status, reason, "
        "kafka_topic, last_error FROM webhook_deliveries ORDER BY source_offset")
    reasons = dict(backend.query(
        "SELECT source_offset, reason FROM dead_letters WHERE stage = 'webhook-sink'"))
    assert [row[:-1] for row in stored] == [
        (i, ids[i], windows[i]["window_id"], "dead_lettered", attempts, status, reasons[i], deliveries)
        for i, (attempts, status) in enumerate(((1, 400), (2, 500), (0, 0)))
    ]
    assert reasons[0].startswith("webhook delivery failed after 1 attempt(s); last: HTTP 400")
    assert reasons[1] == "webhook delivery failed after 2 attempt(s); last: HTTP 500"
    assert reasons[2].startswith("webhook delivery not attempted: cannot build the report payload")
    errors = [row[-1] for row in stored]
    assert errors[0].startswith("not retried: ") and errors[0] in reasons[0]
    assert errors[1] == ""  # a 5xx has a status, no error text
    assert errors[2].startswith("cannot build the report payload") and errors[2] in reasons[2]
    # the ids line up with what the receiver saw, across statuses
    assert _scalar(backend, "SELECT uniqExact(webhook_id) FROM webhook_deliveries") == 3
    assert set(posts) < {row[1] for row in stored}
    assert not {row[1] for row in stored} & {webhook_id(w["window_id"]) for w in windows}


def test_restart_resumes_from_clickhouse_not_from_committed_offsets(
    settings: Settings, backend: ClickHouseBackend
) -> None:
    bootstrap = settings.kafka_bootstrap_servers or ""
    publisher = EnvelopePublisher(bootstrap, settings.topic("usage.records"), source="vm",
                                  max_records_per_envelope=20)
    first = _records("acme", 60) + _records("globex", 40)
    publisher.send(first)
    publisher.flush()
    windows = [_window("acme", FEB_1 + i * 60_000, [TINY * (i + 1)], TINY) for i in range(3)]
    _produce(bootstrap, settings.topic("usage.windows"),
             [window_codec().encode(w) for w in windows[:2]])

    sink = _sink(settings, backend)
    _run_sink_until(sink, lambda: (
        _scalar(backend, "SELECT count() FROM usage_records") >= 100
        and _scalar(backend, "SELECT count() FROM usage_windows") >= 2
    ))

    # merges off: a double insert would stay visible as extra rows instead of collapsing
    backend.execute("SYSTEM STOP MERGES usage_records")
    backend.execute("SYSTEM STOP MERGES usage_windows")
    second = _records("acme", 30, start=60) + _records("initech", 25)
    new_envelopes = publisher.send(second)
    publisher.flush()
    _produce(bootstrap, settings.topic("usage.windows"), [window_codec().encode(windows[2])])

    # a NEW group: committed offsets cannot help, only what ClickHouse stored
    again = _sink(settings, backend)
    _run_sink_until(again, lambda: (
        _scalar(backend, "SELECT count() FROM usage_records") >= 155
        and _scalar(backend, "SELECT count() FROM usage_windows") >= 3
    ))
    assert again.stats.records_written == new_envelopes + 1  # only the new messages came back
    assert _scalar(backend, "SELECT count() FROM usage_records") == 155
    assert _scalar(backend, "SELECT uniqExact(event_id) FROM usage_records") == 155
    assert _scalar(backend, "SELECT count() FROM usage_windows") == 3
    assert _scalar(backend, "SELECT sum(value) FROM usage_records") == _expected_sum(first + second)


def test_half_stored_message_across_two_months_is_completed_once(
    settings: Settings, backend: ClickHouseBackend
) -> None:
    bootstrap = settings.kafka_bootstrap_servers or ""
    topic = settings.topic("usage.records")

    def rec(i: int, when: int) -> dict[str, Any]:
        return _usage_record(event_id=f"e{i}", tenant_id="acme", source="vm", resource_id="vm-1",
                             metric="cpu_time_nanos", value=WIDE.add(HUGE, TINY * i),
                             event_time_ms=when)

    def envelope(records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"envelope_id": uuid.uuid4().hex, "source": "vm", "producer": "test",
                "sent_at_ms": FEB_1, "watermark_ms": None, "records": records}

    e0 = envelope([rec(0, JAN_31_LATE), rec(1, JAN_31_LATE), rec(2, JAN_31_LATE)])
    # January and February interleaved: two INSERTs, and the crash came between them
    e1 = envelope([rec(3, JAN_31_LATE), rec(4, FEB_1), rec(5, JAN_31_LATE), rec(6, FEB_1)])
    e2 = envelope([rec(7, FEB_1), rec(8, FEB_1)])
    o0, o1, o2 = _produce(bootstrap, topic, [envelope_codec().encode(e) for e in (e0, e1, e2)])

    # what a sink had stored when it died: the January run [e0, January rows of e1]
    migrate(backend)
    rows = envelope_rows(e0, topic=topic, partition=0, offset=o0)
    rows += [r for r in envelope_rows(e1, topic=topic, partition=0, offset=o1)
             if r[RECORD_COLUMNS.index("event_date")].month == 1]
    backend.insert("usage_records", RECORD_COLUMNS, rows)
    backend.execute("SYSTEM STOP MERGES usage_records")

    sink = _sink(settings, backend)
    assert sink.resume_offsets([(topic, 0), (topic, 1)]) == {(topic, 0): o1}
    _run_sink_until(sink, lambda: _scalar(backend, "SELECT count() FROM usage_records") >= 9)

    assert sink.stats.records_written == 2  # e1 and e2; e0 was never re-read
    assert _scalar(backend, "SELECT count() FROM usage_records") == 9
    per_row = backend.query(
        "SELECT kafka_offset, kafka_index, count() FROM usage_records "
        "GROUP BY kafka_offset, kafka_index ORDER BY kafka_offset, kafka_index"
    )
    assert per_row == [(o0, i, 1) for i in range(3)] + [(o1, i, 1) for i in range(4)] + \
        [(o2, i, 1) for i in range(2)]
    assert _scalar(backend, "SELECT sum(value) FROM usage_records") == \
        Decimal("111111110111111111011.111111137")  # 9 * HUGE + 36 * TINY
    assert sorted(backend.query(
        "SELECT toYYYYMM(event_date), count() FROM usage_records GROUP BY toYYYYMM(event_date)"
    )) == [(202401, 5), (202402, 4)]


# ---- write() called directly: retries and outages, without a consumer group --------------


def _envelope_batch(topic: str, first_offset: int, n: int, per: int = 4) -> Batch:
    """``n`` envelope messages from ``first_offset``, each with records in two months."""
    batch = Batch(topic, 0)
    for offset in range(first_offset, first_offset + n):
        records = [
            _usage_record(event_id=f"o{offset}-{i}", tenant_id="acme", source="vm",
                          resource_id="vm", metric="m", value=WIDE.add(HUGE, TINY * i),
                          event_time_ms=JAN_31_LATE if i % 2 else FEB_1)
            for i in range(per)
        ]
        batch.records.append(SinkRecord(topic, 0, offset, b"acme", {"records": records}, 0))
    return batch


def test_write_skips_what_is_stored_when_a_batch_comes_again(
    settings: Settings, backend: ClickHouseBackend
) -> None:
    sink = _sink(settings, backend)
    try:
        topic = sink.records_topic
        sink.write(_envelope_batch(topic, 0, 3))
        sink.write(_envelope_batch(topic, 0, 3))  # the base retries a whole batch after backoff
        sink.write(_envelope_batch(topic, 2, 3))  # overlapping re-delivery
        assert _scalar(backend, "SELECT count() FROM usage_records") == 5 * 4
        assert backend.query(
            "SELECT uniqExact(kafka_offset, kafka_index), count() FROM usage_records"
        ) == [(20, 20)]
        assert sink.resume_offsets([(topic, 0)]) == {(topic, 0): 5}
    finally:
        sink.close_clients()


def test_write_survives_a_server_outage_without_duplicates(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = ClickHouseServer(root=tmp_path_factory.mktemp("ch-outage")).start()
    backend = NativeBackend(server.url + "?connect_timeout=2&send_receive_timeout=10")
    sink = _sink(settings, backend)
    try:
        topic = sink.records_topic
        sink.write(_envelope_batch(topic, 0, 2))
        backend.close()  # else 18.16 waits 10 s for the idle connection before it stops
        server.stop()
        with pytest.raises(SinkUnavailableError):
            sink.write(_envelope_batch(topic, 2, 2))
        server.start()
        # the failed INSERT may have landed: the sink asks ClickHouse before retrying
        sink.write(_envelope_batch(topic, 2, 2))
        sink.write(_envelope_batch(topic, 2, 2))
        assert backend.query(
            "SELECT uniqExact(kafka_offset, kafka_index), count() FROM usage_records"
        ) == [(16, 16)]
    finally:
        sink.close_clients()
        backend.close()
        server.cleanup()
