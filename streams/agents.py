"""The Faust agents: normalize source envelopes, then window and score them.

Where a sample goes:
  usage.<source> --normalize--> usage.records --windows--> usage.windows
                        \\-> usage.dlq (reason)        \\-> usage.late (window already closed)

Agents consume batches with ``take_events`` (Faust's cost is per message, so each message is
a batch envelope), aggregate in plain dicts, and wait for Kafka to acknowledge everything
they produced before the batch's events are acked. No exception escapes an agent: Faust
would ack and skip the event; we dead-letter it with the reason instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
from faust.types import TP

from metering.config import Settings
from schemas import CodecError, encode_dead_letter, envelope_codec, window_codec
from schemas.codec import SINGLE_OBJECT_MAGIC
from streams.aggregations import DEFAULT_METRIC_AGGREGATIONS
from streams.columns import Columns
from streams.dedup import EventIdFilter, TableBackedFilters, digests
from streams.normalize import invalid_records
from streams.offsets import RESEEK_AFTER_S, OffsetGuard, Verdict
from streams.output import KafkaOutput
from streams.tables import StreamTables
from streams.topics import StreamTopics
from streams.windows import FoldedMessage, MessageOutcome, PartitionWindows, WindowConfig, fold_message

__all__ = [
    "Published", "RecentlyEncoded", "WindowState", "install_agents", "window_config", "window_ids_horizon",
]

log = logging.getLogger(__name__)

TAKE_MAX = 500
NORMALIZE_TAKE_MAX = 100
# how long a batch waits to fill: under a backlog batches fill at once, so this matters only
# when input pauses; then each stage waits this long before handling what it has (with 0.2 s
# the end of a burst waited twice that, normalizer then window stage, before its results)
TAKE_WITHIN = 0.05


@dataclass
class StreamStats:
    """Counters of the stream stage (shown by the live views)."""

    duplicates_dropped: int = 0


stats = StreamStats()


@dataclass
class WindowState:
    """The window agent's per-partition state, shared with the idle-close timer.

    ``held`` lists, per partition, the input messages not yet acked: (offset, release_at,
    message), in offset order. A message is acked only once every window it touched is
    closed and the close is in the window-state table, and only after every earlier message
    was, so the committed offset never passes an open window.
    """

    config: WindowConfig
    partitions: dict[int, PartitionWindows] = field(default_factory=dict)
    held: dict[int, list[tuple[int, int, Any]]] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    # partition -> (offset sought back to, monotonic time of the seek, topic partition)
    seeking: dict[int, tuple[int, float, Any]] = field(default_factory=dict)
    # partition -> its closed_wm when its state was last saved (see persist_and_release)
    saved_wm: dict[int, int | None] = field(default_factory=dict)

    def of(self, partition: int, saved: Any, ids: EventIdFilter | None = None) -> PartitionWindows:
        """The windows of one input partition, restored from ``saved`` on first use."""
        pw = self.partitions.get(partition)
        if pw is None:
            log.info("windows: partition %d starts from %s", partition,
                     {k: v for k, v in (saved or {}).items() if k != "log"} or "nothing")
            pw = self.partitions[partition] = PartitionWindows(self.config, saved, ids)
            self.held[partition] = []
        self.last_seen[partition] = time.monotonic()
        return pw

    def forget(self, partitions: Any) -> None:
        """Drop the state of revoked partitions; their new owner replays from the commit."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.held.pop(p, None)
            self.last_seen.pop(p, None)
            self.seeking.pop(p, None)
            self.saved_wm.pop(p, None)

    async def seek_back(self, app: faust.App, tp: Any, offset: int) -> None:
        """Seek a partition back to ``offset`` (later messages of the same fetch are skipped
        until the re-read reaches them); again only when the re-read has not begun within
        ``RESEEK_AFTER_S`` (a seek can be lost, see streams/offsets.py)."""
        now = time.monotonic()
        sought = self.seeking.get(tp.partition)
        if sought is not None and sought[0] == offset and now - sought[1] < RESEEK_AFTER_S:
            return
        self.seeking[tp.partition] = (offset, now, tp)
        log.log(logging.INFO if sought is None else logging.WARNING,
                "windows: %s[%d] restored state needs offset %d first; seeking back%s",
                tp.topic, tp.partition, offset, "" if sought is None else " again")
        await app.consumer.seek_wait({tp: offset})

    def overdue_seeks(self) -> list[tuple[Any, int]]:
        """Seeks back whose re-read has not begun within ``RESEEK_AFTER_S``:
        (topic partition, offset) to seek again."""
        now = time.monotonic()
        return [(tp, off) for off, at, tp in self.seeking.values() if now - at >= RESEEK_AFTER_S]


@dataclass(slots=True)
class Published:
    """What the window stage needs of a message the normalizer just published: its folded
    samples (:func:`~streams.windows.fold_message`) or, when it does not fold, its records."""

    envelope_id: str
    watermark_ms: int | None
    samples: int
    records: list[dict[str, Any]] | None  # None when folded
    folded: FoldedMessage | None
    ids_digests: list[int] | None  # the records' event-id digests, when known

    @classmethod
    def of(cls, envelope: dict[str, Any], ids_digests: list[int] | None,
           config: WindowConfig, columns: Columns | None = None) -> Published:
        """Fold the envelope's records now, while they are fresh in memory: holding the
        decoded records until the window stage takes them made every later decode slower
        (python -m bench stream_compute --in-flight). Only with digests: without them the
        window stage needs the event ids. ``columns``: the records' columns, when known."""
        records = envelope["records"]
        folded = fold_message(config, records, columns) if ids_digests is not None else None
        return cls(envelope["envelope_id"], envelope["watermark_ms"], len(records),
                   None if folded is not None else records, folded, ids_digests)

    def add_to(self, windows: PartitionWindows, offset: int,
               load: Callable[[], list[Mapping[str, Any]]]) -> MessageOutcome:
        """Count this message in ``windows`` at input ``offset``. ``load()`` decodes its
        records again; it is called only when a folded message's records are needed."""
        if self.folded is not None:
            return windows.add_folded(offset, self.folded, load, self.watermark_ms,
                                      ids_digests=self.ids_digests)
        return windows.add(offset, self.records or [], self.watermark_ms, ids_digests=self.ids_digests)


class RecentlyEncoded:
    """What the normalizer just published, by exact bytes, so the window stage in the same
    worker (partitions are co-assigned) can skip decoding it, hashing its event ids and
    folding it.
    A hit is the very same message: looked up by the payload's length, head and tail, then
    compared whole (hashing the whole 50 KB payload twice, at put and at take, cost three
    times the compare); bounded, so a miss just decodes."""

    def __init__(self, max_records: int = 200_000) -> None:
        self._items: OrderedDict[tuple[int, bytes, bytes], tuple[bytes, Published]] = OrderedDict()
        self._max_records = max_records
        self._records = 0
        self._taken = asyncio.Event()

    async def room(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the window stage has taken enough that
        the next batch fits: with a backlog the normalizer would otherwise run so far ahead
        that everything is evicted before it is taken, and the window stage decodes again."""
        if self._records <= self._max_records // 2:
            return
        self._taken.clear()
        try:
            await asyncio.wait_for(self._taken.wait(), timeout)
        except TimeoutError:
            pass  # the window stage is elsewhere (another worker) or slow: evict instead

    def put(self, payload: bytes, published: Published) -> None:
        """Remember a published payload and what the window stage needs of it."""
        key = _lookup_key(payload)
        if key in self._items:
            # the same payload again, or (rarely) another with the same head and tail: the
            # first stays; a take of the other compares unequal and decodes
            return
        self._items[key] = (payload, published)
        self._records += published.samples
        while self._records > self._max_records and self._items:
            _, (_, old) = self._items.popitem(last=False)
            self._records -= old.samples

    def take(self, payload: bytes | None) -> Published | None:
        """What was remembered of a payload published here, once; None when unknown."""
        if not payload:
            return None
        key = _lookup_key(payload)
        item = self._items.get(key)
        if item is None or item[0] != payload:
            return None
        del self._items[key]
        hit = item[1]
        self._records -= hit.samples
        if self._records <= self._max_records // 2:
            self._taken.set()
        return hit


def _lookup_key(payload: bytes) -> tuple[int, bytes, bytes]:
    # the head holds the envelope id, the tail the last record's: distinct for distinct
    # messages in practice, and a collision only costs a decode
    return len(payload), payload[:64], payload[-64:]


class _OutputCloser(faust.Service):
    """Closes the agents' output producer when the service it depends on stops."""

    def __init__(self, output: KafkaOutput, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._output = output

    async def on_stop(self) -> None:
        left = await asyncio.to_thread(self._output.close)
        if left:
            log.error("output: %d messages not acknowledged by Kafka at shutdown", left)
        else:
            log.info("output: every message acknowledged; closed")


#: send(topic, key, value, partition=None): queue one message; awaiting the result waits for
#: Kafka's acknowledgement
_Send = Callable[..., Awaitable[Awaitable[Any]]]


def _records_of(codec: Any, payload: bytes) -> list[Mapping[str, Any]]:
    records: list[Mapping[str, Any]] = codec.decode(payload)["records"]
    return records


def _dead(ev: faust.EventT, stage: str, reason: str) -> bytes:
    msg = ev.message
    return encode_dead_letter(
        topic=msg.topic, partition=msg.partition, offset=msg.offset, stage=stage,
        reason=reason, key=msg.key, payload=msg.value,
    )


def window_config(settings: Settings) -> WindowConfig:
    """How the window stage cuts and aggregates windows, from the settings."""
    return WindowConfig(
        sizes_ms=tuple(x * 1000 for x in settings.window_sizes_seconds),
        lateness_ms=settings.allowed_lateness_seconds * 1000,
        weights=settings.score_weights,
        heartbeat_timeout_ms=settings.vm_heartbeat_timeout_seconds * 1000,
        aggregations=settings.metric_aggregations or DEFAULT_METRIC_AGGREGATIONS,
    )


def window_ids_horizon(settings: Settings) -> tuple[int, int]:
    """Horizon and bucket (ms) of the window stage's event-id filter: a few of the largest
    windows, so a copy re-published by a restarted normalizer is still known."""
    largest = max(settings.window_sizes_seconds) * 1000
    return 2 * largest + settings.allowed_lateness_seconds * 1000 + 600_000, max(60_000, largest // 6)


def install_agents(
    app: faust.App, topics: StreamTopics, tables: StreamTables, settings: Settings,
    bootstrap_servers: str,
) -> WindowState:
    """Register the normalize and windows agents and the idle-close timer on ``app``; their
    output goes to the Kafka cluster at ``bootstrap_servers``."""
    env_codec = envelope_codec()
    win_codec = window_codec()
    state = WindowState(window_config(settings))

    async def settle(pending: list[Awaitable[Any]]) -> None:
        # at-least-once: the batch's events are acked only after Kafka acked our output
        if pending:
            await asyncio.gather(*pending)

    # every output of both agents goes through librdkafka (see streams/output.py); Faust's
    # own producer still writes the tables' changelogs, which its commits wait for. Closed
    # with Faust's producer, which a worker stops after its agents, so a batch still being
    # handled at shutdown can finish sending
    output = KafkaOutput(bootstrap_servers)
    app.producer.add_dependency(_OutputCloser(output))

    async def send(topic: faust.TopicT, key: bytes | None, value: bytes,
                   partition: int | None = None) -> Awaitable[Any]:
        return await output.send(topic.get_topic_name(), key, value, partition)

    recent = RecentlyEncoded()
    dedup_table = tables.dedup

    def send_dedup(part: int, key: str, value: Any) -> None:
        dedup_table.send_changelog(part, key, value, key_serializer="json", value_serializer="json")

    # normalizer: repeated event ids within the dedup horizon (producer retries)
    source_ids = TableBackedFilters(
        dedup_table.data, send_dedup, "p", settings.dedup_horizon_seconds * 1000)
    # window stage: exact per input offset, so copies re-published by a restarted
    # normalizer are dropped, never counted as late. Its horizon is a few windows, but at
    # high rates those are tens of millions of ids: compacted like the normalizer's, with
    # each id's first offset
    horizon_ms, bucket_ms = window_ids_horizon(settings)
    window_ids = TableBackedFilters(dedup_table.data, send_dedup, "w", horizon_ms, bucket_ms=bucket_ms)

    # what each agent processed, per input topic and partition (see streams/offsets.py)
    source_offsets = OffsetGuard("normalize")
    record_offsets = OffsetGuard("windows")

    def id_filter(part: int) -> EventIdFilter | None:
        return source_ids.get(part) if settings.dedup_horizon_seconds else None

    async def normalize_one(ev: Any, msg: Any, part: int, pending: list[Awaitable[Any]]) -> None:
        # one source message; a function of its own so that its decoded records are freed
        # before the next message is decoded (decoding into memory just freed is faster,
        # see docs/ARCHITECTURE.md)
        try:
            env = env_codec.decode(msg.value or b"")
        except CodecError as exc:
            pending.append(await send(topics.dlq, None, _dead(ev, "normalize", str(exc))))
            return
        ids = id_filter(part)
        sent_at = env["sent_at_ms"]
        records = env["records"]
        # every field read once, for validation, hashing, the tenant check and folding
        cols = Columns.of(records)
        dropped = 0
        bad = invalid_records(records, sent_at, cols)
        if bad:
            dropped += len(bad)
            for i, reason in bad:
                pending.append(await send(topics.dlq, None, _dead(
                    ev, "normalize",
                    f"record {i} ({records[i].get('event_id')}): {reason}")))
            skip = {i for i, _ in bad}
            records = [r for i, r in enumerate(records) if i not in skip]
            cols = Columns.of(records)
        ds: list[int] | None = None  # the records' id digests, for the window stage too
        if ids is not None:
            ds = digests(cols.event_ids)
            flags = ids.fresh(None, sent_at, ids_digests=ds)
            if flags is not None:
                repeated = flags.count(False)
                dropped += repeated
                stats.duplicates_dropped += repeated
                records = [r for r, new in zip(records, flags, strict=True) if new]
                ds = None  # no longer the records'
                cols = Columns.of(records)
        tenants = set(cols.tenants)
        # one output per input message and tenant, in input order: the window
        # stage's lateness depends on message order, so normalizing a backlog
        # must not reorder what the live run would have seen
        value = msg.value or b""
        if not dropped and len(tenants) == 1 and value[:2] == SINGLE_OBJECT_MAGIC:
            # the common case: the input is already canonical, forward its bytes
            # (with the producer's watermark inside); encoding costs as much as decoding
            tenant = next(iter(tenants))
            recent.put(value, Published.of(env, ds, state.config, cols))
            pending.append(await send(topics.records, tenant.encode(), value))
            return
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            by_tenant.setdefault(rec["tenant_id"], []).append(rec)
        origin = f"{msg.topic}:{part}"
        for tenant, recs in by_tenant.items():
            out_env = {
                "envelope_id": f"{origin}:{msg.offset}:{tenant}", "source": env["source"],
                "producer": origin, "sent_at_ms": sent_at, "watermark_ms": None,
                "records": recs,
            }
            out = env_codec.encode(out_env)
            recent.put(out, Published.of(out_env, None, state.config))
            pending.append(await send(topics.records, tenant.encode(), out))
        if env["watermark_ms"] is not None:
            # a producer's promise about its partition goes to the same partition
            # number of usage.records (tenant keys hash alike on both)
            mark = env_codec.encode({
                "envelope_id": f"{origin}:{msg.offset}:watermark", "source": env["source"],
                "producer": origin, "sent_at_ms": sent_at,
                "watermark_ms": env["watermark_ms"], "records": [],
            })
            pending.append(await send(topics.records, None, mark, part))

    @app.agent(topics.sources, name="normalize")
    async def normalize(stream: Any) -> None:  # faust.Stream: StreamT lacks take_events
        # fewer messages per batch than the window stage: source envelopes carry hundreds of
        # records each, and a batch must fit the cache of what was just encoded
        async for events in stream.take_events(NORMALIZE_TAKE_MAX, within=TAKE_WITHIN):
            # a reference on every message: Faust acks a whole batch when it is done with it,
            # even one cut short; only what was processed is released, below
            for ev in events:
                ev.message.incref()
            await recent.room(timeout=1.0)
            pending: list[Awaitable[Any]] = []
            done: list[Any] = []
            try:
                touched: dict[int, int] = {}  # partition -> first offset in this batch
                for ev in events:
                    msg = ev.message
                    part = msg.partition
                    verdict = source_offsets.check((msg.topic, part), msg.offset)
                    if verdict is not Verdict.PROCESS:
                        await _skip(app, source_offsets, verdict, msg)
                        continue
                    source_offsets.processed((msg.topic, part), msg.offset)
                    done.append(msg)
                    touched.setdefault(part, msg.offset)
                    await normalize_one(ev, msg, part, pending)
                await settle(pending)
                for part, first_offset in touched.items():
                    # only now: a crash before this re-publishes (dropped again later)
                    source_ids.save(part, first_offset)
                for msg in done:
                    msg.ack(app.consumer)
            except Exception:  # never let Faust ack-and-skip silently
                log.exception("normalize: batch of %d failed; dead-lettering it", len(events))
                # acked only once dead-lettered: acked without it, their samples would be
                # neither billed nor anywhere to replay them from
                if await _dead_letter_all(send, topics, events, "normalize"):
                    for msg in done:
                        msg.ack(app.consumer)

    table = tables.window_state

    def persist_and_release(part: int) -> None:
        # after the batch's output is acknowledged: log the closes, then ack what they free
        pw = state.partitions[part]
        held = state.held[part]
        closed = pw.closed_wm
        # release strictly in offset order: Faust commits the first run of consecutive
        # acked offsets and does not check it starts at the committed one, so an ack
        # behind a still-held message would commit past an open window
        n = 0
        while n < len(held) and (held[n][1] == 0 or (closed is not None and held[n][1] <= closed)):
            n += 1
        if not n and part in state.saved_wm and state.saved_wm[part] == closed and not pw.replaying:
            # nothing closed since the last save and nothing to release: the saved state
            # still restarts this partition exactly (from the same held message, against the
            # same closed_wm; the replay teaches the id filter the ids not saved), so saving
            # again would only add changelog writes, once per small batch
            return
        free, keep = held[:n], held[n:]
        min_held = keep[0][0] if keep else None
        snap = pw.snapshot(min_held)
        window_ids.save(part, pw.last_offset)
        key = f"p{part}"
        table.data[key] = snap
        table.send_changelog(part, key, snap, key_serializer="json", value_serializer="json")
        for _, _, message in free:
            message.ack(app.consumer)
        state.held[part] = keep
        state.saved_wm[part] = closed

    @app.agent(topics.records, name="windows")
    async def windows(stream: Any) -> None:
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
            # every message is held (see persist_and_release); one skipped below is held for
            # good, so Faust's ack of the batch cannot ack its offset before the original
            for ev in events:
                ev.message.incref()
            pending: list[Awaitable[Any]] = []
            try:
                touched: set[int] = set()
                for ev in events:
                    msg = ev.message
                    part = msg.partition
                    pw = state.of(part, table.data.get(f"p{part}"), window_ids.get(part))
                    resume = pw.resume_from
                    if resume is not None and msg.offset > resume:
                        # restored from a snapshot, but input starts past the first message the
                        # snapshot still needs (a fetch from before the rebalance's seek):
                        # read the partition again from there, and skip what comes before it
                        await state.seek_back(app, msg.tp, resume)
                        continue
                    if state.seeking:
                        state.seeking.pop(part, None)  # the re-read has begun
                    verdict = record_offsets.check((msg.topic, part), msg.offset)
                    if verdict is not Verdict.PROCESS:
                        await _skip(app, record_offsets, verdict, msg)
                        continue
                    record_offsets.processed((msg.topic, part), msg.offset)
                    touched.add(part)
                    try:
                        # this worker normalized it a moment ago: skip decoding it again
                        hit = recent.take(msg.value)
                        if hit is None:
                            hit = Published.of(env_codec.decode(msg.value or b""), None, state.config)
                    except CodecError as exc:
                        pending.append(await send(topics.dlq, None, _dead(ev, "windows", str(exc))))
                        state.held[part].append((msg.offset, 0, msg))
                        continue
                    outcome = hit.add_to(pw, msg.offset, partial(_records_of, env_codec, msg.value or b""))
                    if outcome.late_counted and outcome.replayed:
                        log.info("windows: replay of %s[%d]@%d counted %d late samples (closed_wm "
                                 "%s then; envelope %s)", msg.topic, part, msg.offset,
                                 outcome.late_counted, outcome.decided_with, hit.envelope_id)
                    if outcome.late:
                        log.info("windows: %d late samples in %s[%d]@%d (closed_wm %s, replay %s, "
                                 "last %s)", len(outcome.late), msg.topic, part, msg.offset,
                                 pw.closed_wm, outcome.replayed, pw.last_offset)
                        pending.extend(await _send_late(send, topics, env_codec, outcome.late))
                    # close after every message: lateness must not depend on batching
                    pending.extend(await _emit(send, topics, win_codec, pw))
                    state.held[part].append((msg.offset, outcome.release_at, msg))
                await settle(pending)
                for part in touched:
                    persist_and_release(part)
            except Exception:
                log.exception("windows: batch of %d failed; dead-lettering it", len(events))
                await _dead_letter_all(send, topics, events, "windows")

    @app.timer(interval=max(1.0, settings.idle_close_seconds / 4))
    async def close_idle_windows() -> None:
        # an idle partition's watermark follows the wall clock, so the last windows of a
        # quiet tenant still close (later samples for them become late, and are counted)
        now = time.monotonic()
        wall_ms = int(time.time() * 1000)
        for part, pw in list(state.partitions.items()):
            if pw.open and now - state.last_seen.get(part, now) >= settings.idle_close_seconds:
                pw.promise(wall_ms - state.config.lateness_ms)
                pending = await _emit(send, topics, win_codec, pw)
                if pending:
                    await settle(pending)
                    if part in state.partitions:
                        persist_and_release(part)

    @app.timer(interval=1.0)
    async def seek_again() -> None:
        # a seek whose re-read never came (see streams/offsets.py) is sent again even when
        # no further message arrives to notice it: the partition's last windows depend on it
        try:
            for guard in (source_offsets, record_offsets):
                for key, offset in guard.overdue():
                    await app.consumer.seek_wait({TP(*key): offset})
            for tp, offset in state.overdue_seeks():
                await state.seek_back(app, tp, offset)
        except Exception:  # a partition revoked meanwhile: its new owner starts afresh
            log.exception("seeking again failed")

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        # Faust seeks assigned partitions to their committed offsets: rebuild from saved state
        name = topics.records.get_topic_name()
        state.forget({tp.partition for tp in assigned if tp.topic == name})
        record_offsets.forget({(tp.topic, tp.partition) for tp in assigned if tp.topic == name})
        sources = set(topics.sources.topics)
        source_offsets.forget({(tp.topic, tp.partition) for tp in assigned if tp.topic in sources})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        state.forget({tp.partition for tp in revoked if tp.topic == topics.records.get_topic_name()})
        sources = set(topics.sources.topics)
        for p in {tp.partition for tp in revoked if tp.topic in sources}:
            source_ids.forget(p)
        for p in {tp.partition for tp in revoked if tp.topic == topics.records.get_topic_name()}:
            window_ids.forget(p)
        record_offsets.forget({(tp.topic, tp.partition) for tp in revoked
                               if tp.topic == topics.records.get_topic_name()})
        source_offsets.forget({(tp.topic, tp.partition) for tp in revoked if tp.topic in sources})

    del normalize, windows, close_idle_windows, seek_again, on_revoked, on_assigned  # registered on the app
    return state


async def _skip(app: faust.App, guard: OffsetGuard, verdict: Verdict, msg: Any) -> None:
    # the message stays referenced (see the batch loops): it is never acked by this copy.
    # seek_wait runs the seek on the consumer's own thread, as Faust's recovery does; the
    # plain seek touches aiokafka from this thread, and partitions sought that way stalled
    if verdict is Verdict.SEEK:
        expected = guard.expected((msg.topic, msg.partition))
        if expected is not None:
            await app.consumer.seek_wait({msg.tp: expected})


async def _emit(send: _Send, topics: StreamTopics, codec: Any, pw: PartitionWindows) -> list[Awaitable[Any]]:
    out = []
    for result in pw.close_due():
        out.append(await send(topics.windows, result["tenant_id"].encode(), codec.encode(result)))
    return out


async def _send_late(
    send: _Send, topics: StreamTopics, codec: Any, late: list[Any]
) -> list[Awaitable[Any]]:
    by_tenant: dict[str, list[Any]] = defaultdict(list)
    for r in late:
        by_tenant[r["tenant_id"]].append(r)
    out = []
    for tenant, recs in by_tenant.items():
        payload = codec.encode({
            "envelope_id": uuid.uuid4().hex, "source": "late", "producer": "windows",
            "sent_at_ms": int(time.time() * 1000), "watermark_ms": None, "records": recs,
        })
        out.append(await send(topics.late, tenant.encode(), payload))
    return out


async def _dead_letter_all(send: _Send, topics: StreamTopics, events: Any, stage: str) -> bool:
    # True once every event is in the dead-letter topic (acknowledged)
    try:
        futs = [await send(topics.dlq, None, _dead(ev, stage, "unexpected error, see worker log"))
                for ev in events]
        await asyncio.gather(*futs)
    except Exception:
        log.exception("%s: could not dead-letter a failed batch; its messages stay unacked, so "
                      "the worker reads them again after a restart", stage)
        return False
    return True
