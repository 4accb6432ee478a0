"""The ClickHouse sink: usage records and closed windows, stored exactly once.

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

Committed consumer offsets are only a fallback for partitions with no stored rows, so the
sink also does the right thing after ClickHouse was restored from an older backup.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from metering.config import Settings
from metering.topics import DLQ, RECORDS, WINDOWS
from schemas import envelope_codec, window_codec
from sinks.base import Batch, BatchingSink
from sinks.clickhouse.backends import ClickHouseBackend, backend_from_settings, sql_string
from sinks.clickhouse.migrations import RECORDS_TABLE, WINDOWS_TABLE, migrate
from sinks.errors import SinkError

__all__ = [
    "DEFAULT_MAX_ROWS_PER_INSERT",
    "RECORD_COLUMNS",
    "WINDOW_COLUMNS",
    "ClickHouseSink",
    "envelope_rows",
    "window_row",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]
Row = tuple[Any, ...]

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
_REC_DATE = RECORD_COLUMNS.index("event_date")
_REC_INDEX = RECORD_COLUMNS.index("kafka_index")
_WIN_START = WINDOW_COLUMNS.index("window_start")

#: Rows per INSERT. ClickHouse cuts bigger inserts into blocks anyway (max_insert_block_size),
#: and chdb gets each INSERT as one SQL string, so memory stays bounded; correctness does not
#: depend on it, because an insert split in offset order still stores a prefix.
DEFAULT_MAX_ROWS_PER_INSERT = 100_000

_EPOCH = dt.datetime(1970, 1, 1)
_MAX_DATETIME_SECONDS = 2**32 - 1  # DateTime is UInt32 seconds on every version
_MAX_UINT64 = 2**64 - 1


def _datetime_from_ms(ms: int) -> dt.datetime:
    # clamped to what DateTime can hold, so the month the sink computes is the month
    # ClickHouse stores (an out-of-range value would wrap around inside ClickHouse)
    seconds = min(max(ms // 1000, 0), _MAX_DATETIME_SECONDS)
    return _EPOCH + dt.timedelta(seconds=seconds)


def _month(day: dt.date) -> int:
    return day.year * 100 + day.month


def envelope_rows(
    envelope: Mapping[str, Any], *, topic: str, partition: int, offset: int
) -> list[Row]:
    """The ``usage_records`` rows (in :data:`RECORD_COLUMNS` order) of one envelope message.

    ``kafka_index`` is the record's position in the envelope. A repeated ``event_id`` inside
    one envelope is stored once (ReplacingMergeTree would collapse it anyway, and a row that
    later vanishes would make the message look half stored), so ``record_count`` is the
    number of rows the envelope produces: its record count for any well-formed envelope.
    """
    records = envelope.get("records") or []
    seen: set[str] = set()
    keep: list[tuple[int, Mapping[str, Any]]] = []
    for index, record in enumerate(records):
        if record["event_id"] in seen:
            continue
        seen.add(record["event_id"])
        keep.append((index, record))
    count = len(keep)
    rows: list[Row] = []
    for index, r in keep:
        ms = min(max(int(r["event_time_ms"]), 0), _MAX_UINT64)
        event_time = _datetime_from_ms(ms)
        metadata = r.get("metadata") or {}
        keys = sorted(metadata)
        rows.append((
            r["event_id"], r["tenant_id"], r["source"], r["resource_id"], r["metric"],
            r["value"], event_time, ms, event_time.date(), keys, [metadata[k] for k in keys],
            topic, partition, offset, index, count,
        ))
    return rows


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


class _Mark(NamedTuple):
    """How far a topic-partition is stored: ``next_offset`` and, if that message is
    already partly stored, the ``kafka_index`` values it has."""

    next_offset: int
    stored: frozenset[int]


@dataclass(slots=True)
class _Message:
    offset: int
    rows: list[tuple[int, int, Row]]  # (month, kafka_index, row) still to insert
    stored: set[int]  # kafka_index values already in ClickHouse
    expected: int  # rows the message has in total

    def mark(self) -> _Mark:
        if len(self.stored) >= self.expected:
            return _Mark(self.offset + 1, frozenset())
        return _Mark(self.offset, frozenset(self.stored))


@dataclass(slots=True)
class _Insert:
    month: int
    rows: list[Row] = field(default_factory=list)
    segments: list[tuple[_Message, list[int]]] = field(default_factory=list)


def _plan_inserts(messages: Sequence[_Message], max_rows: int) -> list[_Insert]:
    """Cut the messages' rows into single-month inserts, in offset order.

    A message's rows of several months go to consecutive inserts, and only its last month
    group continues with the next messages, so every stored prefix of the inserts leaves at
    most its highest message partial. The month of the open insert goes first, to save an
    INSERT when the previous message ended in the same month.
    """
    inserts: list[_Insert] = []
    for msg in messages:
        groups: dict[int, list[tuple[int, Row]]] = defaultdict(list)
        for month, index, row in msg.rows:
            groups[month].append((index, row))
        order = list(groups)
        if inserts and inserts[-1].month in groups:
            order.remove(inserts[-1].month)
            order.insert(0, inserts[-1].month)
        for month in order:
            pending = groups[month]
            while pending:
                cur = inserts[-1] if inserts else None
                if cur is None or cur.month != month or len(cur.rows) >= max_rows:
                    cur = _Insert(month)
                    inserts.append(cur)
                room = max_rows - len(cur.rows)
                take, pending = pending[:room], pending[room:]
                cur.rows.extend(row for _, row in take)
                cur.segments.append((msg, [index for index, _ in take]))
    return inserts


class ClickHouseSink(BatchingSink):
    """Store ``usage.records`` envelopes and ``usage.windows`` results in ClickHouse.

    Runs the schema migrations once when constructed. Pass ``owns_backend=True`` to have
    :meth:`close` (called when :meth:`run` returns) close the backend too.
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
    ) -> None:
        if max_rows_per_insert < 1:
            raise ValueError("max_rows_per_insert must be at least 1")
        self.backend = backend
        self.owns_backend = owns_backend
        self.records_topic = records_topic
        self.windows_topic = windows_topic
        self.max_rows_per_insert = max_rows_per_insert
        self._marks: dict[TP, _Mark] = {}
        # partitions whose last INSERT failed: it may have landed anyway (lost connection
        # after the server got the data), so ClickHouse is asked again before a retry
        self._resync: set[TP] = set()
        try:
            migrate(backend)
            super().__init__(
                topics={records_topic: envelope_codec(), windows_topic: window_codec()},
                bootstrap_servers=bootstrap_servers,
                group_id=group_id,
                dlq_topic=dlq_topic,
                batch_size=batch_size,
                flush_seconds=flush_seconds,
                consumer_config=consumer_config,
            )
        except BaseException:
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
        """
        owns = backend is None
        if backend is None:
            backend = backend_from_settings(settings)
        params: dict[str, Any] = {
            "records_topic": settings.topic(RECORDS),
            "windows_topic": settings.topic(WINDOWS),
            "group_id": f"{settings.consumer_group_prefix}.clickhouse-sink",
            "dlq_topic": settings.topic(DLQ),
            "batch_size": settings.sink_batch_size,
            "flush_seconds": settings.sink_flush_seconds,
            "owns_backend": owns,
        }
        params.update(kwargs)
        return cls(backend=backend, bootstrap_servers=bootstrap_servers, **params)

    # ---- where to resume -----------------------------------------------------------------

    def _table(self, topic: str) -> str:
        if topic == self.records_topic:
            return RECORDS_TABLE
        if topic == self.windows_topic:
            return WINDOWS_TABLE
        raise ValueError(f"{self.name} does not consume {topic!r}")

    def _read_marks(self, topic: str, partitions: Sequence[int]) -> dict[TP, _Mark]:
        """Ask ClickHouse how far each partition of ``topic`` is stored."""
        if not partitions:
            return {}
        table = self._table(topic)
        t = sql_string(topic)
        parts = ", ".join(str(int(p)) for p in sorted(set(partitions)))
        marks: dict[TP, _Mark] = {}
        if table == WINDOWS_TABLE:
            # one row per message: the highest stored offset is complete by construction
            rows = self.backend.query(
                f"SELECT kafka_partition, max(kafka_offset) FROM {table} "
                f"WHERE kafka_topic = {t} AND kafka_partition IN ({parts}) "
                "GROUP BY kafka_partition"
            )
            for p, offset in rows:
                marks[(topic, int(p))] = _Mark(int(offset) + 1, frozenset())
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
                marks[(topic, int(p))] = _Mark(int(offset) + 1, frozenset())
            else:
                log.warning(
                    "%s: %s[%s]@%s is half stored (%d of %d rows): completing it",
                    self.name, topic, p, offset, len(stored), count,
                )
                marks[(topic, int(p))] = _Mark(int(offset), stored)
        return marks

    def _refresh(self, topic: str, partitions: Sequence[int]) -> None:
        marks = self._read_marks(topic, partitions)
        for p in partitions:
            tp = (topic, p)
            self._resync.discard(tp)
            if tp in marks:
                self._marks[tp] = marks[tp]
            else:
                self._marks.pop(tp, None)

    def resume_offsets(self, partitions: Sequence[TP]) -> Mapping[TP, int]:
        """Resume each partition after its highest stored offset (AT it if half stored)."""
        by_topic: dict[str, list[int]] = defaultdict(list)
        for topic, partition in partitions:
            by_topic[topic].append(partition)
        out: dict[TP, int] = {}
        for topic, parts in by_topic.items():
            self._refresh(topic, parts)
            for p in parts:
                mark = self._marks.get((topic, p))
                if mark is not None:
                    out[(topic, p)] = mark.next_offset
        log.info("%s: resuming from stored offsets %s", self.name, out)
        return out

    # ---- writing -------------------------------------------------------------------------

    def _messages(self, batch: Batch, mark: _Mark | None) -> list[_Message]:
        messages: list[_Message] = []
        is_records = batch.topic == self.records_topic
        for rec in batch.records:
            if mark is not None and rec.offset < mark.next_offset:
                continue  # already stored (an earlier run, or a retried batch)
            stored: set[int] = set()
            if mark is not None and rec.offset == mark.next_offset:
                stored = set(mark.stored)  # half stored before a crash: only the rest
            items: list[tuple[int, int, Row]]
            if is_records:
                items = [
                    (_month(row[_REC_DATE]), row[_REC_INDEX], row)
                    for row in envelope_rows(
                        rec.value, topic=batch.topic, partition=batch.partition, offset=rec.offset
                    )
                ]
            else:
                row = window_row(
                    rec.value, topic=batch.topic, partition=batch.partition, offset=rec.offset
                )
                items = [(_month(row[_WIN_START].date()), 0, row)]
            todo = [item for item in items if item[1] not in stored]
            if todo:
                messages.append(_Message(rec.offset, todo, stored, len(stored) + len(todo)))
        return messages

    def write(self, batch: Batch) -> None:
        """Insert the batch's rows as single-month offset runs, skipping what is stored."""
        tp = (batch.topic, batch.partition)
        table = self._table(batch.topic)
        columns = RECORD_COLUMNS if table == RECORDS_TABLE else WINDOW_COLUMNS
        if tp in self._resync:
            self._refresh(batch.topic, [batch.partition])
        inserts = _plan_inserts(self._messages(batch, self._marks.get(tp)),
                                self.max_rows_per_insert)
        for ins in inserts:
            try:
                self.backend.insert(table, columns, ins.rows)
            except SinkError:
                self._resync.add(tp)
                raise
            for msg, indices in ins.segments:
                msg.stored.update(indices)
            self._marks[tp] = ins.segments[-1][0].mark()

    def close(self) -> None:
        """Close the backend if this sink opened it."""
        if self.owns_backend:
            self.backend.close()
