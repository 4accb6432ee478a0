"""The VM ingest gateway: a billaged-compatible HTTP API that publishes to Kafka.

``metering serve vm-ingest`` answers what unkey's metald sends its billing service
(billaged), as Connect-RPC unary calls (HTTP POST, JSON or binary protobuf bodies):

=====================================================  ==========================================
``POST /billing.v1.BillingService/SendMetricsBatch``   ``{vm_id, customer_id, metrics: [VMMetrics]}``
``POST /billing.v1.BillingService/SendHeartbeat``      ``{instance_id, active_vms: [vm_id]}``
``POST /billing.v1.BillingService/NotifyVmStarted``    ``{vm_id, customer_id, start_time}``
``POST /billing.v1.BillingService/NotifyVmStopped``    ``{vm_id, stop_time}``
``POST /billing.v1.BillingService/NotifyPossibleGap``  ``{vm_id, last_sent, resume_time}``
``GET /health``, ``GET /stats``                        gateway and Kafka state
=====================================================  ==========================================

The same procedures are served under ``/billaged.v1.BillingService/`` and
``/deploy.billaged.v1.BillingService/`` (the proto package's later names). ``VMMetrics`` is
``{timestamp, cpu_time_nanos, memory_usage_bytes, disk_read_bytes, disk_write_bytes,
network_rx_bytes, network_tx_bytes}``. As in Connect's JSON mapping, field names may be
proto names or lowerCamelCase, int64 values JSON numbers or strings, ``timestamp`` an
RFC 3339 string (``{"seconds", "nanos"}`` is accepted too), and an absent field is its zero
value. ``start_time``, ``stop_time``, ``last_sent`` and ``resume_time`` are int64 Unix
times; billaged reads them as nanoseconds (``time.Unix(0, t)``, metald sends
``UnixNano()``) but its own CLI sends seconds, so the unit is taken from the magnitude
(< 1e11 seconds, < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds); RFC 3339
strings are accepted as well. ``Content-Type: application/proto`` bodies are decoded with a
small built-in protobuf wire decoder (metald's connect-go client sends binary protobuf by
default).

Counters are cumulative
    billaged's aggregator (``internal/aggregator``) computes ``cpuDelta =
    metric.CpuTimeNanos - LastCPUNanos`` and likewise for disk and network bytes, and treats
    memory as a point-in-time value: metald reports cumulative counters and a memory gauge.
    The gateway keeps, per VM, the last *acknowledged* point (time and the five counters) in
    memory and publishes per-interval deltas: ``cpu_time_nanos``, ``disk_read_bytes``,
    ``disk_write_bytes``, ``network_rx_bytes``, ``network_tx_bytes`` (delta since the
    previous point; a counter that went down was reset, and its new value is the usage since
    the reset — Prometheus' ``increase`` rule, where billaged drops it) and
    ``memory_usage_bytes`` (the gauge, every point). Each record's metadata carries
    ``interval_ms`` (the span the delta covers) and ``reset: "true"`` after a reset.

    Baseline: ``NotifyVmStarted`` sets the VM's counters to zero at ``start_time`` (a
    started VM's counters begin at zero, so its first sample is billed in full, as billaged
    does). Without a known baseline — a VM first seen after a gateway restart — the first
    point of the first batch only sets the baseline (its memory gauge is still published)
    and deltas start with the next point, in the same batch when it carries several. Usage
    between the last acknowledged point before the restart and that first point is not
    billed: under-billing by at most one interval is preferred to billing a cumulative
    counter twice, which is what billaged's zero-initialised aggregator does after a
    restart. Points at or before the VM's last acknowledged point are skipped (a retried
    batch that was already published, counted as ``stale_samples``), so a retry computes the
    same deltas from the same baseline and yields identical records.

Records (one topic, one schema for everything: ``usage.vm``, key = the tenant)
    ===================  =====================================  ==========================
    metric               value                                  event time, metadata
    ===================  =====================================  ==========================
    the six metrics      delta (gauge for memory), exact        the sample's timestamp
    ``vm_started``       1                                      ``start_time``
    ``vm_stopped``       1                                      ``stop_time``
    ``vm_heartbeat``     1, one per active VM per heartbeat     receive time; ``instance_id``
    ``vm_possible_gap``  gap seconds (resume - last_sent)       ``last_sent``; ``resume_time_ms``
    ===================  =====================================  ==========================

    ``tenant_id`` is the customer; ``resource_id`` the VM; ``source`` ``vm``. Event ids are
    deterministic — ``vm:{vm_id}:{metric}:{timestamp_ns}`` — so a retried batch never
    double-bills (the stream stage drops repeated event ids). Heartbeats carry no time of
    their own, so a retried heartbeat is a second presence mark, never billed.

Tenants of VMs
    Only ``SendMetricsBatch`` and ``NotifyVmStarted`` name the customer, so the gateway keeps
    a VM -> customer map from them. ``NotifyVmStopped`` and ``SendHeartbeat`` entries for a VM
    the gateway has not seen (after a restart) are answered ``success`` (billaged does the
    same) but published nowhere: a record for a made-up tenant would create windows and
    reports for a tenant that does not exist. They are counted (``unknown_vm_notices``,
    ``heartbeat_unknown_vms``) and logged once per VM; the stream stage then sees a hole in
    that VM's heartbeats and flags its window as gapped, which is the truth. A
    ``NotifyPossibleGap`` for an unknown VM matters more (it is what a metald sends after
    losing the gateway), so it is held in memory and published with the VM's next metrics
    batch or start notice, in the same acknowledged send; the answer is ``success: false``
    because nothing is durable yet.

Acknowledgement
    A request is answered ``200`` only after Kafka acknowledged every record it produced
    (acks=all, idempotent producer), waiting for exactly this request's envelopes through
    per-envelope delivery callbacks (never a global flush). Kafka not acknowledging within
    ``ack_timeout`` (or the client's ``Connect-Timeout-Ms``) gives ``503`` with the Connect
    error ``{"code": "unavailable", ...}``; the VM's baseline is not advanced, so the
    client's retry recomputes the same records. Invalid bodies get ``400`` with
    ``{"code": "invalid_argument", "message", "fields": [{"field", "description"}],
    "details": [google.rpc.BadRequest]}`` naming every bad field.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web
from confluent_kafka import KafkaError

from producers.client import Envelope, TrackedPublisher, parse_rfc3339_ns
from producers.errors import PublishError
from producers.publisher import usage_record

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "COUNTER_METRICS",
    "GAUGE_METRICS",
    "LIFECYCLE_METRICS",
    "SERVICE_PREFIXES",
    "VmGateway",
    "build_parser_args",
    "run_from_args",
]

log = logging.getLogger(__name__)

VM_TOPIC = "usage.vm"
SERVICE_PREFIXES = (
    "/billing.v1.BillingService/",
    "/billaged.v1.BillingService/",
    "/deploy.billaged.v1.BillingService/",
)
COUNTER_METRICS = (
    "cpu_time_nanos", "disk_read_bytes", "disk_write_bytes", "network_rx_bytes", "network_tx_bytes",
)
GAUGE_METRICS = ("memory_usage_bytes",)
VM_STARTED, VM_STOPPED, VM_HEARTBEAT, VM_POSSIBLE_GAP = (
    "vm_started", "vm_stopped", "vm_heartbeat", "vm_possible_gap")
LIFECYCLE_METRICS = (VM_STARTED, VM_STOPPED, VM_HEARTBEAT, VM_POSSIBLE_GAP)

#: the stream stage's bounds (streams/normalize.py): later or older events are dead-lettered
MAX_FUTURE_NS = 5 * 60 * 10**9
MAX_AGE_NS = 35 * 24 * 3600 * 10**9
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_POINTS = 100_000
_NS = Decimal(10**9)

_CONNECT_STATUS = {
    "invalid_argument": 400, "unavailable": 503, "deadline_exceeded": 504, "internal": 500,
    "unimplemented": 404, "failed_precondition": 400, "resource_exhausted": 429,
}


# ---- errors --------------------------------------------------------------------------------------


class ConnectError(Exception):
    """An error answered in Connect's JSON error format."""

    def __init__(self, code: str, message: str, fields: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = list(fields)

    def response(self) -> web.Response:
        """The HTTP response: Connect's status for the code, a JSON error body."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            violations = [{"field": f, "description": d} for f, d in self.fields]
            body["fields"] = violations
            body["details"] = [{
                "type": "google.rpc.BadRequest",
                "value": base64.b64encode(_bad_request_proto(self.fields)).decode().rstrip("="),
                "debug": {"fieldViolations": violations},
            }]
        return web.json_response(body, status=_CONNECT_STATUS.get(self.code, 500))


def _invalid(fields: Sequence[tuple[str, str]]) -> ConnectError:
    shown = "; ".join(f"{f}: {d}" for f, d in fields[:20])
    more = f" (and {len(fields) - 20} more)" if len(fields) > 20 else ""
    return ConnectError("invalid_argument", f"{len(fields)} invalid field(s): {shown}{more}", fields)


# ---- protobuf wire format (decoding requests, encoding responses) ---------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _put_bytes(out: bytearray, number: int, data: bytes) -> None:
    _put_varint(out, number << 3 | 2)
    _put_varint(out, len(data))
    out += data


def _bad_request_proto(fields: Sequence[tuple[str, str]]) -> bytes:
    """google.rpc.BadRequest{field_violations: [FieldViolation{field, description}]}."""
    out = bytearray()
    for f, d in fields:
        violation = bytearray()
        _put_bytes(violation, 1, f.encode())
        _put_bytes(violation, 2, d.encode())
        _put_bytes(out, 1, bytes(violation))
    return bytes(out)


def _response_proto(success: bool, message: str | None) -> bytes:
    out = bytearray()
    if success:
        _put_varint(out, 1 << 3 | 0)
        _put_varint(out, 1)
    if message:
        _put_bytes(out, 2, message.encode())
    return bytes(out)


class _WireError(ValueError):
    pass


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("varint longer than 10 bytes")


def _wire_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field of one message, in order."""
    out = []
    pos = 0
    value: Any
    while pos < len(buf):
        tag, pos = _get_varint(buf, pos)
        number, wt = tag >> 3, tag & 7
        if number == 0:
            raise _WireError("field number 0")
        if wt == 0:
            value, pos = _get_varint(buf, pos)
        elif wt == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wt == 2:
            n, pos = _get_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wt == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _WireError(f"unsupported wire type {wt}")
        if pos > len(buf):
            raise _WireError("truncated field")
        out.append((number, wt, value))
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- message schemas -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    number: int
    kind: str  # string | int64 | timestamp | message
    repeated: bool = False
    message: tuple[_Field, ...] = ()

    @property
    def json_name(self) -> str:
        head, *rest = self.name.split("_")
        return head + "".join(p.title() for p in rest)

    def default(self) -> Any:
        if self.repeated:
            return []
        return {"string": "", "int64": 0}.get(self.kind)


_VM_METRICS = (
    _Field("timestamp", 1, "timestamp"),
    _Field("cpu_time_nanos", 2, "int64"),
    _Field("memory_usage_bytes", 3, "int64"),
    _Field("disk_read_bytes", 4, "int64"),
    _Field("disk_write_bytes", 5, "int64"),
    _Field("network_rx_bytes", 6, "int64"),
    _Field("network_tx_bytes", 7, "int64"),
)
_SCHEMAS: dict[str, tuple[_Field, ...]] = {
    "SendMetricsBatch": (
        _Field("vm_id", 1, "string"), _Field("customer_id", 2, "string"),
        _Field("metrics", 3, "message", repeated=True, message=_VM_METRICS)),
    "SendHeartbeat": (
        _Field("instance_id", 1, "string"), _Field("active_vms", 2, "string", repeated=True)),
    "NotifyVmStarted": (
        _Field("vm_id", 1, "string"), _Field("customer_id", 2, "string"),
        _Field("start_time", 3, "int64")),
    "NotifyVmStopped": (_Field("vm_id", 1, "string"), _Field("stop_time", 2, "int64")),
    "NotifyPossibleGap": (
        _Field("vm_id", 1, "string"), _Field("last_sent", 2, "int64"), _Field("resume_time", 3, "int64")),
}
#: int64 fields holding a Unix time of unknown unit (see the module docstring)
_TIME_FIELDS = {"start_time", "stop_time", "last_sent", "resume_time"}
_INT_RE = re.compile(r"-?\d+")


def _json_scalar(f: _Field, value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    if f.kind == "string":
        if isinstance(value, str):
            return value
        errors.append((path, f"must be a string, not {type(value).__name__}"))
        return None
    if f.kind == "int64":
        if isinstance(value, bool):
            errors.append((path, "must be an integer, not a boolean"))
            return None
        if isinstance(value, int):
            v = value
        elif isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
            v = int(value)
        elif isinstance(value, float) and value.is_integer():
            v = int(value)
        elif isinstance(value, str) and f.name in _TIME_FIELDS:
            try:
                return ("ns", parse_rfc3339_ns(value))
            except ValueError as exc:
                errors.append((path, f"must be an int64 Unix time or RFC 3339: {exc}"))
                return None
        else:
            errors.append((path, f"must be an int64 (a JSON number or a string of digits), not {value!r}"))
            return None
        if not INT64_MIN <= v <= INT64_MAX:
            errors.append((path, f"{v} is outside the int64 range"))
            return None
        return v
    if f.kind == "timestamp":
        if isinstance(value, str):
            try:
                return parse_rfc3339_ns(value)
            except ValueError as exc:
                errors.append((path, str(exc)))
                return None
        if isinstance(value, Mapping):
            secs, nanos = value.get("seconds", 0), value.get("nanos", 0)
            try:
                s = int(secs) if not isinstance(secs, bool) else None
                n = int(nanos) if not isinstance(nanos, bool) else None
            except (TypeError, ValueError):
                s = n = None
            if s is None or n is None or not 0 <= n < 10**9:
                errors.append((path, "must be {seconds, nanos} with 0 <= nanos < 1e9"))
                return None
            return s * 10**9 + n
        errors.append((path, "must be an RFC 3339 timestamp string, e.g. 2024-01-31T12:00:00Z"))
        return None
    raise AssertionError(f.kind)


def _from_json(
    obj: Any, fields: tuple[_Field, ...], prefix: str, errors: list[tuple[str, str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: f.default() for f in fields}
    if not isinstance(obj, Mapping):
        errors.append((prefix.rstrip(".") or "body", "must be a JSON object"))
        return out
    for f in fields:
        path = f"{prefix}{f.name}"
        present = [k for k in {f.name, f.json_name} if k in obj]
        if len(present) > 1:
            errors.append((path, f"given twice (as {f.name} and {f.json_name})"))
            continue
        if not present or obj[present[0]] is None:
            continue
        value = obj[present[0]]
        if f.repeated:
            if not isinstance(value, list):
                errors.append((path, "must be a JSON array"))
                continue
            items = []
            for i, item in enumerate(value):
                ipath = f"{path}[{i}]"
                if f.kind == "message":
                    items.append(_from_json(item, f.message, f"{ipath}.", errors))
                else:
                    items.append(_json_scalar(f, item, ipath, errors))
            out[f.name] = items
        elif f.kind == "message":
            out[f.name] = _from_json(value, f.message, f"{path}.", errors)
        else:
            out[f.name] = _json_scalar(f, value, path, errors)
    return out


def _from_proto(
    buf: bytes, fields: tuple[_Field, ...], prefix: str, errors: list[tuple[str, str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: f.default() for f in fields}
    by_number = {f.number: f for f in fields}
    try:
        wire = _wire_fields(buf)
    except _WireError as exc:
        errors.append((prefix.rstrip(".") or "body", f"not a valid protobuf message: {exc}"))
        return out
    counts: dict[str, int] = {}
    for number, wt, value in wire:
        f = by_number.get(number)
        if f is None:
            continue  # unknown fields are skipped, as protobuf does
        idx = counts.get(f.name, 0)
        counts[f.name] = idx + 1
        path = f"{prefix}{f.name}" + (f"[{idx}]" if f.repeated else "")
        want = 0 if f.kind == "int64" else 2
        if wt != want:
            errors.append((path, f"wire type {wt} where {want} was expected"))
            continue
        parsed: Any
        if f.kind == "int64":
            parsed = _signed64(value)
        elif f.kind == "string":
            try:
                parsed = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                errors.append((path, "not valid UTF-8"))
                continue
        elif f.kind == "timestamp":
            seconds = nanos = 0
            try:
                for n, w, v in _wire_fields(bytes(value)):
                    if n == 1 and w == 0:
                        seconds = _signed64(v)
                    elif n == 2 and w == 0:
                        nanos = _signed64(v)
            except _WireError as exc:
                errors.append((path, f"not a valid Timestamp: {exc}"))
                continue
            if not 0 <= nanos < 10**9:
                errors.append((path, "Timestamp nanos outside [0, 1e9)"))
                continue
            parsed = seconds * 10**9 + nanos
        else:
            parsed = _from_proto(bytes(value), f.message, f"{path}.", errors)
        if f.repeated:
            out[f.name].append(parsed)
        else:
            out[f.name] = parsed
    return out


def _unix_ns(value: Any) -> int:
    """An int64 Unix time of unknown unit (or ("ns", n) from RFC 3339) in nanoseconds."""
    if isinstance(value, tuple):
        return int(value[1])
    a = abs(value)
    if a < 10**11:
        return int(value) * 10**9
    if a < 10**14:
        return int(value) * 10**6
    if a < 10**17:
        return int(value) * 10**3
    return int(value)


# ---- validated requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One validated VMMetrics sample: time (ns) and raw values."""

    ts_ns: int
    counters: tuple[int, int, int, int, int]  # in COUNTER_METRICS order
    memory: int


def _check_time(ts_ns: int, path: str, now_ns: int, errors: list[tuple[str, str]]) -> None:
    if ts_ns > now_ns + MAX_FUTURE_NS:
        errors.append((path, "more than 5 minutes in the future (clock skew?)"))
    elif ts_ns < now_ns - MAX_AGE_NS:
        errors.append((path, "more than 35 days old: too late to bill"))


def _require(msg: Mapping[str, Any], name: str, errors: list[tuple[str, str]]) -> None:
    v = msg.get(name)
    if v is None:
        return  # not decodable: the decoder named it already
    if v == "":
        errors.append((name, "required"))
    elif isinstance(v, str) and len(v) > 256:
        errors.append((name, "longer than 256 characters"))


def _points(msg: Mapping[str, Any], now_ns: int, errors: list[tuple[str, str]]) -> list[Point]:
    metrics = msg["metrics"]
    if not metrics:
        errors.append(("metrics", "at least one VMMetrics sample is required"))
        return []
    if len(metrics) > MAX_POINTS:
        errors.append(("metrics", f"more than {MAX_POINTS} samples in one batch"))
        return []
    points: dict[int, tuple[int, Point]] = {}
    for i, m in enumerate(metrics):
        bad = False
        ts = m.get("timestamp")
        if ts is None:
            path = f"metrics[{i}].timestamp"
            if not any(e[0] in (path, f"metrics[{i}]") for e in errors):
                errors.append((path, "required"))
            bad = True
        else:
            before = len(errors)
            _check_time(ts, f"metrics[{i}].timestamp", now_ns, errors)
            bad = len(errors) > before
        values = {}
        for name in (*COUNTER_METRICS, *GAUGE_METRICS):
            v = m.get(name)
            if v is None:
                bad = True  # already reported by the decoder
            elif v < 0:
                errors.append((f"metrics[{i}].{name}", f"{v} is negative"))
                bad = True
            values[name] = v
        if bad:
            continue
        p = Point(ts, tuple(values[n] for n in COUNTER_METRICS), values["memory_usage_bytes"])  # type: ignore[arg-type]
        seen = points.get(ts)
        if seen is not None and seen[1] != p:
            errors.append((f"metrics[{i}].timestamp",
                           f"same timestamp as metrics[{seen[0]}] with different values"))
            continue
        points.setdefault(ts, (i, p))
    return [p for _, p in sorted(points.values(), key=lambda ip: ip[1].ts_ns)]


# ---- per-VM state ----------------------------------------------------------------------------------


@dataclass
class VmState:
    """What the gateway remembers of one VM (in memory; see the module docstring)."""

    customer_id: str | None = None
    last_ts_ns: int | None = None  # the last acknowledged point
    counters: tuple[int, ...] | None = None  # its cumulative counters
    parked_gaps: list[dict[str, Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Deltas:
    """The records of one metrics batch and the baseline they leave behind."""

    records: list[dict[str, Any]]
    last_ts_ns: int | None
    counters: tuple[int, ...] | None
    stale: int = 0
    resets: int = 0
    baselines: int = 0


def vm_deltas(
    vm_id: str,
    customer_id: str,
    points: Sequence[Point],
    last_ts_ns: int | None,
    counters: tuple[int, ...] | None,
) -> Deltas:
    """Records for ``points`` (sorted) given the VM's last acknowledged point; pure."""
    out = Deltas([], last_ts_ns, counters)
    for p in points:
        if out.last_ts_ns is not None and p.ts_ns <= out.last_ts_ns:
            out.stale += 1
            continue
        ms = p.ts_ns // 1_000_000
        out.records.append(usage_record(
            event_id=f"vm:{vm_id}:memory_usage_bytes:{p.ts_ns}", tenant_id=customer_id,
            source="vm", resource_id=vm_id, metric="memory_usage_bytes", value=p.memory,
            event_time_ms=ms))
        prev = out.counters
        if prev is None:
            out.baselines += 1
        else:
            interval = str((p.ts_ns - out.last_ts_ns) // 1_000_000) if out.last_ts_ns else "0"
            for name, now, before in zip(COUNTER_METRICS, p.counters, prev, strict=True):
                meta = {"interval_ms": interval}
                if now >= before:
                    delta = now - before
                else:  # the counter restarted from zero: all of `now` is new usage
                    delta = now
                    meta["reset"] = "true"
                    out.resets += 1
                out.records.append(usage_record(
                    event_id=f"vm:{vm_id}:{name}:{p.ts_ns}", tenant_id=customer_id, source="vm",
                    resource_id=vm_id, metric=name, value=delta, event_time_ms=ms, metadata=meta))
        out.counters = p.counters
        out.last_ts_ns = p.ts_ns
    return out


def _lifecycle(
    vm_id: str, customer_id: str, metric: str, ts_ns: int, value: Decimal | int = 1,
    metadata: Mapping[str, str] | None = None, id_suffix: str | None = None,
) -> dict[str, Any]:
    return usage_record(
        event_id=f"vm:{vm_id}:{metric}:{id_suffix if id_suffix is not None else ts_ns}",
        tenant_id=customer_id, source="vm", resource_id=vm_id, metric=metric, value=value,
        event_time_ms=ts_ns // 1_000_000, metadata=metadata)


# ---- acknowledgements ------------------------------------------------------------------------------


class _Acks:
    """Bridges one request's envelope deliveries (a librdkafka thread) into an asyncio future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[str]] = loop.create_future()
        self.expected: int | None = None
        self.done = 0
        self.errors: list[str] = []

    def on_delivery(self, _env: Envelope, err: KafkaError | None) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._one, None if err is None else str(err))

    def _one(self, err: str | None) -> None:
        self.done += 1
        if err is not None:
            self.errors.append(err)
        self._check()

    def expect(self, n: int) -> None:
        self.expected = n
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.done >= self.expected and not self.future.done():
            self.future.set_result(self.errors)


# ---- the gateway -------------------------------------------------------------------------------------

_STAT_NAMES = (
    "requests", "batches", "samples", "published", "rejected", "errors", "timeouts",
    "stale_samples", "counter_resets", "baselines", "heartbeats", "heartbeat_unknown_vms",
    "lifecycle", "gaps", "unknown_vm_notices", "parked_gaps",
)


class VmGateway:
    """The billaged-compatible ingest service (aiohttp), publishing to ``usage.vm``."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = VM_TOPIC,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ack_timeout: float = 10.0,
        max_body_bytes: int = 8 * 2**20,
        publisher_config: Mapping[str, Any] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        """Configure the gateway; nothing listens until :meth:`start` or :meth:`serve`."""
        self.topic = topic
        self.host = host
        self.port = port
        self.ack_timeout = ack_timeout
        self.max_body_bytes = max_body_bytes
        self._clock_ns = clock_ns
        self._new_publisher = partial(TrackedPublisher, bootstrap_servers, topic, source="vm",
                                      producer_name="vm-gateway", config=publisher_config)
        self._pub = self._new_publisher()
        self.vms: dict[str, VmState] = {}
        self.stats: dict[str, int] = dict.fromkeys(_STAT_NAMES, 0)
        self.by_method: dict[str, int] = {}
        self._warned: set[str] = set()
        self._started_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- the app ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=self.max_body_bytes)
        for prefix in SERVICE_PREFIXES:
            app.router.add_route("*", prefix + "{method}", self._handle_rpc)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/stats", self._handle_stats)
        return app

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8081``."""
        return f"http://{self.host}:{self.port}"

    async def _handle_rpc(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        self.stats["requests"] += 1
        if method not in _SCHEMAS:
            return ConnectError("unimplemented", f"unknown procedure {method!r}; this service has "
                                f"{', '.join(sorted(_SCHEMAS))}").response()
        if request.method != "POST":
            return web.json_response(
                {"code": "unimplemented", "message": "Connect unary calls are HTTP POST"},
                status=405, headers={"Allow": "POST"})
        ctype = request.content_type
        if ctype not in ("application/json", "application/proto"):
            return web.json_response(
                {"code": "unimplemented", "message": f"unsupported Content-Type {ctype!r}"},
                status=415, headers={"Accept-Post": "application/json, application/proto"})
        self.by_method[method] = self.by_method.get(method, 0) + 1
        proto = ctype == "application/proto"
        try:
            body = await request.read()
            msg = self._decode(method, body, proto)
            timeout = self.ack_timeout
            header = request.headers.get("Connect-Timeout-Ms", "")
            if header.isdigit():
                timeout = min(timeout, max(0.05, int(header) / 1000 - 0.05))
            handler = getattr(self, f"_rpc_{method}")
            async with asyncio.timeout(timeout):
                success, message = await handler(msg)
        except ConnectError as exc:
            self.stats["rejected" if exc.code == "invalid_argument" else "errors"] += 1
            if exc.code != "invalid_argument":
                log.warning("vm-ingest %s: %s", method, exc.message)
            return exc.response()
        except TimeoutError:
            self.stats["errors"] += 1
            self.stats["timeouts"] += 1
            log.warning("vm-ingest %s: Kafka did not acknowledge within %.1fs", method, timeout)
            return ConnectError(
                "unavailable",
                f"Kafka did not acknowledge within {timeout:g}s: nothing is confirmed; retry "
                "(event ids are deterministic, a retry never double-bills)").response()
        except web.HTTPException:
            raise
        except Exception as exc:
            self.stats["errors"] += 1
            log.exception("vm-ingest %s failed", method)
            return ConnectError("internal", f"{type(exc).__name__}: {exc}").response()
        payload: dict[str, Any] = {"success": success}
        if method == "SendMetricsBatch":
            payload["message"] = message
        if proto:
            return web.Response(body=_response_proto(success, payload.get("message")),
                                content_type="application/proto")
        return web.json_response(payload)

    def _decode(self, method: str, body: bytes, proto: bool) -> dict[str, Any]:
        errors: list[tuple[str, str]] = []
        schema = _SCHEMAS[method]
        if proto:
            msg = _from_proto(body, schema, "", errors)
        else:
            try:
                obj = json.loads(body) if body.strip() else {}
            except (ValueError, UnicodeDecodeError) as exc:
                raise _invalid([("body", f"not valid JSON: {exc}")]) from exc
            msg = _from_json(obj, schema, "", errors)
        if errors and errors[0][0] == "body":
            raise _invalid(errors[:1])  # nothing else in it can be judged
        now = self._clock_ns()
        for f in schema:
            if f.kind == "string" and not f.repeated:
                _require(msg, f.name, errors)
        if method == "SendMetricsBatch":
            msg["points"] = _points(msg, now, errors) if not any(
                e[0] == "metrics" for e in errors) else []
        elif method == "SendHeartbeat":
            for i, vm in enumerate(msg["active_vms"]):
                if vm == "":
                    errors.append((f"active_vms[{i}]", "must be a non-empty VM id"))
        else:
            for name in ("start_time", "stop_time", "last_sent", "resume_time"):
                if name not in msg:
                    continue
                if msg[name] in (None, 0):
                    if msg[name] == 0:
                        errors.append((name, "required (an int64 Unix time, nanoseconds)"))
                    continue
                msg[name] = _unix_ns(msg[name])
                _check_time(msg[name], name, now, errors)
            if method == "NotifyPossibleGap" and isinstance(msg.get("last_sent"), int) and isinstance(
                    msg.get("resume_time"), int) and msg["last_sent"] and msg["resume_time"] \
                    and msg["resume_time"] < msg["last_sent"]:
                errors.append(("resume_time", "is before last_sent"))
        if errors:
            raise _invalid(errors)
        return msg

    # ---- publishing ---------------------------------------------------------------------------

    async def _publish(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Produce ``records`` and wait until Kafka acknowledged every envelope (or raise)."""
        if not records:
            return
        acks = _Acks(asyncio.get_running_loop())
        try:
            envelopes = self._pub.send_tracked(records, acks.on_delivery, block=False)
        except PublishError as exc:
            raise ConnectError("unavailable", f"cannot queue records for Kafka: {exc}") from exc
        acks.expect(len(envelopes))
        errors = await asyncio.shield(acks.future)
        if errors:
            raise ConnectError("unavailable", f"Kafka rejected {len(errors)} envelope(s): {errors[0]}")
        self.stats["published"] += len(records)

    def _vm(self, vm_id: str) -> VmState:
        vm = self.vms.get(vm_id)
        if vm is None:
            vm = self.vms[vm_id] = VmState()
        return vm

    def _warn_once(self, vm_id: str, what: str) -> None:
        if vm_id not in self._warned and len(self._warned) < 100_000:
            self._warned.add(vm_id)
            log.warning("vm-ingest: %s for VM %s whose customer is unknown (gateway restarted?); "
                        "not published", what, vm_id)

    # ---- procedures ---------------------------------------------------------------------------

    async def _rpc_SendMetricsBatch(self, msg: dict[str, Any]) -> tuple[bool, str]:
        vm_id, customer = msg["vm_id"], msg["customer_id"]
        points: list[Point] = msg["points"]
        self.stats["batches"] += 1
        self.stats["samples"] += len(msg["metrics"])
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.customer_id not in (None, customer):
                log.warning("vm-ingest: VM %s moved from customer %s to %s", vm_id, vm.customer_id, customer)
            d = vm_deltas(vm_id, customer, points, vm.last_ts_ns, vm.counters)
            parked = [{**g, "tenant_id": customer} for g in vm.parked_gaps]
            await self._publish(d.records + parked)
            # acknowledged: only now does the baseline move
            vm.customer_id, vm.last_ts_ns, vm.counters = customer, d.last_ts_ns, d.counters
            vm.parked_gaps.clear()
        self.stats["stale_samples"] += d.stale
        self.stats["counter_resets"] += d.resets
        self.stats["baselines"] += d.baselines
        self.stats["gaps"] += len(parked)
        new = len(points) - d.stale
        note = f"; {d.stale} already recorded" if d.stale else ""
        note += "; first sample set the baseline" if d.baselines else ""
        return True, f"processed {new} metrics{note}"

    async def _rpc_SendHeartbeat(self, msg: dict[str, Any]) -> tuple[bool, str]:
        now = self._clock_ns()
        instance = msg["instance_id"]
        records = []
        unknown = 0
        for vm_id in dict.fromkeys(msg["active_vms"]):
            vm = self.vms.get(vm_id)
            if vm is None or vm.customer_id is None:
                unknown += 1
                self._warn_once(vm_id, "heartbeat")
                continue
            records.append(_lifecycle(vm_id, vm.customer_id, VM_HEARTBEAT, now,
                                      metadata={"instance_id": instance},
                                      id_suffix=str(now // 1_000_000)))
        await self._publish(records)
        self.stats["heartbeats"] += 1
        self.stats["heartbeat_unknown_vms"] += unknown
        return True, ""

    async def _rpc_NotifyVmStarted(self, msg: dict[str, Any]) -> tuple[bool, str]:
        vm_id, customer, start = msg["vm_id"], msg["customer_id"], msg["start_time"]
        vm = self._vm(vm_id)
        async with vm.lock:
            records = [_lifecycle(vm_id, customer, VM_STARTED, start)]
            records += [{**g, "tenant_id": customer} for g in vm.parked_gaps]
            await self._publish(records)
            vm.customer_id = customer
            if vm.last_ts_ns is None or start > vm.last_ts_ns:
                # a (re)started VM's counters begin at zero
                vm.last_ts_ns, vm.counters = start, (0,) * len(COUNTER_METRICS)
            self.stats["gaps"] += len(vm.parked_gaps)
            vm.parked_gaps.clear()
        self.stats["lifecycle"] += 1
        return True, ""

    async def _rpc_NotifyVmStopped(self, msg: dict[str, Any]) -> tuple[bool, str]:
        vm_id, stop = msg["vm_id"], msg["stop_time"]
        vm = self.vms.get(vm_id)
        if vm is None or vm.customer_id is None:
            self.stats["unknown_vm_notices"] += 1
            self._warn_once(vm_id, "NotifyVmStopped")
            return True, ""
        async with vm.lock:
            await self._publish([_lifecycle(vm_id, vm.customer_id, VM_STOPPED, stop)])
            if self.vms.get(vm_id) is vm and (vm.last_ts_ns is None or stop >= vm.last_ts_ns):
                del self.vms[vm_id]  # its counters are gone with it
        self.stats["lifecycle"] += 1
        return True, ""

    async def _rpc_NotifyPossibleGap(self, msg: dict[str, Any]) -> tuple[bool, str]:
        vm_id, last, resume = msg["vm_id"], msg["last_sent"], msg["resume_time"]
        gap = usage_record(
            event_id=f"vm:{vm_id}:{VM_POSSIBLE_GAP}:{last}", tenant_id="", source="vm",
            resource_id=vm_id, metric=VM_POSSIBLE_GAP, value=Decimal(resume - last) / _NS,
            event_time_ms=last // 1_000_000, metadata={"resume_time_ms": str(resume // 1_000_000)})
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.customer_id is None:
                if all(g["event_id"] != gap["event_id"] for g in vm.parked_gaps):
                    vm.parked_gaps.append(gap)
                    self.stats["parked_gaps"] += 1
                self._warn_once(vm_id, "NotifyPossibleGap (held until the VM's next batch)")
                return False, ""
            await self._publish([{**gap, "tenant_id": vm.customer_id}])
        self.stats["gaps"] += 1
        return True, ""

    # ---- health and stats ---------------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        base = {"service": "metering-vm-ingest", "version": _version(),
                "uptime_seconds": round(time.monotonic() - self._started_at, 3), "topic": self.topic}
        loop = asyncio.get_running_loop()
        try:
            partitions = await loop.run_in_executor(None, self._pub.check_reachable, 2.0)
        except PublishError as exc:
            return web.json_response({"status": "unavailable", **base, "error": str(exc)}, status=503)
        return web.json_response({"status": "ok", **base, "partitions": partitions})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """Counters and state, as ``GET /stats`` shows them."""
        return {
            **self.stats,
            "by_method": dict(self.by_method),
            "active_vms": sum(1 for v in self.vms.values() if v.customer_id is not None),
            "tracked_vms": len(self.vms),
            "in_flight_envelopes": self._pub.in_flight(),
            "ack_timeout_seconds": self.ack_timeout,
            "topic": self.topic,
        }

    # ---- running ------------------------------------------------------------------------------

    async def _start_site(self) -> None:
        if self._pub.closed:  # stopped before: its producer was released, start afresh
            self._pub = self._new_publisher()
        self._pub.start_polling()
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for addr in self._runner.addresses:
            if isinstance(addr, tuple):
                self.port = int(addr[1])
                break

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pub.stop_polling, 5.0)
        # what Kafka did not take within the flush is given up (its requests were answered
        # 503, or were cut off by the stop: the clients retry with the same event ids); left
        # queued, librdkafka would go on retrying it for up to message.timeout.ms (5 min)
        # after the gateway is gone
        given_up = await loop.run_in_executor(None, self._pub.abandon)
        if given_up:
            log.warning("vm-ingest: stopped with %d envelopes unacknowledged by Kafka; given up "
                        "(their requests were not answered 200)", given_up)
        # release librdkafka's threads and connections now: kept until the gateway object is
        # collected, they go on reconnecting (and logging each failure) to a broker maybe gone
        await loop.run_in_executor(None, self._pub.close)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or SIGINT/SIGTERM when it is None)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self._start_site()
        log.info("vm-ingest listening on %s, publishing to %s", self.url, self.topic)
        try:
            await stop.wait()
        finally:
            await self._cleanup()

    def _serve_in_thread(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._start_site())
        except BaseException as exc:  # surfaced by start()
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()

    def start(self) -> VmGateway:
        """Listen in a background thread (tests, demos); returns once ``port`` is known."""
        if self._thread is not None:
            raise RuntimeError("gateway already started")
        self._thread = threading.Thread(target=self._serve_in_thread, name="vm-gateway", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._start_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"vm gateway cannot listen on {self.host}:{self.port}") from self._start_error
        return self

    def stop(self) -> None:
        """Stop a gateway started with :meth:`start`."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> VmGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kafka-usage-metering")
    except Exception:
        return "dev"


# ---- command line ---------------------------------------------------------------------------------


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has it (``serve`` shares --host/--port)."""
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def build_parser_args(parser: argparse.ArgumentParser) -> None:
    """Add the gateway's options to ``parser`` (``metering serve vm-ingest``)."""
    _add(parser, "--host", default="127.0.0.1", help="address to listen on")
    _add(parser, "--port", type=int, default=8081, help="port (billaged's default is 8081)")
    _add(parser, "--ack-timeout", type=float, default=10.0,
         help="seconds to wait for Kafka's acknowledgement before answering 503")
    _add(parser, "--max-body-mb", type=float, default=8.0, help="largest request body accepted")


def run_from_args(settings: Settings, args: argparse.Namespace) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM."""
    from metering.errors import ConfigError
    from metering.topics import ensure_topics

    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: the VM gateway publishes to Kafka")
    ensure_topics(settings, bootstrap)
    gateway = VmGateway(
        bootstrap, settings.topic(VM_TOPIC), host=getattr(args, "host", "127.0.0.1"),
        port=int(getattr(args, "port", 8081)), ack_timeout=float(getattr(args, "ack_timeout", 10.0)),
        max_body_bytes=int(float(getattr(args, "max_body_mb", 8.0)) * 2**20))
    print(f"vm-ingest: publishing to {gateway.topic} on {bootstrap}", flush=True)
    asyncio.run(gateway.serve())

