"""Quotas: per tenant, metric and UTC calendar period, with alerts at usage thresholds.

Pure logic, no Faust (the agent is :mod:`streams.quota_agent`).

What is counted
    Usage comes from closed windows (``WindowResult``) of the *smallest* window size only, so
    an hour is never counted twice through its minute and hour windows. A window belongs to
    the period that contains its start (windows tile the UTC day when the size divides a day,
    which 60 s, 300 s, 3600 s ... do).

    Only additive aggregations add up across windows exactly: a metric aggregated with
    ``sum``, ``count`` or ``time_weighted`` (value x seconds) is quotable, and so is the
    pseudo-metric ``score`` (the window's billing score; billing sums scores). ``max``,
    ``latest``, ``unique_count`` and ``resource_mean`` are not (the monthly "sum" of hourly
    maxima or means means nothing), so a limit on such a metric never fires; the quota view
    lists them as not quotable.
    A real metric named ``score`` is shadowed by the pseudo-metric.

Exactly once
    A tenant's :class:`TenantQuota` keeps the usage of the current period of each (metric,
    period), the thresholds already fired there, and a high-water mark of ``window_end_ms``
    per window size. Windows of one tenant and size close in increasing order, so a window
    ending at or before the mark was counted already (a re-emitted window after a crash, a
    replay) and is skipped. Usage and mark live in the same value, written together, so a
    lost write and the re-processing it causes stay consistent.

Thresholds
    Threshold ``t`` of a limit fires when ``used * 100 >= limit * t`` (and ``used > 0``), at
    most once per tenant, metric, period (and period start) and threshold, whatever the
    limit does afterwards: raising a limit above the usage does not re-arm a fired threshold,
    lowering it fires what the usage now crosses, when the tenant's next window is applied.
    Limits are the ones in force when the window is processed (processing time).

Limits
    From the quota file (TOML) and the compacted topic ``quota.limits`` (key
    ``tenant|metric|period``, value a ``QuotaLimit``). A run-time record overrides the file
    for its key; a record with a null limit removes the limit (the file's too); a tombstone
    forgets the run-time record, so the file's limit applies again. Tenant ``*`` is the
    default for every tenant without a limit of its own for that metric and period.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro

from metering import topics as _topic_names
from metering.errors import MeteringError
from schemas import DECIMAL_QUANTUM, AvroCodec, CodecError
from schemas import codec as _codec_module

__all__ = [
    "ADDITIVE_AGGREGATIONS",
    "ANY_TENANT",
    "DEFAULT_THRESHOLDS",
    "LIMITS_TOPIC",
    "PERIODS",
    "SCORE_METRIC",
    "LimitBook",
    "PeriodUsage",
    "QuotaError",
    "QuotaFile",
    "QuotaLimit",
    "TenantQuota",
    "WindowOutcome",
    "alert_codec",
    "alert_id",
    "limit_codec",
    "limit_from_record",
    "limit_key",
    "limit_to_record",
    "load_quota_file",
    "make_limit",
    "parse_limit_key",
    "parse_thresholds",
    "period_end",
    "period_start",
]

#: the compacted topic of run-time limits (``metering.topics.LIMITS`` once it is declared there)
LIMITS_TOPIC: str = _topic_names.LIMITS
PERIODS: tuple[str, ...] = ("day", "month")
SCORE_METRIC = "score"
ADDITIVE_AGGREGATIONS = frozenset({"sum", "count", "time_weighted"})  # value x seconds adds up too
DEFAULT_THRESHOLDS: tuple[int, ...] = (80, 100)
ANY_TENANT = "*"

_DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)
_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
_MAX_VALUE = Decimal(10) ** 29  # decimal(38, 9) holds 29 integer digits
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)

#: a fired threshold: (metric, period, period_start_ms, threshold_percent)
Fired = tuple[str, str, int, int]


class QuotaError(MeteringError, ValueError):
    """An invalid quota limit, key or quota file; the message says what and where."""


# ---- periods -------------------------------------------------------------------------


def period_start(period: str, ts_ms: int) -> int:
    """Start (epoch ms) of the UTC calendar ``day`` or ``month`` containing ``ts_ms``."""
    day = ts_ms // _DAY_MS
    if period == "day":
        return day * _DAY_MS
    if period == "month":
        date = _EPOCH + dt.timedelta(days=day)
        return (date.replace(day=1) - _EPOCH).days * _DAY_MS
    raise QuotaError(f"unknown period {period!r}; known: {', '.join(PERIODS)}")


def period_end(period: str, start_ms: int) -> int:
    """End (exclusive, epoch ms) of the period starting at ``start_ms``."""
    if period == "day":
        return start_ms + _DAY_MS
    if period == "month":
        date = _EPOCH + dt.timedelta(days=start_ms // _DAY_MS)
        nxt = dt.date(date.year + date.month // 12, date.month % 12 + 1, 1)
        return (nxt - _EPOCH).days * _DAY_MS
    raise QuotaError(f"unknown period {period!r}; known: {', '.join(PERIODS)}")


# ---- limits --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaLimit:
    """One limit. ``limit`` None is a removal; ``thresholds`` None means the defaults."""

    tenant: str
    metric: str
    period: str
    limit: Decimal | None
    thresholds: tuple[int, ...] | None = None
    source: str = "topic"  # "file" | "topic"
    set_at_ms: int = 0

    @property
    def key(self) -> str:
        """The ``quota.limits`` key of this limit."""
        return limit_key(self.tenant, self.metric, self.period)


def limit_key(tenant: str, metric: str, period: str) -> str:
    """``tenant|metric|period``: the key of a limit on ``quota.limits``."""
    return f"{tenant}|{metric}|{period}"


def parse_limit_key(key: str) -> tuple[str, str, str]:
    """(tenant, metric, period) of a ``quota.limits`` key (the tenant may contain ``|``)."""
    parts = key.rsplit("|", 2)
    if len(parts) != 3 or not all(parts):
        raise QuotaError(f"quota key {key!r} is not tenant|metric|period")
    tenant, metric, period = parts
    if period not in PERIODS:
        raise QuotaError(f"quota key {key!r}: unknown period {period!r}; known: {', '.join(PERIODS)}")
    return tenant, metric, period


def parse_thresholds(values: Iterable[Any]) -> tuple[int, ...]:
    """Sorted distinct threshold percentages, each a whole number from 1 to 1000."""
    out: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise QuotaError(f"threshold {v!r} is not a whole percentage")
        try:
            n = int(v)
        except ValueError as exc:
            raise QuotaError(f"threshold {v!r} is not a whole percentage") from exc
        if not 1 <= n <= 1000:
            raise QuotaError(f"threshold {n} is outside 1..1000 percent")
        out.add(n)
    if not out:
        raise QuotaError("a threshold list must not be empty")
    return tuple(sorted(out))


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool):
        raise QuotaError(f"{what} {value!r} is not a number")
    if isinstance(value, float):
        value = repr(value)  # the shortest text that reads back as this float: what was typed
    try:
        d = Decimal(value) if not isinstance(value, Decimal) else value
    except (decimal.InvalidOperation, TypeError, ValueError) as exc:
        raise QuotaError(f"{what} {value!r} is not a decimal number") from exc
    if not d.is_finite() or d < 0:
        raise QuotaError(f"{what} {value!r} must be a finite number >= 0")
    if d >= _MAX_VALUE:
        raise QuotaError(f"{what} {value!r} exceeds decimal(38, 9)")
    q = d.quantize(DECIMAL_QUANTUM, context=_CTX)
    if q != d:
        raise QuotaError(f"{what} {value!r} has more than 9 decimal places")
    return q


def make_limit(
    tenant: str,
    metric: str,
    period: str,
    limit: Any,
    thresholds: Iterable[Any] | None = None,
    *,
    source: str = "topic",
    set_at_ms: int = 0,
) -> QuotaLimit:
    """A validated limit; ``limit`` None is a removal. Raises QuotaError naming the problem."""
    if not isinstance(tenant, str) or not tenant:
        raise QuotaError("tenant must be a non-empty string (or * for every tenant)")
    if not isinstance(metric, str) or not metric:
        raise QuotaError("metric must be a non-empty string")
    if period not in PERIODS:
        raise QuotaError(f"unknown period {period!r}; known: {', '.join(PERIODS)}")
    value = None if limit is None else _decimal(limit, "limit")
    th = None if thresholds is None else parse_thresholds(thresholds)
    return QuotaLimit(tenant, metric, period, value, th, source, int(set_at_ms))


def limit_to_record(limit: QuotaLimit) -> dict[str, Any]:
    """The ``QuotaLimit`` Avro record of a limit."""
    return {
        "tenant_id": limit.tenant,
        "metric": limit.metric,
        "period": limit.period,
        "limit": limit.limit,
        "thresholds_percent": list(limit.thresholds) if limit.thresholds is not None else None,
        "set_at_ms": limit.set_at_ms,
    }


def limit_from_record(record: Mapping[str, Any], key: str | None = None) -> QuotaLimit:
    """A validated limit from a decoded ``QuotaLimit`` record; the key, when given, must agree."""
    limit = make_limit(
        record["tenant_id"], record["metric"], record["period"], record.get("limit"),
        record.get("thresholds_percent"), source="topic", set_at_ms=record.get("set_at_ms") or 0,
    )
    if key is not None and key != limit.key:
        raise QuotaError(f"quota.limits key {key!r} does not match its value ({limit.key!r})")
    return limit


@dataclass(frozen=True)
class QuotaFile:
    """What a quota file holds."""

    limits: tuple[QuotaLimit, ...]
    thresholds: tuple[int, ...] | None = None


def load_quota_file(path: str | Path) -> QuotaFile:
    """Read and validate a quota file (TOML)::

        thresholds_percent = [80, 100]       # optional: defaults for this file's limits

        [[limits]]
        tenant = "acme"                      # or "*" for every tenant without its own limit
        metric = "cpu_time_nanos"            # a sum/count metric, or "score"
        period = "month"                     # "day" or "month" (UTC calendar)
        limit = "3600000000000000"           # a string or an integer keeps it exact
        thresholds_percent = [50, 80, 100]   # optional

    Raises QuotaError naming the file and the entry.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise QuotaError(f"quota file {path}: cannot read: {exc}") from exc
    unknown = set(data) - {"limits", "thresholds_percent"}
    if unknown:
        raise QuotaError(
            f"quota file {path}: unknown keys {sorted(unknown)}; known: limits, thresholds_percent")
    try:
        file_th = parse_thresholds(data["thresholds_percent"]) if "thresholds_percent" in data else None
    except QuotaError as exc:
        raise QuotaError(f"quota file {path}: thresholds_percent: {exc}") from exc
    entries = data.get("limits", [])
    if not isinstance(entries, list):
        raise QuotaError(f"quota file {path}: 'limits' must be an array of tables ([[limits]])")
    out: dict[str, QuotaLimit] = {}
    for i, e in enumerate(entries):
        where = f"quota file {path}: limits[{i}]"
        if not isinstance(e, dict):
            raise QuotaError(f"{where}: not a table")
        bad = set(e) - {"tenant", "metric", "period", "limit", "thresholds_percent"}
        missing = {"tenant", "metric", "period", "limit"} - set(e)
        if bad or missing:
            raise QuotaError(f"{where}: unknown keys {sorted(bad)}, missing keys {sorted(missing)}")
        try:
            lim = make_limit(e["tenant"], e["metric"], e["period"], e["limit"],
                             e.get("thresholds_percent", file_th), source="file")
        except QuotaError as exc:
            raise QuotaError(f"{where}: {exc}") from exc
        if lim.key in out:
            raise QuotaError(f"{where}: a second limit for {lim.key}")
        out[lim.key] = lim
    return QuotaFile(tuple(out.values()), file_th)


class LimitBook:
    """The limits in force: the quota file overlaid by ``quota.limits``, indexed by tenant."""

    def __init__(self, file_limits: Iterable[QuotaLimit] = ()) -> None:
        self._file: dict[str, dict[tuple[str, str], QuotaLimit]] = {}
        self._topic: dict[str, dict[tuple[str, str], QuotaLimit]] = {}
        for lim in file_limits:
            self._file.setdefault(lim.tenant, {})[(lim.metric, lim.period)] = lim

    def apply(self, key: str, limit: QuotaLimit | None) -> None:
        """Apply one ``quota.limits`` message: a limit (a None ``limit`` removes), or a
        tombstone (``limit`` None here: forget the run-time setting of ``key``)."""
        tenant, metric, period = parse_limit_key(key)
        if limit is None:
            per = self._topic.get(tenant)
            if per is not None:
                per.pop((metric, period), None)
                if not per:
                    del self._topic[tenant]
        else:
            self._topic.setdefault(tenant, {})[(metric, period)] = limit

    def _entries(self, tenant: str) -> dict[tuple[str, str], QuotaLimit]:
        merged: dict[tuple[str, str], QuotaLimit] = {}
        # least specific first: default file, default topic, tenant file, tenant topic
        for src in (self._file.get(ANY_TENANT), self._topic.get(ANY_TENANT),
                    self._file.get(tenant), self._topic.get(tenant)):
            if src:
                merged.update(src)
        return merged

    def for_tenant(self, tenant: str) -> dict[tuple[str, str], QuotaLimit]:
        """The limits in force for ``tenant``, by (metric, period); removals left out."""
        return {k: v for k, v in self._entries(tenant).items() if v.limit is not None}

    def all_limits(self) -> list[QuotaLimit]:
        """Every stored limit and removal, file and run-time (for listing)."""
        out = [lim for per in self._file.values() for lim in per.values()]
        out += [lim for per in self._topic.values() for lim in per.values()]
        return sorted(out, key=lambda x: (x.tenant, x.metric, x.period, x.source))

    def effective(self) -> list[QuotaLimit]:
        """Every limit in force, per tenant named in a limit (``*`` included), sorted."""
        tenants = set(self._file) | set(self._topic)
        out = [lim for t in tenants for lim in self.for_tenant(t).values()
               if lim.tenant == t]  # a tenant's own limits; defaults are listed under *
        return sorted(out, key=lambda x: (x.tenant, x.metric, x.period))


# ---- usage and alerts ----------------------------------------------------------------


def alert_id(tenant: str, metric: str, period: str, period_start_ms: int, threshold: int) -> str:
    """Deterministic identity of an alert. The period is part of it: the first day of a
    month starts at the same instant as the month."""
    return f"{tenant}|{metric}|{period}|{period_start_ms}|{threshold}"


@dataclass
class PeriodUsage:
    """Usage of one metric in the current period of one kind."""

    start_ms: int
    used: Decimal = _ZERO


@dataclass
class WindowOutcome:
    """What applying one window did."""

    applied: bool
    reason: str = ""  # why it was skipped: "size" (not the smallest) or "duplicate"
    alerts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TenantQuota:
    """Quota state of one tenant: the table value of :mod:`streams.quota_agent`.

    ``fired`` holds (metric, period, period_start_ms, threshold) of every threshold fired in
    a current period, whether this state fired it or it was read back from ``quota.alerts``.
    """

    tenant: str
    high_water: dict[int, int] = field(default_factory=dict)  # window size ms -> max end applied
    usage: dict[tuple[str, str], PeriodUsage] = field(default_factory=dict)  # (metric, period)
    fired: set[Fired] = field(default_factory=set)
    not_quotable: dict[str, str] = field(default_factory=dict)  # metric -> its aggregation
    dirty: bool = False

    # -- persistence (JSON: Decimals as strings) --

    def to_json(self) -> dict[str, Any]:
        """The JSON-able form stored in the table."""
        return {
            "hw": {str(k): v for k, v in sorted(self.high_water.items())},
            "usage": {
                f"{m}|{p}": {"start": u.start_ms, "used": str(u.used)}
                for (m, p), u in sorted(self.usage.items())
            },
            "fired": [list(f) for f in sorted(self.fired)],
            "not_quotable": dict(sorted(self.not_quotable.items())),
        }

    @classmethod
    def from_json(cls, tenant: str, saved: Mapping[str, Any] | None) -> TenantQuota:
        """Rebuild from :meth:`to_json` output (None: a tenant never seen)."""
        tq = cls(tenant)
        if not saved:
            return tq
        tq.high_water = {int(k): int(v) for k, v in saved.get("hw", {}).items()}
        for key, u in saved.get("usage", {}).items():
            metric, period = key.rsplit("|", 1)
            tq.usage[(metric, period)] = PeriodUsage(int(u["start"]), Decimal(u["used"]))
        tq.fired = {(str(m), str(p), int(s), int(t)) for m, p, s, t in saved.get("fired", ())}
        tq.not_quotable = dict(saved.get("not_quotable", {}))
        return tq

    def record_fired(self, metric: str, period: str, period_start_ms: int, threshold: int) -> bool:
        """Note a threshold as fired (e.g. read back from ``quota.alerts``); True if new."""
        item = (metric, period, int(period_start_ms), int(threshold))
        if item in self.fired:
            return False
        self.fired.add(item)
        self.dirty = True
        return True

    def fired_in(self, metric: str, period: str) -> list[int]:
        """Thresholds fired in the current period of (metric, period)."""
        u = self.usage.get((metric, period))
        if u is None:
            return []
        return sorted(t for m, p, s, t in self.fired if m == metric and p == period and s == u.start_ms)

    # -- processing --

    def apply_window(
        self,
        window: Mapping[str, Any],
        limits: Mapping[tuple[str, str], QuotaLimit],
        size_ms: int,
        default_thresholds: Iterable[int] = DEFAULT_THRESHOLDS,
    ) -> WindowOutcome:
        """Count one closed window (a decoded WindowResult of this tenant) and return the
        alerts it fires, in (metric, period, threshold) order.

        Only windows of ``size_ms`` count; one ending at or before this size's high-water
        mark is a repeat and is skipped.
        """
        start, end = int(window["window_start_ms"]), int(window["window_end_ms"])
        if end - start != size_ms:
            return WindowOutcome(False, "size")
        mark = self.high_water.get(size_ms)
        if mark is not None and end <= mark:
            return WindowOutcome(False, "duplicate")
        # everything that can fail first; the state changes only after
        amounts: dict[str, Decimal] = {}
        skipped: dict[str, str] = {}
        for t in window["totals"]:
            metric, agg = t["metric"], t["aggregation"]
            if metric == SCORE_METRIC:
                continue
            if agg in ADDITIVE_AGGREGATIONS:
                amounts[metric] = _CTX.add(amounts.get(metric, _ZERO), Decimal(t["value"]))
            else:
                skipped[metric] = agg
        amounts[SCORE_METRIC] = Decimal(window["score"])
        starts = {p: period_start(p, start) for p in PERIODS}

        self.dirty = True
        self.high_water[size_ms] = end
        for metric, agg in skipped.items():
            self.not_quotable[metric] = agg
        for metric in amounts:
            self.not_quotable.pop(metric, None)
        # a new period starts from zero: drop what belongs to an earlier one
        for key in [k for k, u in self.usage.items() if u.start_ms < starts[k[1]]]:
            del self.usage[key]
        self.fired = {f for f in self.fired if f[2] >= starts[f[1]]}
        for metric, amount in amounts.items():
            for p in PERIODS:
                u = self.usage.get((metric, p))
                if u is None:
                    u = self.usage[(metric, p)] = PeriodUsage(starts[p])
                elif u.start_ms > starts[p]:
                    continue  # never count into a later period (cannot happen in order)
                u.used = _CTX.add(u.used, amount)
        return WindowOutcome(True, alerts=self.evaluate(limits, end, default_thresholds))

    def evaluate(
        self,
        limits: Mapping[tuple[str, str], QuotaLimit],
        window_end_ms: int,
        default_thresholds: Iterable[int] = DEFAULT_THRESHOLDS,
    ) -> list[dict[str, Any]]:
        """Fire every threshold the current usage crosses and that has not fired yet."""
        defaults = tuple(sorted(set(default_thresholds)))
        alerts = []
        for (metric, period), lim in sorted(limits.items()):
            u = self.usage.get((metric, period))
            if lim.limit is None or u is None or u.used <= 0:
                continue
            for t in lim.thresholds or defaults:
                if (metric, period, u.start_ms, t) in self.fired:
                    continue
                if _CTX.multiply(u.used, _HUNDRED) >= _CTX.multiply(lim.limit, Decimal(t)):
                    self.record_fired(metric, period, u.start_ms, t)
                    alerts.append({
                        "alert_id": alert_id(self.tenant, metric, period, u.start_ms, t),
                        "tenant_id": self.tenant,
                        "metric": metric,
                        "period": period,
                        "period_start_ms": u.start_ms,
                        "threshold_percent": t,
                        "limit": lim.limit,
                        "used": u.used.quantize(DECIMAL_QUANTUM, context=_CTX),
                        "crossed_at_window_end_ms": window_end_ms,
                    })
        return alerts


# ---- codecs --------------------------------------------------------------------------

_SCHEMA_FILES = {"metering.v1.QuotaAlert": "quota_alert.avsc",
                 "metering.v1.QuotaLimit": "quota_limit.avsc"}


def _codec(full_name: str) -> AvroCodec:
    try:
        return AvroCodec(full_name)
    except CodecError:
        # not (yet) registered in schemas/codec.py's _SCHEMA_FILES: both records are
        # self-contained, so parse the file here and add it to the codec module's cache
        raw = json.loads(resources.files("schemas").joinpath(_SCHEMA_FILES[full_name]).read_text())
        _codec_module._named()[full_name] = fastavro.parse_schema(raw, named_schemas={}, expand=True)
        return AvroCodec(full_name)


@cache
def alert_codec() -> AvroCodec:
    """The codec of ``metering.v1.QuotaAlert``."""
    return _codec("metering.v1.QuotaAlert")


@cache
def limit_codec() -> AvroCodec:
    """The codec of ``metering.v1.QuotaLimit``."""
    return _codec("metering.v1.QuotaLimit")
