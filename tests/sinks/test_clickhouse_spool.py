"""The ClickHouse sink's spool: ClickHouse outages (a private clickhouse-server stopped and
started again), SIGKILLs while spooling and while draining, the disk budget, and the spool
file format itself.

Real servers only: Tansu (session broker) and Debian's clickhouse-server 18.16, one private
instance per outage test (``ClickHouseServer.stop()`` keeps the data directory, so stop + start
is an outage, not a reset).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import pytest

from metering.config import Settings, load_settings
from metering.embedded import ClickHouseServer
from metering.errors import ConfigError
from producers import EnvelopePublisher, usage_record
from sinks.clickhouse import ClickHouseSink, NativeBackend
from sinks.clickhouse.spool import (
    Spool,
    SpoolCorruptError,
    SpoolEntry,
    SpoolFullError,
    inspect_spool,
    spool_files,
)
from tests.workers import ChildProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WIDE = Context(prec=60)
QUANTUM = Decimal("0.000001")


# ---- helpers -------------------------------------------------------------------------------


class Produced:
    """What was published: record count, exact total, envelope count."""

    def __init__(self) -> None:
        self.records = 0
        self.total = Decimal(0)
        self.envelopes = 0
        self._next = 0

    def publish(self, settings: Settings, n: int, per_envelope: int = 500, seed: int = 1) -> int:
        """Publish ``n`` more records (event times in the last days, values exact); return
        the envelopes published."""
        rng = random.Random(seed + self._next)
        now_ms = int(time.time() * 1000)
        publisher = EnvelopePublisher(settings.kafka_bootstrap_servers or "",
                                      settings.topic("usage.records"), source="vm",
                                      max_records_per_envelope=per_envelope)
        envelopes = 0
        for start in range(0, n, per_envelope):
            records = []
            for i in range(self._next + start, self._next + min(start + per_envelope, n)):
                value = Decimal(rng.randrange(0, 10**12)) * QUANTUM
                records.append(usage_record(
                    event_id=f"ev-{i}", tenant_id=f"tenant-{i % 5}", source="vm",
                    resource_id=f"vm-{i % 13}", metric=("cpu_time_nanos", "memory_bytes")[i % 2],
                    value=value, event_time_ms=now_ms - rng.randrange(0, 3 * 86_400_000),
                ))
                self.total = WIDE.add(self.total, value)
            envelopes += publisher.send(records)
        publisher.flush(60)
        self._next += n
        self.records += n
        self.envelopes += envelopes
        return envelopes


def _wait(what: str, done: Callable[[], bool], timeout: float = 60.0,
          alive: Callable[[], bool] | None = None, log: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if alive is not None and not alive():
            raise AssertionError(f"died while waiting for {what}: {log() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log() if log else ''}")
        time.sleep(0.05)


def _scalar(url: str, sql: str) -> Any:
    """One value from a fresh connection (the server may have been restarted)."""
    with NativeBackend(url) as backend:
        return backend.query(sql)[0][0]


def _count_or_zero(url: str) -> int:
    try:
        return int(_scalar(url + "?connect_timeout=1", "SELECT count() FROM usage_records"))
    except Exception:  # the server is down: nothing to count
        return 0


def _assert_exactly_once(url: str, produced: Produced) -> None:
    """Raw table, positions and rollups against what was produced."""
    with NativeBackend(url) as backend:
        count, events, positions, total = backend.query(
            "SELECT count(), uniqExact(event_id), "
            "uniqExact(kafka_partition, kafka_offset, kafka_index), sum(value) FROM usage_records"
        )[0]
        assert (count, events, positions, total) == (
            produced.records, produced.records, produced.records, produced.total)
        # materialized views see every INSERT: a row inserted twice would be summed twice
        for table in ("usage_rollup_hourly", "usage_rollup_daily"):
            assert backend.query(f"SELECT sum(total), sum(samples) FROM {table}")[0] == (
                produced.total, produced.records), table


def _spooled(directory: Path) -> tuple[int, set[tuple[str, int, int]]]:
    """(messages, distinct positions) in the spool files under ``directory``."""
    messages = 0
    positions: set[tuple[str, int, int]] = set()
    for sub in [directory, *([p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else [])]:
        for f in inspect_spool(sub):
            messages += f.records
            positions.update((f.topic, f.partition, o) for o in f.offsets)
    return messages, positions


def _all_spool_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [f for sub in [directory, *directory.iterdir()] if sub.is_dir() for f in spool_files(sub)]


class SinkThread:
    """A ClickHouseSink running in a thread of this process."""

    def __init__(self, sink: ClickHouseSink) -> None:
        self.sink = sink
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="ch-sink", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sink.run()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def alive(self) -> bool:
        """Whether the sink still runs."""
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop the sink and re-raise what it raised."""
        self.sink.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "sink did not stop"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """A clickhouse-server of this test alone: it will be stopped and started."""
    server = ClickHouseServer(root=tmp_path_factory.mktemp("ch-private")).start()
    yield server
    server.cleanup()


def _sink(settings: Settings, url: str, spool_dir: Path, group: str, **kwargs: Any) -> ClickHouseSink:
    return ClickHouseSink.from_settings(
        settings, settings.kafka_bootstrap_servers or "",
        backend=NativeBackend(url + "?connect_timeout=2&send_receive_timeout=20"),
        owns_backend=True, group_id=group, spool_dir=spool_dir, flush_seconds=0.2, **kwargs,
    )


# ---- the spool file itself ------------------------------------------------------------------


def _entries(first: int, n: int, size: int = 10) -> list[SpoolEntry]:
    return [SpoolEntry(o, 1_000 + o, None if o % 2 else b"k%d" % o, bytes([o % 256]) * size)
            for o in range(first, first + n)]


def test_spool_appends_reads_and_survives_reopening(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        assert spool.partitions() == [] and spool.next_offset(("t.a", 0)) is None
        spool.append("t.a", 0, _entries(5, 3))
        spool.append("t.a", 0, _entries(8, 2))
        spool.append("t/b", 1, _entries(0, 1))  # any topic name makes a safe file name
        assert spool.partitions() == [("t.a", 0), ("t/b", 1)]
        assert spool.next_offset(("t.a", 0)) == 10 and spool.records() == 6
        # another process (or sink) cannot use the same directory meanwhile
        with pytest.raises(ConfigError, match="in use by another sink"):
            Spool(tmp_path, 1 << 20)
    with Spool(tmp_path, 1 << 20) as spool:
        assert [list(b) for b in spool.read(("t.a", 0))] == [_entries(5, 3), _entries(8, 2)]
        assert spool.next_offset(("t/b", 1)) == 1
        size = spool.total_bytes
        spool.clear(("t.a", 0))
        assert spool.partitions() == [("t/b", 1)] and spool.total_bytes < size
    assert len(spool_files(tmp_path)) == 1


def test_spool_cuts_a_torn_tail_and_refuses_damage_before_it(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        spool.append("t", 0, _entries(0, 2))
        spool.append("t", 0, _entries(2, 2))
    (path,) = spool_files(tmp_path)
    whole = path.read_bytes()
    frame = len(whole) // 2

    # a crash mid-append: part of a third frame
    with Spool(tmp_path, 1 << 20) as spool:
        spool.append("t", 0, _entries(4, 2))
    path.write_bytes(path.read_bytes()[: len(whole) + frame // 2])
    with Spool(tmp_path, 1 << 20) as spool:
        assert spool.next_offset(("t", 0)) == 4  # the torn batch was never acknowledged
        assert path.stat().st_size == len(whole)
        spool.append("t", 0, _entries(4, 1))  # appends after the cut, not after garbage
        assert [e.offset for b in spool.read(("t", 0)) for e in b] == [0, 1, 2, 3, 4]

    # zeros where a frame should be (a file extended, its data never written) are torn too
    path.write_bytes(whole + b"\0" * 40)
    with Spool(tmp_path, 1 << 20) as spool:
        assert spool.next_offset(("t", 0)) == 4 and path.stat().st_size == len(whole)

    # a flipped bit in the FIRST frame, with a good frame after it, is damage: no silent loss
    damaged = bytearray(whole)
    damaged[frame - 3] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(SpoolCorruptError, match="damaged at byte 0"):
        Spool(tmp_path, 1 << 20)
    assert path.read_bytes() == bytes(damaged)  # left as it was, for an operator


def test_spool_budget_rejects_a_whole_batch(tmp_path: Path) -> None:
    with Spool(tmp_path, 400) as spool:
        spool.append("t", 0, _entries(0, 2, size=100))
        used = spool.total_bytes
        with pytest.raises(SpoolFullError, match="budget of 400 bytes"):
            spool.append("t", 0, _entries(2, 2, size=100))
        assert spool.total_bytes == used and spool.next_offset(("t", 0)) == 2
    (path,) = spool_files(tmp_path)
    assert path.stat().st_size == used


# ---- outages ---------------------------------------------------------------------------------


def test_outage_spools_survives_a_restart_while_down_and_drains_exactly_once(
    settings: Settings, private_server: ClickHouseServer, tmp_path: Path
) -> None:
    url = private_server.url
    spool_dir = tmp_path / "spool"
    group = f"{settings.topic_prefix}ch-outage"
    produced = Produced()
    produced.publish(settings, 6_000)

    first = SinkThread(_sink(settings, url, spool_dir, group))
    _wait("the first records", lambda: _count_or_zero(url) == produced.records, alive=first.alive)

    first.sink.backend.close()  # else the server waits ~10 s for the idle connection
    private_server.stop()
    envelopes_b = produced.publish(settings, 20_000)
    _wait("batches spooled while ClickHouse is down",
          lambda: first.sink.spool_stats.spooled_messages >= envelopes_b, alive=first.alive)
    assert first.sink.spool_stats.in_outage and first.sink.spool_stats.outages == 1
    first.stop()  # a restart while ClickHouse is still down: the spool stays on disk
    spooled, positions = _spooled(spool_dir)
    assert spooled == len(positions) == envelopes_b

    # the new sink cannot read stored offsets; it resumes after what it spooled
    second = SinkThread(_sink(settings, url, spool_dir, group))
    envelopes_c = produced.publish(settings, 8_000)
    _wait("new batches spooled behind the old ones",
          lambda: second.sink.spool_stats.spooled_messages >= envelopes_c, alive=second.alive)
    time.sleep(1.0)
    assert second.sink.spool_stats.spooled_messages == envelopes_c  # B was not read again
    spooled, positions = _spooled(spool_dir)
    assert spooled == len(positions) == envelopes_b + envelopes_c

    private_server.start()
    _wait("the drain", lambda: _count_or_zero(url) >= produced.records and
          not _all_spool_files(spool_dir), timeout=90, alive=second.alive)
    time.sleep(1.0)  # a late duplicate would show by now
    assert not second.sink.spool_stats.in_outage
    second.stop()
    _assert_exactly_once(url, produced)
    assert not _all_spool_files(spool_dir)


def test_tiny_spool_budget_pauses_the_sink_instead_of_dropping(
    settings: Settings, private_server: ClickHouseServer, tmp_path: Path
) -> None:
    url = private_server.url
    spool_dir = tmp_path / "spool"
    budget = 120_000  # a few envelopes of 400 records (~30 KB each)
    sink = _sink(settings, url, spool_dir, f"{settings.topic_prefix}ch-budget",
                 spool_max_bytes=budget, batch_size=2)
    sink.backend.close()
    private_server.stop()
    produced = Produced()
    produced.publish(settings, 16_000, per_envelope=400)

    running = SinkThread(sink)
    _wait("the budget to fill up", lambda: sink.stats.backpressure_events >= 3, alive=running.alive)
    assert sink.spool is not None
    full = sink.spool.total_bytes
    assert 0 < full <= budget
    assert sink.spool_stats.spooled_messages < produced.envelopes  # paused, not dropping
    assert "spool full" in sink.stats.last_error

    private_server.start()
    _wait("everything stored", lambda: _count_or_zero(url) >= produced.records, timeout=90,
          alive=running.alive)
    time.sleep(1.0)
    running.stop()
    _assert_exactly_once(url, produced)
    assert not _all_spool_files(spool_dir)


# ---- SIGKILL while spooling and while draining ----------------------------------------------


def child_main() -> None:
    """Run a ClickHouse sink with a spool, configured by the environment (for the test below)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    sink = ClickHouseSink.from_settings(
        settings, settings.kafka_bootstrap_servers or "",
        backend=NativeBackend(os.environ["CHILD_CLICKHOUSE_URL"]), owns_backend=True,
        spool_dir=os.environ["CHILD_SPOOL_DIR"], group_id=os.environ["CHILD_GROUP"],
        flush_seconds=0.3,
        # the killed member holds its partitions for a session: keep that short (Tansu's min)
        consumer_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    )
    signal.signal(signal.SIGTERM, lambda *_: sink.stop())
    sink.run()


class ChildSink(ChildProcess):
    """:func:`child_main` in a subprocess, killed with SIGKILL."""

    def __init__(self, settings: Settings, url: str, spool_dir: Path, log_path: Path) -> None:
        super().__init__()
        self.env = dict(os.environ)
        self.env.update(
            KAFKA_BOOTSTRAP_SERVERS=str(settings.kafka_bootstrap_servers),
            TOPIC_PREFIX=settings.topic_prefix,
            CHILD_CLICKHOUSE_URL=url + "?connect_timeout=1&send_receive_timeout=20",
            CHILD_SPOOL_DIR=str(spool_dir),
            CHILD_GROUP=f"{settings.topic_prefix}ch-child",
        )
        self.env.pop("METERING_CONFIG", None)
        self.log_path = log_path

    def start(self) -> ChildSink:
        """Start (again: same group, same spool)."""
        code = "from tests.sinks.test_clickhouse_spool import child_main; child_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=self.env, cwd=REPO,
                                     stdout=open(self.log_path, "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        """The end of its log."""
        return self.log_path.read_text(errors="replace")[-4000:]


def test_sigkill_while_spooling_and_while_draining_loses_and_doubles_nothing(
    settings: Settings, private_server: ClickHouseServer, tmp_path: Path
) -> None:
    url = private_server.url
    spool_dir = tmp_path / "spool"
    child = ChildSink(settings, url, spool_dir, tmp_path / "child.log")
    produced = Produced()
    produced.publish(settings, 20_000)
    try:
        child.start()
        _wait("the first records", lambda: _count_or_zero(url) == produced.records, timeout=90,
              alive=child.alive, log=child.log)
        stored_before = produced.records

        private_server.stop()
        envelopes_b = produced.publish(settings, 150_000)
        # killed while it spools (somewhere between the first spooled batch and the last)
        _wait("spooling", lambda: _spooled(spool_dir)[0] > 0, alive=child.alive, log=child.log)
        time.sleep(random.uniform(0.0, 0.5))
        child.kill()
        child.start()  # ClickHouse still down: resumes after what is spooled
        _wait("all of B spooled", lambda: len(_spooled(spool_dir)[1]) >= envelopes_b, timeout=90,
              alive=child.alive, log=child.log)
        spooled, positions = _spooled(spool_dir)
        assert spooled == len(positions) == envelopes_b  # nothing spooled twice after the kill

        private_server.start()
        # killed while it drains: some of the spool is in ClickHouse, some not yet
        _wait("the drain to start", lambda: _count_or_zero(url) > stored_before, timeout=60,
              alive=child.alive, log=child.log)
        child.kill()
        mid_drain = _count_or_zero(url)
        assert stored_before < mid_drain < produced.records, (stored_before, mid_drain)
        assert _all_spool_files(spool_dir)

        child.start()  # drains the rest on start, skipping what is stored
        produced.publish(settings, 5_000)
        _wait("everything stored", lambda: _count_or_zero(url) >= produced.records and
              not _all_spool_files(spool_dir), timeout=120, alive=child.alive, log=child.log)
        time.sleep(1.5)
        child.stop()
    finally:
        child.kill()
    _assert_exactly_once(url, produced)
    print(f"\nkilled mid-drain with {mid_drain - stored_before} of "
          f"{produced.records - stored_before - 5_000} spooled records stored")


def test_clickhouse_error_codes_stay_out_of_the_spool(
    settings: Settings, private_server: ClickHouseServer, tmp_path: Path
) -> None:
    """Only unreachability spools; a rejected INSERT is the base's to retry, not to hide."""
    from sinks.base import Batch, SinkRecord
    from sinks.clickhouse import ClickHouseError

    sink = _sink(settings, private_server.url, tmp_path / "spool", f"{settings.topic_prefix}x")
    try:
        bad = {"records": [usage_record(event_id="e", tenant_id="t", source="vm", resource_id="r",
                                        metric="m", value=1, event_time_ms=0)]}
        sink.backend.execute("DROP TABLE usage_records")  # a schema problem, not an outage
        with pytest.raises(ClickHouseError):
            sink.write(Batch(sink.records_topic, 0, [SinkRecord(sink.records_topic, 0, 0, None, bad, 0)]))
        assert sink.spool is not None and sink.spool.partitions() == []
    finally:
        sink.close_clients()
        sink.close()


def test_spool_directory_is_per_consumer_group(tmp_path: Path, settings: Settings,
                                               private_server: ClickHouseServer) -> None:
    one = _sink(settings, private_server.url, tmp_path, "group/one")
    try:
        with pytest.raises(ConfigError, match="in use"):
            _sink(settings, private_server.url, tmp_path, "group/one")
        two = _sink(settings, private_server.url, tmp_path, "group-two")
        two.close_clients()
        two.close()
    finally:
        one.close_clients()
        one.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group-two", "group_one"]
