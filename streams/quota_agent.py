"""The quota agent: usage windows in, quota alerts out, fired at most once.

    usage.windows --quota--> quota.alerts (key = tenant, partition = the window's partition)
                        \\-> usage.dlq (undecodable windows, with the reason)
    quota.limits (compacted, read whole by every worker) + the quota file -> limits in force

State: the ``quota-state`` table, keyed by tenant (raw UTF-8 bytes, so Faust routes web
requests by the same murmur2 partition the tenant's windows are on), value a
:class:`streams.quotas.TenantQuota` as JSON: current period usage, fired thresholds, and the
high-water mark of window ends that makes repeated windows harmless. Written once per key
per batch, after the batch's alerts are acknowledged, to the changelog partition of the
input partition. Plus one marker per partition (key ``\\x00alerts:<p>``): the offset of
``quota.alerts`` partition p up to which every alert is recorded in the table.

No alert twice, across crashes and replays: an alert is acknowledged before the table write
that records it, so a crash in between leaves an alert the table does not know. Alerts of
the tenants of input partition p go to partition p of ``quota.alerts``; so when this worker
(re)gets partition p, it first reads that partition from the marker on and records every
alert there as fired, before it processes any window of p. Re-processing a window after a
crash then finds the threshold fired and does not send it again. (A worker that lost its
partitions but still sends — a zombie — is not fenced; no stage here fences those.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition

from metering import topics as names
from metering.config import Settings
from schemas import CodecError, encode_dead_letter, window_codec
from streams.quotas import (
    DEFAULT_THRESHOLDS,
    LIMITS_TOPIC,
    LimitBook,
    QuotaError,
    TenantQuota,
    alert_codec,
    limit_codec,
    limit_from_record,
    load_quota_file,
    parse_limit_key,
    parse_thresholds,
)
from streams.topics import StreamTopics
from streams.transport import read_to_end

__all__ = [
    "LIMITS_TOPIC",
    "QUOTA_TABLE",
    "QuotaRuntime",
    "QuotaStats",
    "apply_limit_message",
    "install_quota_agent",
    "marker_key",
]

log = logging.getLogger(__name__)

QUOTA_TABLE = "quota-state"

TAKE_MAX = 500
TAKE_WITHIN = 0.2
_READ_TIMEOUT_S = 60.0


def marker_key(partition: int) -> bytes:
    """The table key of partition ``partition``'s alert marker (not a tenant: starts with NUL)."""
    return b"\x00alerts:%d" % partition


@dataclass
class QuotaStats:
    """Counters shown by the quota view."""

    windows_applied: int = 0
    windows_repeated: int = 0
    windows_other_size: int = 0
    alerts_sent: int = 0
    alerts_recovered: int = 0
    dead_letters: int = 0


@dataclass
class QuotaRuntime:
    """What the agent, the limits reader and the web views share."""

    table: Any  # faust TableT
    limits: LimitBook
    thresholds: tuple[int, ...]
    size_ms: int
    alerts_topic: faust.TopicT
    limits_topic_name: str
    bootstrap_servers: list[str]
    limits_ready: asyncio.Event = field(default_factory=asyncio.Event)
    recovered: set[int] = field(default_factory=set)  # partitions whose alerts were read back
    stats: QuotaStats = field(default_factory=QuotaStats)

    def tenant_state(self, tenant: str) -> TenantQuota:
        """This worker's stored quota state of ``tenant`` (empty when it has none)."""
        return TenantQuota.from_json(tenant, self.table.data.get(tenant.encode()))


def _bootstrap(app: faust.App) -> list[str]:
    return [f"{u.host}:{u.port or 9092}" for u in app.conf.broker]


def _dead(ev: Any, reason: str) -> bytes:
    msg = ev.message
    return encode_dead_letter(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                              stage="quota", reason=reason, key=msg.key, payload=msg.value)


async def _read_partition(
    bootstrap: list[str], topic: str, partition: int, start: int
) -> tuple[list[Any], int]:
    """Every message of one topic partition from ``start`` to its end, and the next offset."""
    tp = TopicPartition(topic, partition)
    msgs, ends = await read_to_end(bootstrap, {tp: start}, timeout_s=_READ_TIMEOUT_S)
    return msgs[tp], ends[tp]


def install_quota_agent(
    app: faust.App,
    topics: StreamTopics,
    settings: Settings,
    *,
    quota_file: str | None = None,
    thresholds: Iterable[int] | None = None,
) -> QuotaRuntime:
    """Register the quota agent, its table and the limits reader on ``app``.

    ``quota_file`` and ``thresholds`` default to the settings ``quota_file`` and
    ``quota_thresholds_percent`` (80, 100 when the settings have no such field).
    Raises QuotaError (a MeteringError) when the quota file is invalid.
    """
    path = quota_file if quota_file is not None else getattr(settings, "quota_file", None)
    file_limits = load_quota_file(path).limits if path else ()
    defaults = parse_thresholds(
        thresholds if thresholds is not None
        else getattr(settings, "quota_thresholds_percent", None) or DEFAULT_THRESHOLDS)
    table = app.Table(
        QUOTA_TABLE,
        default=None,
        partitions=settings.topic_partitions,
        # bytes keys: Faust derives the changelog's key serializer from key_type ("raw")
        key_type=bytes,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
        help="per tenant: current period usage, fired thresholds, window high-water mark",
    )
    alerts_topic = app.topic(settings.topic(names.ALERTS), key_serializer="raw", value_serializer="raw",
                             partitions=settings.topic_partitions)
    rt = QuotaRuntime(
        table=table,
        limits=LimitBook(file_limits),
        thresholds=defaults,
        size_ms=min(settings.window_sizes_seconds) * 1000,
        alerts_topic=alerts_topic,
        limits_topic_name=settings.topic(LIMITS_TOPIC),
        bootstrap_servers=_bootstrap(app),
    )
    win_codec = window_codec()
    a_codec = alert_codec()
    windows_name = topics.windows.get_topic_name()
    alerts_name = alerts_topic.get_topic_name()

    def write(part: int, key: bytes, value: Any) -> None:
        table.data[key] = value
        table.send_changelog(part, key, value, key_serializer="raw", value_serializer="json")

    async def read_back(part: int) -> tuple[list[dict[str, Any]], int]:
        marker = table.data.get(marker_key(part)) or {}
        msgs, next_offset = await _read_partition(
            rt.bootstrap_servers, alerts_name, part, int(marker.get("next_offset", 0)))
        alerts = []
        for m in msgs:
            try:
                alerts.append(a_codec.decode(m.value or b""))
            except CodecError as exc:  # not ours: cannot have been fired by us
                log.warning("quota: %s[%d]@%d is not a QuotaAlert: %s", alerts_name, part, m.offset, exc)
        log.info("quota: partition %d: %d alerts read back from %s", part, len(alerts), alerts_name)
        return alerts, next_offset

    @app.agent(topics.windows, name="quota")
    async def quota(stream: Any) -> None:  # faust.Stream: StreamT lacks take_events
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
            try:
                await rt.limits_ready.wait()
                states: dict[bytes, tuple[int, TenantQuota]] = {}
                markers: dict[int, int] = {}
                parts = sorted({ev.message.partition for ev in events} - rt.recovered)
                read = await asyncio.gather(*(read_back(p) for p in parts))
                for part, (recovered, next_offset) in zip(parts, read, strict=True):
                    markers[part] = next_offset
                    for a in recovered:
                        if _state(states, table, part, a["tenant_id"]).record_fired(
                                a["metric"], a["period"], a["period_start_ms"], a["threshold_percent"]):
                            rt.stats.alerts_recovered += 1
                    rt.recovered.add(part)

                pending: list[Awaitable[Any]] = []
                alerts: list[tuple[int, str, dict[str, Any]]] = []
                limits_of: dict[str, Any] = {}
                for ev in events:
                    msg = ev.message
                    part = msg.partition
                    try:
                        w = win_codec.decode(msg.value or b"")
                        tenant = w["tenant_id"]
                        if not tenant:
                            raise QuotaError("tenant_id is empty")
                        lims = limits_of.get(tenant)
                        if lims is None:
                            lims = limits_of[tenant] = rt.limits.for_tenant(tenant)
                        tq = _state(states, table, part, tenant)
                        out = tq.apply_window(w, lims, rt.size_ms, rt.thresholds)
                    except (CodecError, QuotaError) as exc:
                        rt.stats.dead_letters += 1
                        pending.append(await topics.dlq.send(value=_dead(ev, str(exc))))
                        continue
                    if out.applied:
                        rt.stats.windows_applied += 1
                    elif out.reason == "duplicate":
                        rt.stats.windows_repeated += 1
                    else:
                        rt.stats.windows_other_size += 1
                    alerts.extend((part, tenant, a) for a in out.alerts)

                # the alerts are acknowledged before the table records them as fired
                sent = [(part, await rt.alerts_topic.send(
                    key=tenant.encode(), value=a_codec.encode(a), partition=part))
                    for part, tenant, a in alerts]
                results = await asyncio.gather(*(f for _, f in sent), *pending)
                for (part, _), md in zip(sent, results, strict=False):
                    markers[part] = max(markers.get(part, 0), md.offset + 1)
                rt.stats.alerts_sent += len(sent)
                for a in (a for _, _, a in alerts):
                    log.info("quota: alert %s (used %s of %s)", a["alert_id"], a["used"], a["limit"])
                for key, (part, tq) in states.items():
                    if tq.dirty:
                        write(part, key, tq.to_json())
                for part, offset in markers.items():
                    write(part, marker_key(part), {"next_offset": offset})
            except Exception:  # never let Faust ack-and-skip silently
                log.exception("quota: batch of %d failed; dead-lettering it", len(events))
                # alerts of this batch may be out without a table record: read them back
                rt.recovered.clear()
                await _dead_letter_all(topics, events)

    @app.task
    async def quota_limits() -> None:
        await _follow_limits(rt)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        # Faust seeks to the committed offsets: read the alerts back before processing again
        rt.recovered.difference_update({tp.partition for tp in assigned if tp.topic == windows_name})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        rt.recovered.difference_update({tp.partition for tp in revoked if tp.topic == windows_name})

    del quota, quota_limits, on_assigned, on_revoked  # registered on the app
    return rt


def _state(states: dict[bytes, tuple[int, TenantQuota]], table: Any, part: int, tenant: str) -> TenantQuota:
    """The batch's working copy of a tenant's state (loaded from the table on first use)."""
    key = tenant.encode()
    entry = states.get(key)
    if entry is None:
        entry = states[key] = (part, TenantQuota.from_json(tenant, table.data.get(key)))
    return entry[1]


def apply_limit_message(book: LimitBook, key: bytes | None, value: bytes | None) -> str | None:
    """Apply one ``quota.limits`` message to ``book``; the reason it was ignored, or None."""
    if not key:
        return "no key"
    try:
        k = key.decode()
        parse_limit_key(k)
        if value is None:
            book.apply(k, None)  # tombstone: forget the run-time setting
        else:
            book.apply(k, limit_from_record(limit_codec().decode(value), k))
    except (UnicodeDecodeError, CodecError, QuotaError) as exc:
        return str(exc)
    return None


async def _follow_limits(rt: QuotaRuntime) -> None:
    """Read ``quota.limits`` from the beginning, then follow it; ``limits_ready`` is set once
    the topic was read to its end (or found missing: then only the quota file applies)."""
    name = rt.limits_topic_name
    while True:
        consumer = AIOKafkaConsumer(bootstrap_servers=rt.bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            await consumer.start()
            await consumer.topics()  # refresh metadata
            parts = consumer.partitions_for_topic(name)
            if not parts:
                if not rt.limits_ready.is_set():
                    log.warning("quota: topic %s does not exist; only the quota file's limits apply "
                                "until it does", name)
                    rt.limits_ready.set()
                await asyncio.sleep(5.0)
                continue
            tps = [TopicPartition(name, p) for p in sorted(parts)]
            # load: the whole topic up to its real end (see read_to_end), then follow from there
            loaded, ends = await read_to_end(rt.bootstrap_servers, {tp: 0 for tp in tps},
                                             timeout_s=_READ_TIMEOUT_S)
            for tp in tps:
                _apply_limits(rt, loaded[tp])
            if not rt.limits_ready.is_set():
                log.info("quota: limits loaded: %d in force", len(rt.limits.effective()))
                rt.limits_ready.set()
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, ends[tp])
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    _apply_limits(rt, msgs)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("quota: reading %s failed; retrying", name)
            await asyncio.sleep(2.0)
        finally:
            await consumer.stop()


def _apply_limits(rt: QuotaRuntime, msgs: Iterable[Any]) -> None:
    for m in msgs:
        why = apply_limit_message(rt.limits, m.key, m.value)
        if why is not None:
            log.warning("quota: ignoring %s[%d]@%d: %s", m.topic, m.partition, m.offset, why)
        else:
            log.info("quota: limit %s %s", m.key, "removed" if m.value is None else "set")


async def _dead_letter_all(topics: StreamTopics, events: Any) -> None:
    try:
        futs = [await topics.dlq.send(value=_dead(ev, "unexpected error, see worker log")) for ev in events]
        await asyncio.gather(*futs)
    except Exception:
        log.exception("quota: could not dead-letter a failed batch")
