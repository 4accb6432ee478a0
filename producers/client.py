"""The metering client library: any application meters usage with ``add_amounts``.

::

    from producers.client import MeteringClient

    with MeteringClient("kafka:9092", tenant_id="acme") as client:
        client.add_amounts("order-123", "api-gateway-7", timestamp_ms,
                           {"api_calls": 1, "egress_bytes": 5120, "gpu_seconds": "0.25"})

What a call does
    ``add_amounts(unique_key, instance_id, timestamp, amounts, metadata)`` becomes one usage
    record per amount type: ``event_id = f"{unique_key}:{amount_type}"``, ``metric =
    amount_type``, ``resource_id = instance_id`` (the billed instance), ``source = "client"``.
    A retry with the same ``unique_key`` produces the same event ids, and the stream stage
    drops repeated event ids (within ``DEDUP_HORIZON_SECONDS``, 24 h by default), so retries
    never double-bill. Retries must keep the tenant: the dedup state lives with the tenant's
    partition.

Tenant
    The tenant (the customer who pays) is ``metadata["tenant_id"]`` when the call gives one
    (it is taken out of the metadata and becomes the record's ``tenant_id``), otherwise the
    client's ``tenant_id`` constructor default. A call with neither is rejected. So a
    per-tenant service builds ``MeteringClient(..., tenant_id="acme")`` and never repeats it,
    and a multi-tenant service passes ``metadata={"tenant_id": ...}`` per call.

Never blocking on the network, never dropping silently
    A call validates its arguments on the caller's thread (a bad argument raises
    :class:`InvalidUsageError` naming every bad field) and appends one tuple to a bounded
    in-memory buffer under a lock held for a few hundred nanoseconds. Building the records,
    Avro encoding and producing happen on a background flusher thread, by size
    (``flush_size`` records) or time (``flush_interval``). The buffer bound ``max_buffer``
    counts records not yet acknowledged by Kafka (buffered *and* in flight), so an
    unreachable Kafka turns into back-pressure instead of unbounded memory. A full buffer
    applies ``full_policy``: ``"block"`` waits up to ``block_timeout`` seconds for room, then
    raises :class:`BufferFullError`; ``"raise"`` raises at once. Envelopes Kafka fails to
    deliver with a retriable error are sent again (same event ids: harmless). ``close()``
    (or leaving the ``with`` block) flushes and waits; whatever Kafka still has not
    acknowledged by its timeout is counted ``failed`` and reported by a
    :class:`~producers.errors.PublishError`.

Latency
    The common call (string ids, int milliseconds, a dict of int amounts, no metadata) is
    checked without allocating, and its buffer entry is six slots appended to one flat list
    (no per-call object survives for the garbage collector to trace); other calls take the
    fully validated path. ``bench/client_latency.py`` measures p50 about 1-3 us and p99 about
    5-10 us on a shared 2-core machine against a real broker. Callers and the flusher share
    the GIL, so a call interrupted by a switch to the flusher waits for its slice (up to
    ``sys.getswitchinterval()``, 5 ms), and a full garbage collection stalls every thread;
    both are rare enough to show at p99.9 and max, not at p99.

Metrics
    ``billing_client_events_total{status, amount_type}`` (records) and
    ``billing_client_amounts_total{status, amount_type}`` (summed amounts), status one of
    ``buffered`` (accepted into the buffer), ``published`` (acknowledged by Kafka),
    ``failed`` (given up at close), ``rejected`` (the call raised: invalid or buffer full).
    At any time ``buffered == published + failed + pending``. Counters are kept in plain
    dicts under the client's lock and read by a custom collector at scrape time, so the hot
    path pays no Prometheus locking. The clients sharing a registry (the global one by
    default) are summed into one collector; pass ``registry=CollectorRegistry()`` to keep a
    client's counters apart (tests).
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import itertools
import logging
import re
import threading
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from confluent_kafka import KafkaError, KafkaException
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from producers.errors import ProducerError, PublishError
from producers.publisher import EnvelopePublisher, usage_record

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "BufferFullError",
    "ClientClosedError",
    "Envelope",
    "FieldError",
    "InvalidUsageError",
    "MeteringClient",
    "TrackedPublisher",
    "parse_rfc3339_ns",
]

log = logging.getLogger(__name__)

#: the logical topic of client usage
CLIENT_TOPIC = "usage.client"
STATUSES = ("buffered", "published", "failed", "rejected")
FullPolicy = Literal["block", "raise"]

_MAX_VALUE = Decimal(10) ** 29  # decimal(38, 9) holds 29 integer digits
_MAX_INT = 10**29
_SCALE = -9
_WIDE = decimal.Context(prec=80)  # counter sums: never rounded
_KEY_MAX = 512
#: the stream stage's bounds (streams/normalize.py): refused here, not dead-lettered later
_MAX_AGE_MS = 35 * 24 * 3600 * 1000
_MAX_FUTURE_MS = 5 * 60 * 1000
_wall = time.time
_QUANTUM = Decimal(1).scaleb(_SCALE)
_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])


# ---- errors ------------------------------------------------------------------------------------


class FieldError(tuple[str, str]):
    """One bad field: ``(field, description)``."""

    __slots__ = ()

    @property
    def field(self) -> str:
        """The field's path, e.g. ``amounts.cpu_seconds``."""
        return self[0]

    @property
    def description(self) -> str:
        """What is wrong with it."""
        return self[1]


class InvalidUsageError(ProducerError, ValueError):
    """The arguments of a call cannot be billed; ``fields`` names every bad one."""

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self.fields = [FieldError(f) for f in fields]
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.fields))


class BufferFullError(ProducerError):
    """The client's buffer is full (Kafka is slower than the callers, or unreachable).

    Nothing was buffered: the caller still holds the usage and may retry with the same
    ``unique_key`` later.
    """


class ClientClosedError(ProducerError):
    """The client is closed."""


# ---- time --------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch of an RFC 3339 timestamp (up to 9 fraction digits).

    Raises ValueError for anything else (a missing offset included: a naive time is ambiguous).
    """
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp like 2024-01-31T12:00:00.5Z")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    second = min(int(s), 59)  # a leap second is folded onto :59
    moment = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), second, tzinfo=dt.UTC)
    if not z:
        offset = dt.timedelta(hours=int(oh), minutes=int(om))
        moment -= offset if sign == "+" else -offset
    seconds = (moment - _EPOCH) // dt.timedelta(seconds=1)
    nanos = int((frac or "").ljust(9, "0")) if frac else 0
    return seconds * 1_000_000_000 + nanos


# ---- a publisher that reports each envelope's delivery -----------------------------------------


class Envelope:
    """One produced envelope: its Kafka key and bytes, and what the sender attached to it.

    Holding the encoded bytes (not the record dicts) keeps memory small and the garbage
    collector's work low while envelopes wait for Kafka, and lets a retry resend exactly the
    same bytes.
    """

    __slots__ = ("count", "key", "payload", "tag", "token")

    def __init__(self, key: bytes, payload: bytes, count: int, tag: Any) -> None:
        self.key = key
        self.payload = payload
        self.count = count  # records in the envelope
        self.tag = tag  # the sender's summary of the records (see send_tracked)
        self.token = -1


DeliveryCallback = Callable[[Envelope, "KafkaError | None"], None]


class TrackedPublisher(EnvelopePublisher):
    """An :class:`EnvelopePublisher` whose sends report each envelope's delivery.

    ``send_tracked`` calls ``on_delivery(envelope, error_or_None)`` exactly once per envelope
    when Kafka acknowledged it (acks=all, idempotent producer) or gave up on it, so a caller
    can wait for exactly its own records instead of flushing everybody's. Callbacks run on
    whichever thread polls the producer: :meth:`poll`, or the background poller of
    :meth:`start_polling`. (It reuses the base class's producer, codec and settings; the
    per-envelope callback could move into ``EnvelopePublisher`` itself.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._poller: threading.Thread | None = None
        self._poll_stop = threading.Event()
        # every envelope produced and not yet reported: token -> (envelope, callback)
        self._inflight: dict[int, tuple[Envelope, DeliveryCallback]] = {}
        self._inflight_lock = threading.Lock()
        self._tokens = itertools.count()

    def send_tracked(
        self,
        records: Iterable[Mapping[str, Any]],
        on_delivery: DeliveryCallback,
        *,
        block: bool = True,
        watermark_ms: int | None = None,
        summarize: Callable[[Sequence[Mapping[str, Any]]], Any] | None = None,
    ) -> list[Envelope]:
        """Produce ``records`` as envelopes (grouped per tenant, key = tenant); returns them.

        ``summarize(records_of_one_envelope)`` becomes the envelope's ``tag`` (default None),
        so the records themselves need not be kept. With ``block=False`` a full local
        producer queue raises :class:`PublishError` at once (envelopes already produced by
        this call still report through ``on_delivery``); otherwise the call polls until
        there is room.
        """
        by_tenant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in records:
            by_tenant[r["tenant_id"]].append(r)
        out = []
        now_ms = int(time.time() * 1000)
        for tenant, recs in by_tenant.items():
            key = tenant.encode()
            for i in range(0, len(recs), self.max_records):
                chunk = recs[i : i + self.max_records]
                payload = self._codec.encode({
                    "envelope_id": uuid.uuid4().hex,
                    "source": self.source,
                    "producer": self.producer_name,
                    "sent_at_ms": now_ms,
                    "watermark_ms": watermark_ms,
                    "records": chunk,
                })
                env = Envelope(key, payload, len(chunk), summarize(chunk) if summarize else None)
                self.resend(env, on_delivery, block=block)
                out.append(env)
        return out

    def resend(self, envelope: Envelope, on_delivery: DeliveryCallback, *, block: bool = True) -> None:
        """Produce an envelope (again: the same bytes, so the same event ids)."""
        token = envelope.token = next(self._tokens)
        with self._inflight_lock:
            self._inflight[token] = (envelope, on_delivery)
        report = functools.partial(self._report, token)
        try:
            while True:
                try:
                    self._producer.produce(self.topic, envelope.payload, key=envelope.key,
                                           on_delivery=report)
                    return
                except BufferError as exc:
                    if not block:
                        raise PublishError("the local producer queue is full") from exc
                    self._producer.poll(0.05)
                except KafkaException as exc:
                    raise PublishError(str(exc)) from exc
        except BaseException:
            with self._inflight_lock:
                self._inflight.pop(token, None)
            raise

    def _report(self, token: int, err: KafkaError | None, _msg: Any) -> None:
        with self._inflight_lock:
            entry = self._inflight.pop(token, None)
        if entry is None:
            return  # abandoned: already reported as failed
        envelope, on_delivery = entry
        try:
            on_delivery(envelope, err)
        except Exception:  # a callback must never break librdkafka's poll loop
            log.exception("delivery callback failed")

    def abandon(self, wait: float = 0.5) -> int:
        """Give up on every envelope not yet reported; each reports exactly once, with an error.

        Purges librdkafka's queues (in flight too: their fate becomes unknowable, so they
        count as not delivered), serves the resulting callbacks, and reports any envelope
        still unreported with ``_PURGE_INFLIGHT``. Later broker answers are ignored.
        Returns how many envelopes were given up.
        """
        with self._inflight_lock:
            n = len(self._inflight)
        if not n:
            return 0
        self._producer.purge(in_queue=True, in_flight=True, blocking=False)
        self._producer.poll(wait)
        with self._inflight_lock:
            left = list(self._inflight.values())
            self._inflight.clear()
        for envelope, on_delivery in left:
            try:
                on_delivery(envelope, KafkaError(KafkaError._PURGE_INFLIGHT))
            except Exception:
                log.exception("delivery callback failed")
        return n

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks for up to ``timeout`` seconds; returns how many ran."""
        return int(self._producer.poll(timeout))

    def in_flight(self) -> int:
        """Envelopes produced and not yet reported."""
        with self._inflight_lock:
            return len(self._inflight)

    def check_reachable(self, timeout: float = 2.0) -> int:
        """The topic's partition count; :class:`PublishError` when Kafka does not answer."""
        try:
            md = self._producer.list_topics(self.topic, timeout=timeout)
        except KafkaException as exc:
            raise PublishError(f"Kafka did not answer a metadata request: {exc}") from exc
        topic = md.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise PublishError(f"topic {self.topic}: {topic.error if topic else 'missing'}")
        return len(topic.partitions)

    def start_polling(self, interval: float = 0.05) -> None:
        """Serve delivery callbacks on a daemon thread until :meth:`stop_polling`."""
        if self._poller is not None:
            return
        self._poll_stop.clear()

        def loop() -> None:
            while not self._poll_stop.is_set():
                self._producer.poll(interval)

        self._poller = threading.Thread(target=loop, name=f"poll-{self.topic}", daemon=True)
        self._poller.start()

    def stop_polling(self, flush_timeout: float = 5.0) -> None:
        """Stop the poller after trying to deliver what is queued for ``flush_timeout`` s."""
        if self._poller is None:
            return
        self._producer.flush(flush_timeout)
        self._poll_stop.set()
        self._poller.join(5)
        self._poller = None


def _retriable(err: KafkaError) -> bool:
    if err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
        return False
    return bool(err.retriable()) or err.code() in (
        KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT,
    )


# ---- counters -----------------------------------------------------------------------------------


#: per amount type: [records, summed amount]
_Summary = dict[str, list[Any]]


def _summarize_entries(buf: Sequence[Any]) -> _Summary:
    """Sum a flat buffer (``_FIELDS`` slots per call) per amount type."""
    out: _Summary = {}
    for items in buf[4::_FIELDS]:
        for kind, amount in items.items():
            slot = out.get(kind)
            if slot is None:
                out[kind] = [1, amount]
            else:
                slot[0] += 1
                slot[1] = _WIDE.add(slot[1], amount)
    return out


def _summarize_records(records: Sequence[Mapping[str, Any]]) -> _Summary:
    out: _Summary = {}
    for r in records:
        slot = out.get(r["metric"])
        if slot is None:
            out[r["metric"]] = [1, r["value"]]
        else:
            slot[0] += 1
            slot[1] = _WIDE.add(slot[1], r["value"])
    return out


class _Counts:
    """Per (status, amount type): records and summed amounts, guarded by the client's lock.

    The hot path does not count: entries in the buffer (``buf``) or being drained
    (``draining``) are counted ``buffered`` at snapshot time, and the flusher counts them for
    good once it has drained them (summing outside the lock, merging under it).
    """

    __slots__ = ("amounts", "buf", "draining", "events", "lock")

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.events: dict[tuple[str, str], int] = {}
        self.amounts: dict[tuple[str, str], Decimal] = {}
        self.buf: list[Any] = []  # the client's current buffer of entries
        self.draining: list[Any] = []  # entries taken by the flusher, not yet counted

    def add(self, status: str, amount_type: str, events: int, amount: Decimal | int) -> None:
        """Count (caller holds ``lock``)."""
        key = (status, amount_type)
        self.events[key] = self.events.get(key, 0) + events
        self.amounts[key] = _WIDE.add(self.amounts.get(key, 0), amount)

    def merge(self, status: str, summary: _Summary) -> None:
        """Count a summary (caller holds ``lock``)."""
        for kind, (n, amount) in summary.items():
            self.add(status, kind, n, amount)

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], Decimal]]:
        """Consistent copies of both dicts, buffered entries not yet counted included."""
        with self.lock:
            events, amounts = dict(self.events), dict(self.amounts)
            uncounted = self.buf + self.draining
        for kind, (n, amount) in _summarize_entries(uncounted).items():
            key = ("buffered", kind)
            events[key] = events.get(key, 0) + n
            amounts[key] = _WIDE.add(amounts.get(key, 0), amount)
        return events, amounts


class _ClientCollector(Collector):
    """Exposes the counters of one or more clients (summed) at scrape time."""

    def __init__(self) -> None:
        self._sources: list[_Counts] = []
        self._lock = threading.Lock()

    def attach(self, counts: _Counts) -> None:
        with self._lock:
            self._sources.append(counts)

    def collect(self) -> Iterator[CounterMetricFamily]:
        events: dict[tuple[str, str], int] = defaultdict(int)
        amounts: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        with self._lock:
            sources = list(self._sources)
        for src in sources:
            ev, am = src.snapshot()
            for k, v in ev.items():
                events[k] += v
            for k, a in am.items():
                amounts[k] = _WIDE.add(amounts[k], a)
        fe = CounterMetricFamily(
            "billing_client_events", "Usage records by client status and amount type",
            labels=["status", "amount_type"])
        fa = CounterMetricFamily(
            "billing_client_amounts", "Summed usage amounts by client status and amount type",
            labels=["status", "amount_type"])
        for (status, kind), n in sorted(events.items()):
            fe.add_metric([status, kind], float(n))
            fa.add_metric([status, kind], float(amounts[(status, kind)]))
        yield fe
        yield fa

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("billing_client_events", "", labels=["status", "amount_type"])
        yield CounterMetricFamily("billing_client_amounts", "", labels=["status", "amount_type"])


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _ClientCollector] = weakref.WeakKeyDictionary()
_COLLECTORS_LOCK = threading.Lock()


def _collector_for(registry: CollectorRegistry | None) -> _ClientCollector:
    """The one collector of ``registry`` (the global one by default), summing its clients."""
    registry = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = _COLLECTORS[registry] = _ClientCollector()
            registry.register(collector)
        return collector


# ---- validation ----------------------------------------------------------------------------------


def _amount(value: Any, field: str, errors: list[tuple[str, str]]) -> Decimal | int | None:
    """An exact, billable amount, or None after appending why not."""
    t = type(value)
    if t is int:
        if 0 <= value < _MAX_INT:
            return value  # type: ignore[no-any-return]
        errors.append((field, f"{value} is outside [0, 10^29)"))
        return None
    scale_known = False
    if t is str:
        try:
            d = Decimal(value)
        except decimal.InvalidOperation:
            errors.append((field, f"{value!r} is not a decimal number"))
            return None
        # "12.345": the digits after the point are the scale (no exponent to shift them)
        dot = value.find(".")
        scale_known = ("e" not in value and "E" not in value
                       and (dot < 0 or len(value.rstrip()) - dot - 1 <= 9))
    elif t is Decimal:
        d = value
    else:
        hint = ("; floats are inexact: pass a Decimal, an int or a decimal string like \"0.25\""
                if t is float else "")
        errors.append((field, f"{t.__name__} is not an amount{hint}"))
        return None
    if not d.is_finite() or d < 0 or d >= _MAX_VALUE:
        errors.append((field, f"{value} is not a finite amount in [0, 10^29)"))
        return None
    if not scale_known:
        try:
            d.quantize(_QUANTUM, context=_EXACT)
        except decimal.Inexact:
            errors.append((field, f"{value} has more than 9 decimal places"))
            return None
    return d


def _countable(value: Any) -> Decimal | int:
    """A rejected amount as counted: itself when it is a plain non-negative number, else 0."""
    if type(value) is int and value >= 0:
        return value  # type: ignore[no-any-return]
    if type(value) is Decimal and value.is_finite() and value >= 0:
        return value
    return 0


def _timestamp_ms(value: Any, errors: list[tuple[str, str]], field: str = "timestamp") -> int:
    t = type(value)
    if t is int:
        if value >= 0:
            return value  # type: ignore[no-any-return]
        errors.append((field, "milliseconds since the epoch must not be negative"))
        return 0
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            errors.append((field, "a naive datetime is ambiguous: give it a timezone"))
            return 0
        return (value - _EPOCH) // dt.timedelta(milliseconds=1)
    if t is str:
        try:
            return parse_rfc3339_ns(value) // 1_000_000
        except ValueError as exc:
            errors.append((field, str(exc)))
            return 0
    errors.append((field, f"{t.__name__}: pass milliseconds (int), an aware datetime or RFC 3339"))
    return 0


# ---- the client ---------------------------------------------------------------------------------

#: a buffered call: unique_key, instance_id, event time ms, tenant, {type: amount}, metadata
_Entry = tuple[str, str, int, str, "dict[str, Decimal | int]", "dict[str, str] | None"]
#: the buffer is one flat list, _FIELDS slots per call: no object per call survives for the
#: garbage collector to trace (a list of tuples made full collections cost tens of ms)
_FIELDS = 6

_client_ids = itertools.count(1)


class MeteringClient:
    """Meter usage from any Python application; see the module docstring for the contract."""

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: Settings | None = None,
        topic: str | None = None,
        tenant_id: str | None = None,
        source: str = "client",
        max_buffer: int = 100_000,
        flush_interval: float = 0.5,
        flush_size: int = 5_000,
        full_policy: FullPolicy = "block",
        block_timeout: float = 5.0,
        registry: CollectorRegistry | None = None,
        producer_name: str | None = None,
        publisher_config: Mapping[str, Any] | None = None,
        retry_backoff: float = 0.5,
    ) -> None:
        """Start the client's flusher thread; give ``bootstrap_servers`` or ``settings``.

        ``topic`` defaults to ``settings.topic("usage.client")`` (``usage.client`` without
        settings). ``max_buffer`` bounds the records not yet acknowledged by Kafka;
        ``flush_size`` (records) and ``flush_interval`` (seconds) trigger a send.
        """
        if bootstrap_servers is None:
            if settings is None or not settings.kafka_bootstrap_servers:
                raise ValueError("MeteringClient needs bootstrap_servers or settings with "
                                 "KAFKA_BOOTSTRAP_SERVERS")
            bootstrap_servers = settings.kafka_bootstrap_servers
        if topic is None:
            topic = settings.topic(CLIENT_TOPIC) if settings is not None else CLIENT_TOPIC
        if full_policy not in ("block", "raise"):
            raise ValueError(f"full_policy must be 'block' or 'raise', not {full_policy!r}")
        if max_buffer < 1 or flush_size < 1 or flush_interval <= 0 or block_timeout < 0:
            raise ValueError("max_buffer and flush_size must be >= 1, flush_interval > 0, "
                             "block_timeout >= 0")
        if tenant_id is not None and (type(tenant_id) is not str or not tenant_id):
            raise ValueError("tenant_id must be a non-empty string")
        self.topic = topic
        self.tenant_id = tenant_id
        self.source = source
        self.max_buffer = max_buffer
        self.flush_interval = flush_interval
        self.flush_size = flush_size
        self.full_policy: FullPolicy = full_policy
        self.block_timeout = block_timeout
        self.retry_backoff = retry_backoff
        self.name = producer_name or f"metering-client-{next(_client_ids)}"
        self._pub = TrackedPublisher(
            bootstrap_servers, topic, source=source, producer_name=self.name,
            config=publisher_config)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counts = _Counts(self._lock)
        self._buf: list[Any] = self._counts.buf
        self._buf_records = 0  # records in _buf
        self._pending = 0  # records accepted and not yet published or failed
        self._retry: list[Envelope] = []
        self._retry_at = 0.0
        self._flush_requested = False
        self._closing = False
        self._closed = False
        self._stop = threading.Event()
        self.last_error: str | None = None
        self.publish_retries = 0
        _collector_for(registry).attach(self._counts)
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-flusher", daemon=True)
        self._thread.start()

    # ---- the hot path ---------------------------------------------------------------------

    def add_amounts(
        self,
        unique_key: str,
        instance_id: str,
        timestamp: int | dt.datetime | str,
        amounts: Mapping[str, Decimal | int | str],
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Buffer one record per amount type; returns how many. Never waits for the network.

        ``timestamp`` is the event time: milliseconds since the epoch (int), an aware
        datetime, or an RFC 3339 string, at most 35 days old and 5 minutes ahead (the stream
        stage's bounds). Amounts are exact: Decimal, int, or a decimal
        string, >= 0, at most 9 decimal places. Raises :class:`InvalidUsageError` (nothing
        buffered) or, when the buffer stays full, :class:`BufferFullError`.
        """
        return self._submit(unique_key, instance_id, timestamp, amounts, metadata,
                            self.full_policy == "block")

    def try_add_amounts(
        self,
        unique_key: str,
        instance_id: str,
        timestamp: int | dt.datetime | str,
        amounts: Mapping[str, Decimal | int | str],
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Like :meth:`add_amounts` but never blocks: a full buffer raises at once (for servers)."""
        return self._submit(unique_key, instance_id, timestamp, amounts, metadata, False)

    def _submit(
        self,
        unique_key: Any,
        instance_id: Any,
        timestamp: Any,
        amounts: Any,
        metadata: Any,
        block: bool,
    ) -> int:
        tenant = self.tenant_id
        entry: Any = None  # a tuple, freed as soon as the buffer's list has copied it
        # the common case, checked without allocating: str ids, int ms, a dict of int amounts
        if (
            metadata is None and tenant is not None and type(timestamp) is int
            and type(unique_key) is str and type(instance_id) is str and type(amounts) is dict
            and unique_key and instance_id and amounts and len(unique_key) <= _KEY_MAX
            and -_MAX_FUTURE_MS <= _wall() * 1000 - timestamp <= _MAX_AGE_MS
        ):
            for kind, value in amounts.items():
                if type(value) is not int or type(kind) is not str or not kind or not 0 <= value < _MAX_INT:
                    break
            else:
                entry = (unique_key, instance_id, timestamp, tenant, amounts.copy(), None)
        if entry is None:
            entry = self._validated(unique_key, instance_id, timestamp, amounts, metadata)
        n = len(entry[4])
        with self._lock:
            if self._closing or self._pending + n > self.max_buffer:
                self._refuse(entry[4], block)  # raises unless room was made
            self._buf.extend(entry)
            self._buf_records += n
            self._pending += n
        return n

    def _validated(
        self, unique_key: Any, instance_id: Any, timestamp: Any, amounts: Any, metadata: Any
    ) -> _Entry:
        """The general path: every check, every bad field named in one InvalidUsageError."""
        errors: list[tuple[str, str]] = []
        if type(unique_key) is not str or not unique_key or len(unique_key) > _KEY_MAX:
            errors.append(("unique_key", f"must be a non-empty string of at most {_KEY_MAX} characters"))
        if type(instance_id) is not str or not instance_id:
            errors.append(("instance_id", "must be a non-empty string"))
        ts = timestamp if type(timestamp) is int and timestamp >= 0 else _timestamp_ms(timestamp, errors)
        if not errors or errors[-1][0] != "timestamp":
            age = _wall() * 1000 - ts
            if age > _MAX_AGE_MS:
                errors.append(("timestamp", "more than 35 days old: too late to bill"))
            elif age < -_MAX_FUTURE_MS:
                errors.append(("timestamp", "more than 5 minutes in the future (clock skew?)"))
        tenant = self.tenant_id
        meta: dict[str, str] | None = None
        if metadata:
            if type(metadata) is not dict and not isinstance(metadata, Mapping):
                errors.append(("metadata", "must be a mapping of strings to strings"))
            else:
                meta = dict(metadata)
                for k, v in meta.items():
                    if type(k) is not str or type(v) is not str:
                        errors.append((f"metadata.{k}", "keys and values must be strings"))
                t = meta.pop("tenant_id", None)
                if t is not None:
                    tenant = t
                meta = meta or None
        if not tenant or type(tenant) is not str:
            errors.append(("tenant_id", "no tenant: give metadata['tenant_id'] or the client's tenant_id"))
        items: dict[str, Decimal | int] = {}
        if not amounts or (type(amounts) is not dict and not isinstance(amounts, Mapping)):
            errors.append(("amounts", "must be a non-empty mapping of amount type to amount"))
        else:
            for kind, raw in amounts.items():
                if type(kind) is not str or not kind:
                    errors.append((f"amounts.{kind}", "amount types must be non-empty strings"))
                    continue
                amount = _amount(raw, f"amounts.{kind}", errors)
                if amount is not None:
                    items[kind] = amount
        if errors:
            with self._lock:
                if isinstance(amounts, Mapping) and amounts:
                    for k, v in amounts.items():
                        self._counts.add("rejected", str(k), 1, _countable(v))
                else:
                    self._counts.add("rejected", "", 1, 0)
            raise InvalidUsageError(errors)
        return (unique_key, instance_id, ts, tenant, items, meta)  # type: ignore[return-value]

    def _refuse(self, items: Mapping[str, Decimal | int], block: bool) -> None:
        """Called with the lock held: return once ``items`` fit, or count them rejected and raise."""
        n = len(items)
        if block and n <= self.max_buffer and not self._closing:
            deadline = time.monotonic() + self.block_timeout
            while self._pending + n > self.max_buffer and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._pending + n <= self.max_buffer and not self._closing:
                return
        for kind, v in items.items():
            self._counts.add("rejected", kind, 1, v)
        if self._closing:
            raise ClientClosedError("the client is closed")
        raise BufferFullError(
            f"buffer full: {self._pending} of {self.max_buffer} records not yet acknowledged by "
            f"Kafka" + (f" after waiting {self.block_timeout}s" if block else ""))

    # ---- flushing -------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> None:
        """Send everything buffered and wait until nothing is pending (all acknowledged).

        Raises :class:`PublishError` when records are still pending after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flush_requested = True
            try:
                while self._pending > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PublishError(
                            f"{self._pending} records not acknowledged by Kafka within {timeout}s"
                            + (f" (last error: {self.last_error})" if self.last_error else ""))
                    self._cond.wait(min(left, 0.1))
            finally:
                self._flush_requested = False

    def close(self, timeout: float = 30.0) -> None:
        """Flush, stop the flusher; records Kafka has not acknowledged by then count as failed.

        Raises :class:`PublishError` naming how many failed. Idempotent.
        """
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        failed_before = self._total("failed")
        error: PublishError | None = None
        try:
            self.flush(timeout)
        except PublishError as exc:
            error = exc
        self._stop.set()
        self._thread.join(timeout + 10)
        self._fail_remaining()  # never even produced: failed too, never a silent drop
        self._pub.abandon()  # produced, not acknowledged within the flush: failed, counted once
        self._pub.close()
        with self._lock:
            self._closed = True
        lost = self._total("failed") - failed_before
        if error is not None or lost:
            raise PublishError(
                f"{lost} records not acknowledged by Kafka within {timeout}s; counted as failed"
                + (f" (last error: {self.last_error})" if self.last_error else "")) from error

    def __enter__(self) -> MeteringClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- what happened --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records accepted and not yet published or failed."""
        return self._pending

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def _total(self, status: str) -> int:
        events, _ = self._counts.snapshot()
        return sum(n for (s, _k), n in events.items() if s == status)

    def stats(self) -> dict[str, Any]:
        """Totals per status (records, and amounts as exact decimal strings) and buffer state."""
        events, amounts = self._counts.snapshot()
        out: dict[str, Any] = {s: 0 for s in STATUSES}
        sums: dict[str, Decimal] = {s: Decimal(0) for s in STATUSES}
        for (status, _kind), n in events.items():
            out[status] += n
        for (status, _kind), a in amounts.items():
            sums[status] = _WIDE.add(sums[status], a)
        out["amounts"] = {s: str(v) for s, v in sums.items()}
        out.update(pending=self._pending, buffered_now=self._buf_records,
                   publish_retries=self.publish_retries, last_error=self.last_error,
                   max_buffer=self.max_buffer)
        return out

    def counts(self, status: str, amount_type: str) -> tuple[int, Decimal]:
        """Records and summed amount of one status and amount type."""
        events, amounts = self._counts.snapshot()
        key = (status, amount_type)
        return events.get(key, 0), Decimal(amounts.get(key, 0))

    # ---- the flusher thread ---------------------------------------------------------------

    def _run(self) -> None:
        tick = min(0.02, self.flush_interval)
        last_send = time.monotonic()
        pub = self._pub
        while True:
            try:
                pub.poll(tick)  # releases the GIL; serves delivery callbacks
                now = time.monotonic()
                if self._retry and now >= self._retry_at:
                    with self._lock:
                        retry, self._retry = self._retry, []
                    for env in retry:
                        self._resend(env)
                buf_records = self._buf_records
                if buf_records and (
                    buf_records >= self.flush_size
                    or now - last_send >= self.flush_interval
                    or self._flush_requested
                    or self._closing
                ):
                    last_send = now
                    self._drain()
            except Exception:  # the flusher must outlive any bug; close() still accounts
                log.exception("%s: flusher iteration failed", self.name)
                time.sleep(self.retry_backoff)
            if self._stop.is_set():
                break
        # closing: anything Kafka still holds is given up, and reported as failed
        pub.abandon()

    def _drain(self) -> None:
        """Take the buffer (O(1) under the lock), count it, send it in slices."""
        counts = self._counts
        with self._lock:
            buf = counts.draining = self._buf
            self._buf = counts.buf = []
            self._buf_records = 0
        summary = _summarize_entries(buf)  # outside the lock: callers keep going
        with self._lock:
            counts.merge("buffered", summary)
            counts.draining = []
        # one envelope's records at a time: few record dicts are ever alive together, so
        # the garbage collector has little to trace (and to promote) while we encode
        by_tenant: dict[str, list[int]] = {}
        for i in range(0, len(buf), _FIELDS):
            tenant = buf[i + 3]
            starts = by_tenant.get(tenant)
            if starts is None:
                by_tenant[tenant] = [i]
            else:
                starts.append(i)
        source = self.source
        size = self._pub.max_records
        sent = 0
        for tenant, starts in by_tenant.items():
            records: list[dict[str, Any]] = []
            for i in starts:
                key, instance, ts, _tenant, items, meta = buf[i : i + _FIELDS]
                for kind, value in items.items():
                    records.append(usage_record(
                        event_id=f"{key}:{kind}", tenant_id=tenant, source=source,
                        resource_id=instance, metric=kind, value=value, event_time_ms=ts,
                        metadata=meta))
                    if len(records) >= size:
                        self._send(records)
                        records = []
                        sent += 1
                        if sent % 8 == 0:
                            self._pub.poll(0)  # acknowledgements free room for blocked callers
            if records:
                self._send(records)

    def _send(self, records: Sequence[Mapping[str, Any]]) -> None:
        try:
            self._pub.send_tracked(records, self._delivered, summarize=_summarize_records)
        except Exception as exc:  # encoding or a fatal producer error: never a silent drop
            self.last_error = f"send failed: {exc}"
            log.error("%s: could not send %d records: %s", self.name, len(records), exc)
            with self._lock:
                self._counts.merge("failed", _summarize_records(records))
                self._pending -= len(records)
                self._cond.notify_all()

    def _resend(self, env: Envelope) -> None:
        try:
            self._pub.resend(env, self._delivered)
        except Exception as exc:
            self._delivered(env, KafkaError(KafkaError._FAIL, f"resend failed: {exc}"))

    def _delivered(self, env: Envelope, err: KafkaError | None) -> None:
        if err is not None and _retriable(err) and not self._stop.is_set():
            self.publish_retries += 1
            self.last_error = str(err)
            log.warning("%s: %d records not delivered (%s); retrying", self.name, env.count, err)
            with self._lock:
                self._retry.append(env)
                self._retry_at = time.monotonic() + self.retry_backoff
            return
        if err is not None:
            self.last_error = str(err)
            log.error("%s: %d records failed: %s", self.name, env.count, err)
        with self._lock:
            self._counts.merge("published" if err is None else "failed", env.tag)
            self._pending -= env.count
            self._cond.notify_all()

    def _fail_remaining(self) -> None:
        with self._lock:
            retry, buf = self._retry, self._buf
            self._retry, self._buf, self._buf_records = [], [], 0
            self._counts.buf = self._buf
            summary = _summarize_entries(buf)
            self._counts.merge("buffered", summary)  # as _drain would have
            self._counts.merge("failed", summary)
            self._pending -= sum(n for n, _ in summary.values())
            for env in retry:
                self._counts.merge("failed", env.tag)
                self._pending -= env.count
            self._cond.notify_all()
