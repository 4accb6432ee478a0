"""Benchmark: rows/s of the ClickHouse sink against a bare clickhouse-driver columnar INSERT of
the same rows, measured in the same run on the same server.

::

    python -m bench clickhouse_sink                        # starts Tansu and clickhouse-server
    python -m bench.clickhouse_sink --records 2000000 --json
    python -m bench.clickhouse_sink --bootstrap host:9092 --clickhouse-url clickhouse://...

One broker, one ClickHouse server, one topic of usage envelopes, every figure from this run:

1. fill ``usage.records`` with ``--records`` usage records in envelopes of ``--per-envelope``
   (``EnvelopePublisher``), read them back and decode them (Avro), and build the rows the
   sink would store (``envelope_rows``, transposed to columns). Not timed.
2. ``--rounds`` rounds (default 3) of, in turn:

   * **bare insert** (the baseline): ``clickhouse_driver.Client.execute(INSERT ..., columns,
     columnar=True)`` of those prepared columns, ``--rows-per-insert`` rows per INSERT, into
     the sink's own schema (same table, same materialized-view rollups, so the server does
     the same work). Only the INSERT calls are timed.
   * **sink write path**: ``ClickHouseSink.write`` on the decoded batches (as the batching
     base hands them over): envelope -> rows, single-month offset runs, INSERTs, stored
     marks. This is what the sink adds to an INSERT.

   Before each timed phase the server finishes its background merges (of the previous
   phase's parts), so neither phase pays for the other's. The machine is shared and noisy:
   each round's two phases run back to back and give one ratio; **the goal (at least 70 %
   of the bare insert) is judged on the median of the rounds' ratios**.
3. **sink from Kafka**: the whole sink (``ClickHouseSink.run``: consume, Avro decode, write,
   commit), timed from the partition assignment to the last stored row; the consumer-group
   join before it is start-up and not counted. Avro decoding happens here and not in the
   baseline, so this ratio is context, not the goal.

Each phase writes to a fresh database, whose count and exact sum are checked at the end.
Absolute numbers depend on the machine and its load; quote the ratios.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

from bench import publish_report

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_FRACTION = 0.7
WIDE = Context(prec=60)

__all__ = ["main", "run_benchmark"]


# ---------------------------------------------------------------------------------------
# the data


def fill(bootstrap: str, topic: str, records: int, per_envelope: int, seed: int = 7) -> Decimal:
    """Publish ``records`` usage records (event times in the last two days); return their sum."""
    from producers import EnvelopePublisher, usage_record

    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    quantum = Decimal("0.000001")
    metrics = ("cpu_time_nanos", "memory_bytes", "disk_read_bytes", "net_rx_bytes")
    publisher = EnvelopePublisher(bootstrap, topic, source="vm",
                                  max_records_per_envelope=per_envelope, producer_name="bench")
    total = Decimal(0)
    envelopes = -(-records // per_envelope)
    span_ms = 2 * 86_400_000
    for start in range(0, records, per_envelope):
        batch = []
        tenant = f"tenant-{(start // per_envelope) % 16:02d}"
        # like a producer's batch: one envelope holds about one tick (10 s) of samples, and
        # the envelopes walk through the last two days in order. (Event times drawn from the
        # whole two days in every envelope made each envelope span two days, and on the first
        # days of a month two months: every message then needs INSERTs of its own.)
        tick_ms = now_ms - span_ms + span_ms * (start // per_envelope) // envelopes
        for i in range(start, min(start + per_envelope, records)):
            value = Decimal(rng.randrange(0, 10**12)) * quantum
            total = WIDE.add(total, value)
            batch.append(usage_record(
                event_id=f"ev-{i}", tenant_id=tenant, source="vm", resource_id=f"vm-{i % 97}",
                metric=metrics[i % len(metrics)], value=value,
                event_time_ms=tick_ms + rng.randrange(0, 10_000),
                metadata={"region": "eu-west-1"} if i % 2 else {},
            ))
        publisher.send(batch)
    publisher.flush(120)
    return total


def read_back(bootstrap: str, topic: str, partitions: int, messages: int) -> list[Any]:
    """Every message of ``topic`` decoded, as the batching base would hand it to ``write``:
    one ``SinkRecord`` list per partition, in offset order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas import envelope_codec
    from sinks.base import SinkRecord

    codec = envelope_codec()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "log_level": 4})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out: dict[int, list[Any]] = {p: [] for p in range(partitions)}
    got = 0
    deadline = time.monotonic() + 300
    try:
        while got < messages and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error():
                    continue
                p, o = int(msg.partition() or 0), int(msg.offset() or 0)
                out[p].append(SinkRecord(topic, p, o, msg.key(), codec.decode(msg.value() or b""),
                                         msg.timestamp()[1]))
                got += 1
    finally:
        consumer.close()
    if got < messages:
        raise RuntimeError(f"read back {got} of {messages} messages")
    return [sorted(recs, key=lambda r: r.offset) for recs in out.values() if recs]


# ---------------------------------------------------------------------------------------
# the phases


def _database(server_url: str, name: str) -> str:
    from sinks.clickhouse import NativeBackend, migrate

    base = server_url.rsplit("/", 1)[0]
    with NativeBackend(base + "/default") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    url = f"{base}/{name}"
    with NativeBackend(url) as backend:
        migrate(backend)
    return url


def _check(url: str, records: int, total: Decimal) -> None:
    from sinks.clickhouse import NativeBackend

    with NativeBackend(url) as backend:
        count, stored = backend.query("SELECT count(), sum(value) FROM usage_records")[0]
        rollup = backend.query("SELECT sum(total) FROM usage_rollup_hourly")[0][0]
    if (count, stored, rollup) != (records, total, total):
        raise RuntimeError(f"{url}: stored {count} rows summing to {stored} (rollup {rollup}); "
                           f"expected {records} summing to {total}")


def quiesce(url: str, timeout: float = 120.0) -> float:
    """Wait until the server runs no background merge; the seconds waited."""
    from sinks.clickhouse import NativeBackend

    t0 = time.monotonic()
    with NativeBackend(url) as backend:
        while time.monotonic() - t0 < timeout:
            if not backend.query("SELECT count() FROM system.merges")[0][0]:
                break
            time.sleep(0.2)
    return time.monotonic() - t0


def bare_insert(url: str, columns: list[list[Any]], rows_per_insert: int) -> dict[str, Any]:
    """The baseline: prepared columns, one clickhouse-driver columnar INSERT per chunk."""
    from clickhouse_driver import Client

    from sinks.clickhouse.sink import RECORD_COLUMNS

    client = Client.from_url(url)
    sql = f"INSERT INTO usage_records ({', '.join(RECORD_COLUMNS)}) VALUES"
    n = len(columns[0])
    chunks = [[col[i:i + rows_per_insert] for col in columns] for i in range(0, n, rows_per_insert)]
    client.execute("SELECT 1")  # connect before the clock starts
    # the collector paused, as the sink pauses it for a batch: the baseline is the best a
    # bare insert does in this process, not one slowed by scans of the benchmark's own data
    gc.disable()
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            client.execute(sql, chunk, columnar=True)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    client.disconnect()
    return {"rows": n, "inserts": len(chunks), "seconds": seconds, "rows_per_s": n / seconds}


def _sink(settings: Any, bootstrap: str, url: str, group: str, batch_size: int) -> Any:
    from sinks.clickhouse import ClickHouseSink, NativeBackend

    return ClickHouseSink.from_settings(
        settings, bootstrap, backend=NativeBackend(url), owns_backend=True, group_id=group,
        spool_dir=None, retention_months=None, batch_size=batch_size, flush_seconds=0.5,
    )


def sink_write_path(settings: Any, bootstrap: str, url: str, partitions: list[list[Any]],
                    messages_per_batch: int, rows: int) -> dict[str, Any]:
    """``ClickHouseSink.write`` over the decoded batches, round-robin over partitions."""
    from sinks.base import Batch

    sink = _sink(settings, bootstrap, url, f"bench-write-{uuid.uuid4().hex[:6]}", 10_000)
    batches: list[Any] = []
    cursors = [0] * len(partitions)
    while any(c < len(p) for c, p in zip(cursors, partitions, strict=True)):
        for i, recs in enumerate(partitions):
            chunk = recs[cursors[i]:cursors[i] + messages_per_batch]
            if chunk:
                batches.append(Batch(chunk[0].topic, chunk[0].partition, chunk))
                cursors[i] += len(chunk)
    try:
        sink.backend.query("SELECT 1")  # connect before the clock starts
        t0 = time.perf_counter()
        for batch in batches:
            sink.write(batch)
        seconds = time.perf_counter() - t0
    finally:
        sink.consumer.close()
        sink.close()
    return {"rows": rows, "batches": len(batches), "seconds": seconds, "rows_per_s": rows / seconds}


def sink_from_kafka(settings: Any, bootstrap: str, url: str, rows: int,
                    batch_size: int) -> dict[str, Any]:
    """The whole sink in a thread: timed from the assignment to the last stored row."""
    from sinks.clickhouse import NativeBackend

    sink = _sink(settings, bootstrap, url, f"bench-run-{uuid.uuid4().hex[:6]}", batch_size)
    assigned: list[float] = []
    resume = sink.resume_offsets

    def timed_resume(parts: Sequence[tuple[str, int]]) -> Any:
        out = resume(parts)
        if not assigned:
            assigned.append(time.perf_counter())
        return out

    sink.resume_offsets = timed_resume  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=target, name="bench-sink", daemon=True)
    thread.start()
    done_at = None
    with NativeBackend(url) as reader:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not errors:
            if reader.query("SELECT count() FROM usage_records")[0][0] >= rows:
                done_at = time.perf_counter()
                break
            time.sleep(0.05)
    sink.stop()
    thread.join(60)
    if errors:
        raise errors[0]
    if done_at is None or not assigned:
        raise RuntimeError("the sink did not store every row in 600 s")
    seconds = done_at - assigned[0]
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "startup_s": assigned[0] - started}


# ---------------------------------------------------------------------------------------
# the run


def run_benchmark(bootstrap: str | None, clickhouse_url: str | None, *, records: int,
                  per_envelope: int, partitions: int, rows_per_insert: int,
                  messages_per_batch: int, rounds: int = 3) -> dict[str, Any]:
    """Run the rounds of bare insert and write path, then the sink from Kafka; the report."""
    from metering.config import load_settings
    from metering.embedded import ClickHouseServer, TansuBroker
    from metering.topics import ensure_topics
    from sinks.clickhouse.sink import envelope_rows

    workdir = Path(tempfile.mkdtemp(prefix="bench-ch-"))
    broker = server = None
    try:
        if bootstrap is None:
            broker = TansuBroker(log_path=workdir / "tansu.log").start()
            bootstrap = broker.bootstrap_servers
        if clickhouse_url is None:
            server = ClickHouseServer(root=workdir / "clickhouse").start()
            clickhouse_url = server.url
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        settings = load_settings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix,
                                 topic_partitions=partitions)
        ensure_topics(settings, bootstrap)
        topic = settings.topic("usage.records")

        t0 = time.perf_counter()
        total = fill(bootstrap, topic, records, per_envelope)
        messages = -(-records // per_envelope)
        decoded = read_back(bootstrap, topic, partitions, messages)
        rows = [row for recs in decoded for r in recs
                for row in envelope_rows(r.value, topic=topic, partition=r.partition, offset=r.offset)]
        columns = [list(col) for col in zip(*rows, strict=True)]
        del rows
        prepare_s = time.perf_counter() - t0

        urls: list[str] = []

        def fresh(name: str) -> str:
            urls.append(_database(clickhouse_url, f"bench_{name}_{uuid.uuid4().hex[:6]}"))
            quiesce(urls[-1])
            return urls[-1]

        bares, writes = [], []
        for i in range(rounds):
            bares.append(bare_insert(fresh(f"bare{i}"), columns, rows_per_insert))
            writes.append(sink_write_path(settings, bootstrap, fresh(f"write{i}"), decoded,
                                          messages_per_batch, records))
        kafka = sink_from_kafka(settings, bootstrap, fresh("kafka"), records, batch_size=10_000)
        for url in urls:
            _check(url, records, total)

        ratios = [w["rows_per_s"] / b["rows_per_s"] for b, w in zip(bares, writes, strict=True)]
        ratio = statistics.median(ratios)
        bare_median = statistics.median(b["rows_per_s"] for b in bares)
        from sinks.clickhouse import NativeBackend

        with NativeBackend(clickhouse_url) as b:
            version = ".".join(map(str, b.server_version()))
            for url in urls:
                b.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]}")
        return {
            "benchmark": "clickhouse_sink",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "clickhouse": version},
            "params": {"records": records, "per_envelope": per_envelope,
                       "partitions": partitions, "rows_per_insert": rows_per_insert,
                       "messages_per_batch": messages_per_batch, "rounds": rounds},
            "prepare_s": prepare_s,
            "bare_insert": bares,
            "sink_write_path": writes,
            "round_ratios": ratios,
            "bare_insert_rows_per_s_median": bare_median,
            "sink_from_kafka": kafka,
            "ratio_write_path": ratio,
            "ratio_from_kafka": kafka["rows_per_s"] / bare_median,
            "goal_write_path": GOAL_FRACTION,
            "goal_met": ratio >= GOAL_FRACTION,
        }
    finally:
        if server is not None:
            server.cleanup()
        if broker is not None:
            broker.stop()


def _print(r: dict[str, Any]) -> None:
    p = r["params"]
    print(f"{p['records']:,} records in envelopes of {p['per_envelope']}, {p['partitions']} "
          f"partitions; ClickHouse {r['machine']['clickhouse']}, {r['machine']['cpus']} CPUs")
    for i, (b, w, q) in enumerate(zip(r["bare_insert"], r["sink_write_path"], r["round_ratios"],
                                      strict=True), 1):
        print(f"  round {i}: bare columnar insert {b['rows_per_s']:>9,.0f} rows/s "
              f"({b['inserts']} INSERTs, {b['seconds']:.2f} s), sink write path "
              f"{w['rows_per_s']:>9,.0f} rows/s = {q:.0%}")
    k = r["sink_from_kafka"]
    print(f"  sink write path / bare insert, median of {len(r['round_ratios'])} rounds: "
          f"{r['ratio_write_path']:.0%} (goal {r['goal_write_path']:.0%}: "
          f"{'met' if r['goal_met'] else 'NOT met'})")
    print(f"  sink from Kafka (+decode)    {k['rows_per_s']:>12,.0f} rows/s  "
          f"= {r['ratio_from_kafka']:.0%} of the median bare insert "
          f"(start-up {k['startup_s']:.1f} s not counted)")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (also used by ``python -m bench``)."""
    p = argparse.ArgumentParser(prog="clickhouse_sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=None, help="Kafka to use (default: start Tansu)")
    p.add_argument("--clickhouse-url", default=None,
                   help="ClickHouse server to use (default: start Debian's clickhouse-server)")
    p.add_argument("--records", type=int, default=1_000_000, help="default 1,000,000")
    p.add_argument("--per-envelope", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--rows-per-insert", type=int, default=100_000,
                   help="rows per bare INSERT (the sink's max_rows_per_insert default)")
    p.add_argument("--messages-per-batch", type=int, default=100,
                   help="envelopes per batch handed to write() in the write-path phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of bare insert + write path; the goal uses their median ratio")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result file (default bench/results/clickhouse_sink-<time>.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = run_benchmark(args.bootstrap, args.clickhouse_url, records=args.records,
                           per_envelope=args.per_envelope, partitions=args.partitions,
                           rows_per_insert=args.rows_per_insert,
                           messages_per_batch=args.messages_per_batch, rounds=args.rounds)
    return publish_report("clickhouse_sink", report, args.out, args.json, _print)


if __name__ == "__main__":
    raise SystemExit(main())
