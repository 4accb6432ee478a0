"""The ClickHouse sink: usage records, closed windows, quota alerts, dead letters and webhook
delivery records, stored exactly once, spooled to local disk while ClickHouse is unreachable.

Kafka delivers at least once; the effect in ClickHouse is exactly once (DESIGN rule 4):

* every row carries its Kafka topic, partition and offset (records also their position in
  the envelope, ``kafka_index``, and how many rows the envelope produced, ``record_count``);
* each INSERT holds one contiguous offset run of one topic-partition inside ONE table
  partition (month), and the inserts go in offset order. An INSERT into one partition
  becomes parts that ClickHouse commits in order, so after a crash what is stored is always
  a prefix of the offset order;
* on partition assignment the sink reads back the highest stored offset and resumes after
  it. An envelope may hold records of two months, so two INSERTs, and a crash between them
  leaves it half stored: when the highest stored offset has fewer distinct ``kafka_index``
  values than its ``record_count``, the sink resumes AT that offset and inserts only the
  missing indices. Because stored data is a prefix, only the highest message can be partial.
* each topic feeds one table (``usage.dlq`` only ``dead_letters``; every outcome of the
  webhook sink, dead-lettered ones included, reaches ``webhook_deliveries`` from
  ``webhook.deliveries`` alone). A topic may be given several target tables: they are
  written one after the other, batch by batch, each with its own stored mark, and the sink
  resumes from the mark of the table written last, which must hold every message.
* marks are keyed by topic, partition and table, and read back with ``kafka_topic = <topic>``,
  so rows of another topic in the same table (such as the ``usage.dlq`` rows an earlier
  version derived into ``webhook_deliveries``) never move a topic's resume point.

Committed consumer offsets are only a fallback for partitions with no stored rows, so the
sink also does the right thing after ClickHouse was restored from an older backup.

**Spool.** With a spool directory, a batch that ClickHouse cannot take because it is
unreachable (:class:`~sinks.errors.SinkUnavailableError`) is appended to a local spool file of
its topic-partition instead (fsynced, see :mod:`sinks.clickhouse.spool`) and ``write`` returns,
so the base commits and consumption goes on. While the spool holds anything of a
topic-partition, its new batches are appended behind it; once ClickHouse answers (probed with
a growing delay, at most every :data:`MAX_PROBE_SECONDS`), the spooled batches are inserted in
order, through the same path as live batches and after re-reading the stored marks, so a
crash mid-drain followed by a second drain inserts nothing twice; then the file is deleted.
A background thread drains partitions whose traffic stopped, and a restarted sink drains what
an earlier run left (resuming consumption after ``max(stored, spooled) + 1``). Past the
spool's disk budget ``write`` raises :class:`~sinks.errors.BackpressureError`: the base pauses
the partitions and retries, nothing is dropped.

The spool is local to a sink process (one directory per consumer group under the spool dir,
locked). A partition that moves to another instance while its spool here is not drained is
re-read by its new owner from what ClickHouse stores when it can read that; if the new owner
cannot reach ClickHouse either and ClickHouse holds no row at all of that partition, it falls
back to the committed offset, which may be past batches spooled here. Run one sink instance
per consumer group with a spool, or keep partitions sticky, to be exact in every outage.

**Retention** runs when the sink starts and then daily (see :mod:`sinks.clickhouse.retention`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import gc
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from confluent_kafka import Consumer, TopicPartition

from metering.config import Settings
from metering.errors import ConfigError
from metering.topics import ALERTS, DELIVERIES, DLQ, RECORDS, WINDOWS
from schemas import (
    AvroCodec,
    CodecError,
    dead_letter_codec,
    envelope_codec,
    quota_alert_codec,
    webhook_delivery_codec,
    window_codec,
)
from sinks.base import Batch, BatchingSink, SinkRecord
from sinks.clickhouse.backends import (
    ClickHouseBackend,
    NativeBackend,
    backend_from_settings,
    sql_string,
)
from sinks.clickhouse.migrations import (
    ALERTS_TABLE,
    DEAD_LETTERS_TABLE,
    DELIVERIES_TABLE,
    RECORDS_TABLE,
    WINDOWS_TABLE,
    migrate,
)
from sinks.clickhouse.retention import drop_expired_partitions
from sinks.clickhouse.rows import (
    ALERT_COLUMNS,
    DEAD_LETTER_COLUMNS,
    DELIVERY_COLUMNS,
    alert_row,
    dead_letter_row,
    delivery_record_row,
    month_of_seconds,
)
from sinks.clickhouse.spool import Spool, SpoolCorruptError, SpoolEntry, SpoolFullError
from sinks.errors import BackpressureError, SinkError, SinkUnavailableError

__all__ = [
    "DEFAULT_MAX_ROWS_PER_INSERT",
    "DEFAULT_SPOOL_DIR",
    "DEFAULT_SPOOL_MAX_BYTES",
    "MAX_PROBE_SECONDS",
    "RECORD_COLUMNS",
    "WINDOW_COLUMNS",
    "ClickHouseSink",
    "SpoolStats",
    "envelope_rows",
    "window_row",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]
Row = tuple[Any, ...]
#: (month, kafka_index, row) of one message
Item = tuple[int, int, Row]

RECORD_COLUMNS: tuple[str, ...] = (
    "event_id", "tenant_id", "source", "resource_id", "metric", "value",
    "event_time", "event_time_ms", "event_date", "metadata_keys", "metadata_values",
    "kafka_topic", "kafka_partition", "kafka_offset", "kafka_index", "record_count",
)
WINDOW_COLUMNS: tuple[str, ...] = (
    "window_id", "tenant_id", "window_start", "window_start_ms", "window_end_ms",
    "metrics", "aggregations", "metric_values", "metric_samples", "sample_count", "score",
    "late_samples", "has_gap", "kafka_topic", "kafka_partition", "kafka_offset",
)
_WIN_START = WINDOW_COLUMNS.index("window_start")
_ALERT_START = ALERT_COLUMNS.index("period_start")
_DEAD_FAILED = DEAD_LETTER_COLUMNS.index("failed_at")
_DELIVERY_AT = DELIVERY_COLUMNS.index("delivered_at")

#: Rows per INSERT. ClickHouse cuts bigger inserts into blocks anyway (max_insert_block_size),
#: and chdb gets each INSERT as one SQL string, so memory stays bounded; correctness does not
#: depend on it, because an insert split in offset order still stores a prefix.
DEFAULT_MAX_ROWS_PER_INSERT = 100_000
#: the spool's disk budget when none is configured
DEFAULT_SPOOL_MAX_BYTES = 1 << 30
#: where the spool lives when none is configured (beside chdb's default ``.metering/chdb``)
DEFAULT_SPOOL_DIR = ".metering/spool"
#: first wait before ClickHouse is tried again after it was unreachable; doubles up to the max
FIRST_PROBE_SECONDS = 0.5
MAX_PROBE_SECONDS = 5.0
_RETENTION_EVERY_SECONDS = 86_400.0
_RETENTION_RETRY_SECONDS = 300.0
_IDLE_WAKE_SECONDS = 30.0

_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_DATE = dt.date(1970, 1, 1)
_MAX_DATETIME_SECONDS = 2**32 - 1  # DateTime is UInt32 seconds on every version
_MAX_UINT64 = 2**64 - 1
_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9._-]")


_T = TypeVar("_T")


def _datetime_from_ms(ms: int) -> dt.datetime:
    # clamped to what DateTime can hold, so the month the sink computes is the month
    # ClickHouse stores (an out-of-range value would wrap around inside ClickHouse)
    seconds = min(max(ms // 1000, 0), _MAX_DATETIME_SECONDS)
    return _EPOCH + dt.timedelta(seconds=seconds)


def _month(day: dt.date) -> int:
    return day.year * 100 + day.month


#: day number -> (date, yyyymm); days repeat across a batch, computing them once is cheaper
_DAYS: dict[int, tuple[dt.date, int]] = {}


def _day(seconds: int) -> tuple[dt.date, int]:
    number = seconds // 86_400
    hit = _DAYS.get(number)
    if hit is None:
        date = _EPOCH_DATE + dt.timedelta(days=number)
        hit = _DAYS[number] = (date, date.year * 100 + date.month)
    return hit


def _record_items(
    envelope: Mapping[str, Any], topic: str, partition: int, offset: int
) -> list[Item]:
    """``(month, kafka_index, row)`` of each ``usage_records`` row of one envelope.

    The hottest loop of the sink (once per stored row): locals and an inlined day cache
    instead of helper calls.
    """
    records = envelope.get("records") or []
    ids = [r["event_id"] for r in records]
    keep: Iterable[tuple[int, Mapping[str, Any]]]
    if len(set(ids)) == len(ids):
        keep, count = enumerate(records), len(records)  # the normal case: no repeated id
    else:
        seen: set[str] = set()
        kept: list[tuple[int, Mapping[str, Any]]] = []
        for index, record in enumerate(records):
            if record["event_id"] not in seen:
                seen.add(record["event_id"])
                kept.append((index, record))
        keep, count = kept, len(kept)
    days = _DAYS
    items: list[Item] = []
    append = items.append
    for index, r in keep:
        ms = r["event_time_ms"]
        if ms < 0 or ms > _MAX_UINT64:
            ms = min(max(ms, 0), _MAX_UINT64)
        seconds = ms // 1000
        if seconds > _MAX_DATETIME_SECONDS:
            seconds = _MAX_DATETIME_SECONDS
        day = days.get(seconds // 86_400)
        if day is None:
            day = _day(seconds)
        metadata = r.get("metadata")
        if metadata:
            keys = sorted(metadata)
            values = [metadata[k] for k in keys]
        else:
            keys, values = [], []
        append((day[1], index, (
            r["event_id"], r["tenant_id"], r["source"], r["resource_id"], r["metric"],
            r["value"], seconds, ms, day[0], keys, values,
            topic, partition, offset, index, count,
        )))
    return items


#: one message as whole columns (in its target's column order), all rows in ``month``
Chunk = tuple[int, list[list[Any]]]


def _record_chunk(
    envelope: Mapping[str, Any], topic: str, partition: int, offset: int
) -> Chunk | None:
    """The ``usage_records`` rows of one envelope as columns, when they can go into one INSERT
    whole: every event time in one month, no repeated ``event_id``, nothing to clamp.

    The common case, built column by column (no tuple per row, no transposition before the
    columnar INSERT): the same values :func:`_record_items` gives, which handles the rest.
    """
    records = envelope.get("records") or []
    n = len(records)
    if not n:
        return None
    ids = [r["event_id"] for r in records]
    if len(set(ids)) != n:
        return None
    times = [r["event_time_ms"] for r in records]
    lo, hi = min(times), max(times)
    if lo < 0 or hi // 1000 > _MAX_DATETIME_SECONDS:
        return None
    first, last = _day(lo // 1000), _day(hi // 1000)
    if first[1] != last[1]:
        return None  # two months: two INSERTs, row by row
    seconds = [ms // 1000 for ms in times]
    if first[0] == last[0]:
        dates = [first[0]] * n
    else:
        # the few days of this envelope, then one C-level lookup per row
        span = {day: _day(day * 86_400)[0] for day in range(lo // 86_400_000, hi // 86_400_000 + 1)}
        dates = list(map(span.__getitem__, [ms // 86_400_000 for ms in times]))
    # comprehensions, not a loop of appends: this runs once per stored row; one key is the
    # common case and skips a nested comprehension (a call per row)
    metadata = [r.get("metadata") for r in records]
    keys_col: list[list[str]] = [sorted(m) if m else [] for m in metadata]
    values_col: list[list[str]] = [
        ([m[keys[0]]] if len(keys) == 1 else [m[k] for k in keys]) if keys else []
        for m, keys in zip(metadata, keys_col, strict=True)
    ]
    return first[1], [
        ids, [r["tenant_id"] for r in records], [r["source"] for r in records],
        [r["resource_id"] for r in records], [r["metric"] for r in records],
        [r["value"] for r in records], seconds, times, dates, keys_col, values_col,
        [topic] * n, [partition] * n, [offset] * n, list(range(n)), [n] * n,
    ]


def envelope_rows(
    envelope: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> list[Row]:
    """The ``usage_records`` rows (in :data:`RECORD_COLUMNS` order) of one envelope message.

    ``kafka_index`` is the record's position in the envelope. A repeated ``event_id`` inside
    one envelope is stored once (ReplacingMergeTree would collapse it anyway, and a row that
    later vanishes would make the message look half stored), so ``record_count`` is the
    number of rows the envelope produces: its record count for any well-formed envelope.
    ``event_time`` is given as epoch seconds (both backends insert that as a DateTime).
    """
    return [row for _, _, row in _record_items(envelope, topic, partition, offset)]


def window_row(
    window: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> Row:
    """The ``usage_windows`` row (in :data:`WINDOW_COLUMNS` order) of one WindowResult."""
    totals = window.get("totals") or []
    start_ms = min(max(int(window["window_start_ms"]), 0), _MAX_UINT64)
    end_ms = min(max(int(window["window_end_ms"]), 0), _MAX_UINT64)
    return (
        window["window_id"], window["tenant_id"], _datetime_from_ms(start_ms), start_ms, end_ms,
        [t["metric"] for t in totals], [t["aggregation"] for t in totals],
        [t["value"] for t in totals], [max(int(t["samples"]), 0) for t in totals],
        max(int(window["sample_count"]), 0), window["score"],
        max(int(window.get("late_samples", 0)), 0), 1 if window.get("has_gap") else 0,
        topic, partition, offset,
    )


def _window_items(window: Mapping[str, Any], topic: str, partition: int, offset: int) -> list[Item]:
    row = window_row(window, topic=topic, partition=partition, offset=offset)
    return [(_month(row[_WIN_START].date()), 0, row)]


def _alert_items(alert: Mapping[str, Any], topic: str, partition: int, offset: int) -> list[Item]:
    row = alert_row(alert, topic=topic, partition=partition, offset=offset)
    return [(month_of_seconds(row[_ALERT_START]), 0, row)]


def _dead_letter_items(dead: Mapping[str, Any], topic: str, partition: int, offset: int) -> list[Item]:
    row = dead_letter_row(dead, topic=topic, partition=partition, offset=offset)
    return [(month_of_seconds(row[_DEAD_FAILED]), 0, row)]


def _delivery_record_items(
    delivery: Mapping[str, Any], topic: str, partition: int, offset: int
) -> list[Item]:
    row = delivery_record_row(delivery, topic=topic, partition=partition, offset=offset)
    return [(month_of_seconds(row[_DELIVERY_AT]), 0, row)]


#: batches whose allocations are frozen before the collector sees everything again
GC_UNFREEZE_EVERY = 50


class _GcPause:
    """Hold off CPython's cyclic garbage collector while a batch becomes rows and INSERTs.

    A batch allocates a tuple per row and the driver a list per column: enough allocations to
    trigger several collections, each scanning every live object (the whole consumed batch),
    which measured as half the write path's time. None of these objects form cycles, so
    reference counting frees them anyway and pausing the collector loses nothing.

    Re-enabling alone only moves the cost: the first allocation after the batch starts a
    collection of everything the batch allocated, still alive (a sixth of the write path).
    So the batch's objects are frozen instead (``gc.freeze``, constant time: out of the
    collector's sight; reference counting still frees them), and every
    ``GC_UNFREEZE_EVERY`` batches they are handed back to the collector, so a cycle that
    became garbage is still collected. Left alone if the collector was already off.

    Nothing stays frozen at exit: objects still frozen when the interpreter shuts down are
    never collected, and chdb's crashed when destroyed that late (the embedded demo exited
    with SIGSEGV about one run in two).
    """

    def __init__(self) -> None:
        self._batches = 0
        atexit.register(gc.unfreeze)  # harmless when nothing was frozen

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not gc.isenabled():
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            self._batches += 1
            if self._batches >= GC_UNFREEZE_EVERY:
                self._batches = 0
                gc.unfreeze()
            else:
                gc.freeze()
            gc.enable()


_gc_paused = _GcPause()


class _Target(NamedTuple):
    """A table a topic's messages are written to, and how a message becomes its rows."""

    table: str
    columns: tuple[str, ...]
    items: Callable[[Any, str, int, int], list[Item]]
    #: a message becomes many rows (kafka_index, record_count): it can be half stored
    multi_row: bool = False
    #: the fast path: a message as whole columns for one INSERT (None: use ``items``)
    chunk: Callable[[Any, str, int, int], Chunk | None] | None = None


_RECORDS = _Target(RECORDS_TABLE, RECORD_COLUMNS, _record_items, multi_row=True,
                   chunk=_record_chunk)
_WINDOWS = _Target(WINDOWS_TABLE, WINDOW_COLUMNS, _window_items)
_ALERTS = _Target(ALERTS_TABLE, ALERT_COLUMNS, _alert_items)
_DEAD_LETTERS = _Target(DEAD_LETTERS_TABLE, DEAD_LETTER_COLUMNS, _dead_letter_items)
#: every outcome of the webhook sink (``webhook.deliveries``), the only source of the table
_DELIVERY_RECORDS = _Target(DELIVERIES_TABLE, DELIVERY_COLUMNS, _delivery_record_items)


class _Mark(NamedTuple):
    """How far a topic-partition is stored in one table: ``next_offset`` and, if that
    message is already partly stored, the ``kafka_index`` values it has."""

    next_offset: int
    stored: frozenset[int]


@dataclass(slots=True)
class _Message:
    offset: int
    rows: list[tuple[int, int, Row]]  # (month, kafka_index, row) still to insert
    stored: set[int]  # kafka_index values already in ClickHouse
    expected: int  # rows the message has in total
    #: instead of ``rows``: the whole message as columns, all in one month (see _record_chunk)
    chunk: Chunk | None = None

    def mark(self) -> _Mark:
        if len(self.stored) >= self.expected:
            return _Mark(self.offset + 1, frozenset())
        return _Mark(self.offset, frozenset(self.stored))


@dataclass(slots=True)
class _Insert:
    month: int
    rows: list[Row] = field(default_factory=list)
    segments: list[tuple[_Message, Sequence[int]]] = field(default_factory=list)
    #: whole messages as columns, inserted together with ``rows``
    chunks: list[list[list[Any]]] = field(default_factory=list)
    size: int = 0

    def columns(self, width: int) -> list[list[Any]]:
        """Every row of the insert as ``width`` columns (chunks, then the single rows)."""
        if len(self.chunks) == 1 and not self.rows:
            return self.chunks[0]
        data: list[list[Any]] = [[] for _ in range(width)]
        for chunk in self.chunks:
            for col, part in zip(data, chunk, strict=True):
                col.extend(part)
        if self.rows:
            for col, values in zip(data, zip(*self.rows, strict=True), strict=True):
                col.extend(values)
        return data


def _plan_inserts(messages: Sequence[_Message], max_rows: int) -> list[_Insert]:
    """Cut the messages' rows into single-month inserts, in offset order.

    A message's rows of several months go to consecutive inserts, and only its last month
    group continues with the next messages, so every stored prefix of the inserts leaves at
    most its highest message partial. The month of the open insert goes first, to save an
    INSERT when the previous message ended in the same month. A message given as a chunk (one
    month) is never split: it joins the open insert when it fits, else starts the next one.
    """
    inserts: list[_Insert] = []
    for msg in messages:
        if msg.chunk is not None:
            month, columns = msg.chunk
            n = msg.expected
            if n <= max_rows:
                cur = inserts[-1] if inserts else None
                if cur is None or cur.month != month or cur.size + n > max_rows:
                    cur = _Insert(month)
                    inserts.append(cur)
                cur.chunks.append(columns)
                cur.size += n
                cur.segments.append((msg, range(n)))
                continue
            # bigger than one INSERT may be: row by row, like a message of several months
            msg.rows = [(month, i, row) for i, row in enumerate(zip(*columns, strict=True))]
            msg.chunk = None
        rows = msg.rows
        first_month = rows[0][0]
        if all(item[0] == first_month for item in rows):
            # the common case: one month, no regrouping
            groups: dict[int, list[tuple[int, Row]]] = {first_month: [(i, r) for _, i, r in rows]}
        else:
            groups = defaultdict(list)
            for month, index, row in rows:
                groups[month].append((index, row))
        order = list(groups)
        if inserts and inserts[-1].month in groups:
            order.remove(inserts[-1].month)
            order.insert(0, inserts[-1].month)
        for month in order:
            pending = groups[month]
            while pending:
                cur = inserts[-1] if inserts else None
                if cur is None or cur.month != month or cur.size >= max_rows:
                    cur = _Insert(month)
                    inserts.append(cur)
                room = max_rows - cur.size
                take, pending = pending[:room], pending[room:]
                cur.rows.extend(row for _, row in take)
                cur.size += len(take)
                cur.segments.append((msg, [index for index, _ in take]))
    return inserts


@dataclass
class SpoolStats:
    """What the spool did; beside :class:`~sinks.base.SinkStats` for health checks."""

    spooled_messages: int = 0
    spooled_batches: int = 0
    drained_batches: int = 0
    outages: int = 0
    #: True while ClickHouse is considered unreachable (batches go to the spool)
    in_outage: bool = False


def _spool_dir_name(group_id: str) -> str:
    return _UNSAFE_PATH.sub("_", group_id) or "_"


class ClickHouseSink(BatchingSink):
    """Store ``usage.records``, ``usage.windows`` (and ``usage.dlq``, ``quota.alerts``,
    ``webhook.deliveries`` when given) in ClickHouse, exactly once.

    Runs the schema migrations (and retention) when constructed; with a spool that step may
    wait until ClickHouse is reachable. Pass ``owns_backend=True`` to have :meth:`close`
    (called when :meth:`run` returns) close the backend too.

    ``spool_dir``: where to spool while ClickHouse is unreachable (a subdirectory per
    ``group_id`` is used); None disables the spool, and an unreachable ClickHouse then pauses
    the sink (the base retries). ``retention_months``: drop older monthly partitions at start
    and daily (None: never). ``cluster``: DDL with ``ON CLUSTER`` and Replicated engines.
    ``alerts_topic`` needs ``alerts_codec`` (the QuotaAlert codec). ``deliveries_topic``: the
    webhook sink's record of each delivery outcome (delivered, duplicate, dead-lettered),
    the only source of ``webhook_deliveries``; ``usage.dlq`` is stored in ``dead_letters``.
    """

    name = "clickhouse-sink"

    def __init__(
        self,
        *,
        backend: ClickHouseBackend,
        records_topic: str,
        windows_topic: str,
        bootstrap_servers: str,
        group_id: str,
        dlq_topic: str,
        batch_size: int = 10_000,
        flush_seconds: float = 1.0,
        consumer_config: Mapping[str, Any] | None = None,
        owns_backend: bool = False,
        max_rows_per_insert: int = DEFAULT_MAX_ROWS_PER_INSERT,
        dead_letters_topic: str | None = None,
        alerts_topic: str | None = None,
        alerts_codec: AvroCodec | None = None,
        deliveries_topic: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        retention_months: int | None = None,
        cluster: str | None = None,
    ) -> None:
        if max_rows_per_insert < 1:
            raise ValueError("max_rows_per_insert must be at least 1")
        if (alerts_topic is None) != (alerts_codec is None):
            raise ValueError("alerts_topic and alerts_codec go together")
        self.backend = backend
        self.owns_backend = owns_backend
        self.records_topic = records_topic
        self.windows_topic = windows_topic
        self.dead_letters_topic = dead_letters_topic
        self.alerts_topic = alerts_topic
        self.deliveries_topic = deliveries_topic
        self.max_rows_per_insert = max_rows_per_insert
        self.retention_months = retention_months
        self.cluster = cluster
        self.spool_stats = SpoolStats()
        codecs: dict[str, AvroCodec] = {records_topic: envelope_codec(), windows_topic: window_codec()}
        self._targets: dict[str, tuple[_Target, ...]] = {
            records_topic: (_RECORDS,), windows_topic: (_WINDOWS,),
        }
        if dead_letters_topic is not None:
            codecs[dead_letters_topic] = dead_letter_codec()
            self._targets[dead_letters_topic] = (_DEAD_LETTERS,)
        if alerts_topic is not None and alerts_codec is not None:
            codecs[alerts_topic] = alerts_codec
            self._targets[alerts_topic] = (_ALERTS,)
        if deliveries_topic is not None:
            codecs[deliveries_topic] = webhook_delivery_codec()
            self._targets[deliveries_topic] = (_DELIVERY_RECORDS,)
        self._marks: dict[tuple[str, int, str], _Mark] = {}
        # partitions whose last INSERT failed: it may have landed anyway (lost connection
        # after the server got the data), so ClickHouse is asked again before a retry
        self._resync: set[TP] = set()
        # one lock around everything that touches marks, spool and inserts: the poll loop
        # (write, assignment callbacks) and the maintenance thread (drains, retention)
        self._io_lock = threading.RLock()
        self._owned: set[TP] = set()
        self._ready = False
        self._outage_until = 0.0
        self._probe_delay = FIRST_PROBE_SECONDS
        self._next_retention = 0.0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._maintenance: threading.Thread | None = None
        self.spool: Spool | None = None
        try:
            if spool_dir is not None:
                self.spool = Spool(Path(spool_dir) / _spool_dir_name(group_id), spool_max_bytes)
            unreachable: SinkUnavailableError | None = None
            try:
                self._ensure_ready()
            except SinkUnavailableError as exc:
                if self.spool is None:
                    raise
                unreachable = exc
            super().__init__(
                topics=codecs,
                bootstrap_servers=bootstrap_servers,
                group_id=group_id,
                dlq_topic=dlq_topic,
                batch_size=batch_size,
                flush_seconds=flush_seconds,
                consumer_config=consumer_config,
            )
            if unreachable is not None:
                self._enter_outage(unreachable)
        except BaseException:
            if self.spool is not None:
                self.spool.close()
            if owns_backend:
                backend.close()
            raise

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        bootstrap_servers: str,
        backend: ClickHouseBackend | None = None,
        **kwargs: Any,
    ) -> ClickHouseSink:
        """Build the sink from settings; without ``backend`` it opens (and owns) its own.

        ``kwargs`` override any constructor argument (``group_id``, ``consumer_config`` ...).
        The spool is used with a ClickHouse server (a :class:`NativeBackend`); in-process chdb
        cannot be unreachable. ``SPOOL_DIR``, ``SPOOL_MAX_BYTES`` and ``CLICKHOUSE_CLUSTER``
        come from the settings.
        """
        owns = backend is None
        if backend is None:
            backend = backend_from_settings(settings)
        spool_dir = settings.spool_dir
        params: dict[str, Any] = {
            "records_topic": settings.topic(RECORDS),
            "windows_topic": settings.topic(WINDOWS),
            "dead_letters_topic": settings.topic(DLQ),
            "alerts_topic": settings.topic(ALERTS),
            "alerts_codec": quota_alert_codec(),
            "deliveries_topic": settings.topic(DELIVERIES),
            "group_id": f"{settings.consumer_group_prefix}.clickhouse-sink",
            "dlq_topic": settings.topic(DLQ),
            "batch_size": settings.sink_batch_size,
            "flush_seconds": settings.sink_flush_seconds,
            "owns_backend": owns,
            "retention_months": settings.retention_months,
            "cluster": settings.clickhouse_cluster,
            "spool_dir": spool_dir if isinstance(backend, NativeBackend) and spool_dir else None,
            "spool_max_bytes": settings.spool_max_bytes,
        }
        params.update(kwargs)
        try:
            return cls(backend=backend, bootstrap_servers=bootstrap_servers, **params)
        except ValueError as exc:  # a bad spool budget or cluster name: name the setting
            raise ConfigError(str(exc)) from exc

    # ---- readiness, outages, retention ---------------------------------------------------

    def _ensure_ready(self) -> None:
        """Migrate once (and run retention); raises SinkUnavailableError while unreachable."""
        if self._ready:
            return
        migrate(self.backend, cluster=self.cluster)
        self._ready = True
        self._run_retention_if_due()

    def _run_retention_if_due(self) -> None:
        if self.retention_months is None or not self._ready:
            return
        now = time.monotonic()
        if now < self._next_retention:
            return
        try:
            drop_expired_partitions(self.backend, self.retention_months, cluster=self.cluster)
        except SinkError as exc:
            log.warning("%s: retention failed, retrying in %.0fs: %s", self.name,
                        _RETENTION_RETRY_SECONDS, exc)
            self._next_retention = now + _RETENTION_RETRY_SECONDS
            return
        self._next_retention = now + _RETENTION_EVERY_SECONDS

    def _outage_active(self) -> bool:
        return time.monotonic() < self._outage_until

    def _enter_outage(self, exc: SinkError) -> None:
        """Spool instead of trying ClickHouse for a while (a growing while, up to the max).

        Called for an unreachable server; any other refusal met in the background (busy, a
        rejected insert) only delays the next try the same way, without spooling live
        batches for it: ``write`` raises those to the base, which retries them.
        """
        if isinstance(exc, SinkUnavailableError) and not self.spool_stats.in_outage:
            self.spool_stats.in_outage = True
            self.spool_stats.outages += 1
            log.warning("%s: ClickHouse unreachable, spooling to %s: %s", self.name,
                        self.spool.directory if self.spool else "-", exc)
        elif not isinstance(exc, SinkUnavailableError):
            log.error("%s: ClickHouse refused a spool drain, retrying in %.1fs: %s", self.name,
                      self._probe_delay, exc)
        self._outage_until = time.monotonic() + self._probe_delay
        self._probe_delay = min(self._probe_delay * 2, MAX_PROBE_SECONDS)
        self.stats.last_error = str(exc)

    def _outage_over(self) -> None:
        self._probe_delay = FIRST_PROBE_SECONDS
        self._outage_until = 0.0
        if self.spool_stats.in_outage:
            self.spool_stats.in_outage = False
            log.warning("%s: ClickHouse reachable again", self.name)

    # ---- where to resume -----------------------------------------------------------------

    def _read_marks(self, topic: str, partitions: Sequence[int], target: _Target) -> dict[int, _Mark]:
        """Ask ClickHouse how far each partition of ``topic`` is stored in ``target``."""
        if not partitions:
            return {}
        table = target.table
        t = sql_string(topic)
        parts = ", ".join(str(int(p)) for p in sorted(set(partitions)))
        marks: dict[int, _Mark] = {}
        if not target.multi_row:
            # one row per message: the highest stored offset is complete by construction
            rows = self.backend.query(
                f"SELECT kafka_partition, max(kafka_offset) FROM {table} "
                f"WHERE kafka_topic = {t} AND kafka_partition IN ({parts}) "
                "GROUP BY kafka_partition"
            )
            for p, offset in rows:
                marks[int(p)] = _Mark(int(offset) + 1, frozenset())
            return marks
        # max() over the offset columns, no FINAL: duplicates (if any) do not change a max,
        # and uniq over kafka_index ignores them in the completeness check
        rows = self.backend.query(
            "SELECT kafka_partition, kafka_offset, groupUniqArray(kafka_index), "
            f"max(record_count) FROM {table} "
            f"WHERE kafka_topic = {t} AND (kafka_partition, kafka_offset) IN ("
            f"SELECT kafka_partition, max(kafka_offset) FROM {table} "
            f"WHERE kafka_topic = {t} AND kafka_partition IN ({parts}) "
            "GROUP BY kafka_partition) "
            "GROUP BY kafka_partition, kafka_offset"
        )
        for p, offset, indices, count in rows:
            stored = frozenset(int(i) for i in indices)
            if len(stored) >= int(count):
                marks[int(p)] = _Mark(int(offset) + 1, frozenset())
            else:
                log.warning(
                    "%s: %s[%s]@%s is half stored in %s (%d of %d rows): completing it",
                    self.name, topic, p, offset, table, len(stored), count,
                )
                marks[int(p)] = _Mark(int(offset), stored)
        return marks

    def _targets_of(self, topic: str) -> tuple[_Target, ...]:
        try:
            return self._targets[topic]
        except KeyError:
            raise ValueError(f"{self.name} does not consume {topic!r}") from None

    def _refresh(self, topic: str, partitions: Sequence[int]) -> None:
        fresh = {t.table: self._read_marks(topic, partitions, t) for t in self._targets_of(topic)}
        for table, marks in fresh.items():
            for p in partitions:
                if p in marks:
                    self._marks[(topic, p, table)] = marks[p]
                else:
                    self._marks.pop((topic, p, table), None)
        for p in partitions:
            self._resync.discard((topic, p))

    def resume_offsets(self, partitions: Sequence[TP]) -> Mapping[TP, int]:
        """Resume each partition after what is stored (AT a half-stored message) or spooled.

        With a spool, ClickHouse being unreachable is not an error here: partitions resume
        after their spooled messages, or from the committed offset, and what is stored is
        read again before anything is inserted.
        """
        by_topic: dict[str, list[int]] = defaultdict(list)
        for topic, partition in partitions:
            by_topic[topic].append(partition)
        out: dict[TP, int] = {}
        with self._io_lock:
            self._owned.update(partitions)
            try:
                self._ensure_ready()
                for topic, parts in by_topic.items():
                    self._refresh(topic, parts)
                    leader = self._targets_of(topic)[-1].table
                    for p in parts:
                        mark = self._marks.get((topic, p, leader))
                        if mark is not None:
                            out[(topic, p)] = mark.next_offset
                if self.spool is not None:
                    self._outage_over()
            except SinkUnavailableError as exc:
                if self.spool is None:
                    raise
                self._enter_outage(exc)
                self._resync.update(partitions)
            if self.spool is not None:
                for tp in partitions:
                    spooled = self.spool.next_offset(tp)
                    if spooled is not None and spooled > out.get(tp, -1):
                        out[tp] = spooled
                self._start_maintenance()
        log.info("%s: resuming from stored/spooled offsets %s", self.name, out)
        self._wake.set()
        return out

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # extends the base's callback: a revoked partition is no longer drained in the
        # background; a last drain is tried while it is still ours
        with self._io_lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if self.spool is not None and self.spool.has(key) and not self._outage_active():
                    try:
                        self._drain_locked(key)
                    except SinkError as exc:
                        self._enter_outage(exc)
                if self.spool is not None and self.spool.has(key):
                    log.warning("%s: %s[%d] revoked with %d spooled messages; they stay in %s "
                                "and are drained when it is assigned here again", self.name,
                                key[0], key[1], self.spool.records(key), self.spool.directory)
                self._owned.discard(key)
        super()._on_revoke(consumer, partitions)

    # ---- writing -------------------------------------------------------------------------

    def _messages(self, batch: Batch, target: _Target, mark: _Mark | None) -> list[_Message]:
        messages: list[_Message] = []
        build = target.items
        topic, partition = batch.topic, batch.partition
        chunk = target.chunk
        for rec in batch.records:
            if mark is not None and rec.offset < mark.next_offset:
                continue  # already stored (an earlier run, or a retried batch)
            if chunk is not None and (mark is None or rec.offset != mark.next_offset
                                      or not mark.stored):
                whole = chunk(rec.value, topic, partition, rec.offset)
                if whole is not None:
                    messages.append(_Message(rec.offset, [], set(), len(whole[1][0]), whole))
                    continue
            items = build(rec.value, topic, partition, rec.offset)
            if not items:
                continue
            if mark is not None and rec.offset == mark.next_offset and mark.stored:
                # half stored before a crash: only the rest
                stored = set(mark.stored)
                todo = [item for item in items if item[1] not in stored]
                if todo:
                    messages.append(_Message(rec.offset, todo, stored, len(stored) + len(todo)))
            else:
                messages.append(_Message(rec.offset, items, set(), len(items)))
        return messages

    def _write_direct(self, batch: Batch) -> None:
        """Insert the batch's rows as single-month offset runs, skipping what is stored."""
        tp = (batch.topic, batch.partition)
        if tp in self._resync:
            self._refresh(batch.topic, [batch.partition])
        with _gc_paused():
            for target in self._targets_of(batch.topic):
                key = (batch.topic, batch.partition, target.table)
                inserts = _plan_inserts(self._messages(batch, target, self._marks.get(key)),
                                        self.max_rows_per_insert)
                for ins in inserts:
                    try:
                        if ins.chunks:
                            self.backend.insert_columns(
                                target.table, target.columns, ins.columns(len(target.columns)))
                        else:
                            self.backend.insert(target.table, target.columns, ins.rows)
                    except SinkError:
                        self._resync.add(tp)
                        raise
                    for msg, indices in ins.segments:
                        msg.stored.update(indices)
                    self._marks[key] = ins.segments[-1][0].mark()

    def write(self, batch: Batch) -> None:
        """Persist one batch: into ClickHouse, or (unreachable, with a spool) into the spool.

        A partition with spooled batches has them inserted first, so ClickHouse always sees
        each partition in offset order.
        """
        if not batch.records:
            return
        with self._io_lock:
            if self.spool is None:
                self._ensure_ready()
                self._write_direct(batch)
                return
            tp = (batch.topic, batch.partition)
            if not self._outage_active():
                try:
                    self._ensure_ready()
                    if self.spool.has(tp):
                        self._drain_locked(tp)
                    self._write_direct(batch)
                    self._outage_over()
                    return
                except SinkUnavailableError as exc:
                    self._enter_outage(exc)
            self._spool_batch(batch)

    # ---- the spool -------------------------------------------------------------------------

    def _spool_batch(self, batch: Batch) -> None:
        assert self.spool is not None
        codec = self.codecs[batch.topic]
        entries = [SpoolEntry(r.offset, r.timestamp_ms, r.key, codec.encode(r.value))
                   for r in batch.records]
        try:
            self.spool.append(batch.topic, batch.partition, entries)
        except SpoolFullError as exc:
            retry = max(0.2, self._outage_until - time.monotonic())
            raise BackpressureError(f"{exc}; paused until ClickHouse takes the spool", retry) from exc
        self._resync.add((batch.topic, batch.partition))
        self.spool_stats.spooled_messages += len(entries)
        self.spool_stats.spooled_batches += 1
        self._wake.set()

    def _drain_locked(self, tp: TP) -> None:
        """Insert ``tp``'s spooled batches in order, skipping what is stored; then delete them.

        The stored marks are read first, so draining again after a crash mid-drain only
        inserts what is missing. Call with the I/O lock held.
        """
        assert self.spool is not None
        topic, partition = tp
        self._refresh(topic, [partition])
        codec = self.codecs[topic]
        drained = 0
        for entries in self.spool.read(tp):
            try:
                records = [SinkRecord(topic, partition, e.offset, e.key, codec.decode(e.value),
                                      e.timestamp_ms) for e in entries]
            except CodecError as exc:
                raise SpoolCorruptError(f"spooled message of {topic}[{partition}]: {exc}") from exc
            self._write_direct(Batch(topic, partition, records))
            drained += 1
            self.spool_stats.drained_batches += 1
        log.info("%s: drained %d spooled batches of %s[%d]", self.name, drained, topic, partition)
        self.spool.clear(tp)

    def drain(self) -> bool:
        """Drain every spooled partition this sink owns (or every one, before it owns any).

        Returns True when nothing is left to drain; raises SinkError if ClickHouse refuses.
        The maintenance thread calls this; tests and tools may too.
        """
        with self._io_lock:
            if self.spool is None:
                return True
            self._ensure_ready()
            todo = [tp for tp in self.spool.partitions() if not self._owned or tp in self._owned]
            for tp in todo:
                self._drain_locked(tp)
            self._outage_over()
            return not self.spool.partitions()

    # ---- the maintenance thread ----------------------------------------------------------------

    def _start_maintenance(self) -> None:
        if self._maintenance is None and not self._closing.is_set():
            self._maintenance = threading.Thread(
                target=self._maintain, name=f"{self.name}-maintenance", daemon=True
            )
            self._maintenance.start()

    def _maintenance_wait(self) -> float:
        with self._io_lock:
            pending = self.spool is not None and bool(self.spool.partitions())
            if pending or not self._ready:
                return min(max(0.05, self._outage_until - time.monotonic()), MAX_PROBE_SECONDS)
        if self.retention_months is not None:
            return max(1.0, min(_IDLE_WAKE_SECONDS, self._next_retention - time.monotonic()))
        return _IDLE_WAKE_SECONDS

    def _maintain(self) -> None:
        """Drain spooled partitions whose traffic stopped; run retention daily."""
        while not self._closing.is_set():
            self._wake.wait(self._maintenance_wait())
            self._wake.clear()
            if self._closing.is_set():
                return
            try:
                self._maintenance_step()
            except Exception:  # the thread must outlive any surprise; the loop retries
                log.exception("%s: maintenance step failed", self.name)
                self._closing.wait(1.0)

    def _maintenance_step(self) -> None:
        with self._io_lock:
            if self.spool is not None and not self._outage_active():
                owned = [tp for tp in self.spool.partitions() if tp in self._owned]
                if owned or not self._ready:
                    try:
                        self._ensure_ready()
                        for tp in owned:
                            self._drain_locked(tp)
                        self._outage_over()
                    except SinkError as exc:  # unreachable, busy or refused: back off, retry
                        self._enter_outage(exc)
        self._run_retention_if_due()

    def close(self) -> None:
        """Stop the maintenance thread, close the spool, and the backend if this sink opened it."""
        self._closing.set()
        self._wake.set()
        if self._maintenance is not None:
            self._maintenance.join(30)
        with self._io_lock:
            if self.spool is not None:
                self.spool.close()
        if self.owns_backend:
            self.backend.close()
