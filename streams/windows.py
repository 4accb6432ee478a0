"""Event-time tumbling windows with our own watermark, one instance per input partition.

Faust's windowed tables close windows by wall clock and lose late, replayed and restored
data (DESIGN rule 2), so windows are kept here in plain dicts and closed explicitly.

* The watermark of a partition is the highest event time seen minus the allowed lateness,
  raised further by producers' promises and, for an idle partition, by the wall clock.
* ``closed_wm`` is the watermark at the last close: window [s, s+size) is closed, and was
  emitted exactly once, iff s + size <= closed_wm. Results are deterministic: the same
  samples give the same result whatever their order; duplicates (same event_id) inside a
  window count once.
* A sample whose window is already closed is late: it is returned to the caller (which sends
  it to ``usage.late``) and counted on the carrier window (the tenant's first open window of
  that size), never silently dropped.

Windows close after each input message (never in the middle of one), so whether a sample
is late depends only on the order of messages in the partition — not on how they were
batched — and a backlog after a restart decides exactly as the live run did.

Exactly once across crashes. The caller holds each input message unacked until every window
it touched (or carries a late count for) has closed and the close was durably logged (see
:meth:`PartitionWindows.snapshot`), so the committed offset never passes an open window's
first contributor. After a restart the saved snapshot says, per input offset, what
``closed_wm`` was; replaying from the committed offset then makes the original decisions:
windows already emitted are not emitted again (they could be partial), windows still open
at the crash are rebuilt from all their contributors, and late decisions are unchanged.
"""

from __future__ import annotations

import bisect
import decimal
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import reduce
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import Any

from schemas import DECIMAL_QUANTUM
from streams.aggregations import (
    AGGREGATION_CONTEXT,
    DEFAULT_METRIC_AGGREGATIONS,
    MetricState,
    new_state,
)
from streams.columns import Columns
from streams.dedup import EventIdFilter, digests
from streams.lifecycle import VM_RUNNING_AGGREGATION, VM_RUNNING_METRIC, vm_running_seconds
from streams.scoring import score

__all__ = ["FoldedMessage", "MessageOutcome", "PartitionWindows", "WindowConfig", "fold_message", "window_id"]

_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
_CTX_ADD = AGGREGATION_CONTEXT.add
_ZERO = Decimal(0)


@dataclass(frozen=True)
class WindowConfig:
    """How windows are cut and aggregated."""

    sizes_ms: tuple[int, ...]
    lateness_ms: int
    weights: Mapping[str, Decimal]
    aggregations: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_METRIC_AGGREGATIONS)
    )
    default_aggregation: str = "sum"
    #: a VM of a tenant that sends heartbeats, silent for longer than this inside a window,
    #: marks the window as having a gap; 0 disables
    heartbeat_timeout_ms: int = 0

    def aggregation(self, metric: str) -> str:
        """The aggregation declared for a metric (``sum`` when none is)."""
        return self.aggregations.get(metric, self.default_aggregation)

    @property
    def grain_ms(self) -> int:
        """The sizes' gcd: every window boundary is a multiple of it, so the samples of one
        tenant in one grain fall into the same windows."""
        return math.gcd(*self.sizes_ms)


def window_id(tenant_id: str, start_ms: int, size_ms: int) -> str:
    """The deterministic identity of a tenant's window."""
    return f"{tenant_id}|{start_ms}|{size_ms}"


@dataclass(slots=True)
class _Window:
    metrics: dict[str, MetricState] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    samples: int = 0
    late: int = 0
    resources: set[str] = field(default_factory=set)  # VMs with usage in the window
    alive: dict[str, list[int]] = field(default_factory=dict)  # VM -> heartbeat/start times
    starts: dict[str, list[int]] = field(default_factory=dict)  # VM -> start times
    stops: dict[str, list[int]] = field(default_factory=dict)  # VM -> stop times

    def merge(self, folded: FoldedMessage) -> None:
        """Count a folded message's samples in this window."""
        metrics = self.metrics
        for metric, part in folded.metrics.items():
            state = metrics.get(metric)
            if state is None:
                state = metrics[metric] = new_state(part.kind)
            state.merge(part)
        self.samples += len(folded.times)
        self.resources |= folded.vms

    def vm_running(self, start: int, end: int) -> dict[str, Any] | None:
        """The ``vm_running_seconds`` total of this window [start, end) (see
        streams/lifecycle.py), or None when no VM has a lifecycle record in it."""
        running = vm_running_seconds(start, end, self.alive.keys() | self.stops.keys(),
                                     self.starts, self.stops)
        if running is None:
            return None
        seconds, vms = running
        return {"metric": VM_RUNNING_METRIC, "aggregation": VM_RUNNING_AGGREGATION,
                "value": seconds.quantize(DECIMAL_QUANTUM, context=_CTX), "samples": vms}


@dataclass(slots=True)
class _Slot:
    """The windows one message's samples of one tenant and grain go to (see ``_slot``)."""

    windows: list[_Window] = field(default_factory=list)
    carriers: list[_Window] = field(default_factory=list)
    late: bool = False
    release_at: int = 0
    states: dict[str, list[MetricState]] = field(default_factory=dict)  # metric -> one per window


#: lifecycle records published by the VM gateway (producers/vm_gateway.py)
HEARTBEAT, STARTED, STOPPED, POSSIBLE_GAP = "vm_heartbeat", "vm_started", "vm_stopped", "vm_possible_gap"
_LIFECYCLE = frozenset({HEARTBEAT, STARTED, STOPPED, POSSIBLE_GAP})
_VM_SOURCES = frozenset({None, "vm"})  # the samples whose resource is a VM (for the gap check)
# field readers run over a whole message at C speed
_TIME, _EVENT_ID = itemgetter("event_time_ms"), itemgetter("event_id")
_SOURCE = methodcaller("get", "source")


@dataclass(slots=True)
class FoldedMessage:
    """One message's samples folded ahead of the window stage (:func:`fold_message`): all of
    one tenant and one grain, so they count in the same windows. What the window stage needs
    of the message besides its records, which it then needs only when some are duplicates
    or late."""

    tenant: str
    times: list[int]  # each record's event time, in order (the id filter buckets by them)
    lo: int
    hi: int
    metrics: dict[str, MetricState]  # each metric's samples, aggregated
    vms: set[str]  # the VMs with usage (for the gap check)


def fold_message(
    config: WindowConfig, records: list[Mapping[str, Any]], columns: Columns | None = None,
) -> FoldedMessage | None:
    """The message's samples aggregated once, to be merged into each of their windows; None
    when they do not all fall into one slot (one tenant, one grain) or include lifecycle
    records: :meth:`PartitionWindows.add` then folds them sample by sample.

    A usage.records envelope has one tenant (the normalizer splits by tenant) and a
    producer's batch covers seconds, so this is the common case. Aggregations are exact and
    order-independent (sums are decimal(38, 9) values added in an 80-digit context), so
    merging the folded states equals adding the samples one by one; a property test checks
    it. The normalizer folds a message right after decoding it, and hands the window stage
    this instead of the records: hundreds of decoded records held until the window stage
    takes them made every later decode write to cold memory (see docs/ARCHITECTURE.md).
    ``columns``: the records' :class:`~streams.columns.Columns`, when the caller has them.
    """
    if not records:
        return None
    cols = columns if columns is not None else Columns.of(records)
    times = cols.times
    lo, hi = min(times), max(times)
    grain = config.grain_ms
    if lo - lo % grain != hi - hi % grain:
        return None
    tenants = set(cols.tenants)
    if len(tenants) != 1:
        return None
    metrics = cols.metrics
    kinds = set(metrics)
    if not kinds.isdisjoint(_LIFECYCLE):
        return None
    values, resources = cols.values, cols.resources
    states: dict[str, MetricState] = {}
    for metric, rows in _rows_by_metric(metrics, len(kinds)).items():
        state = states[metric] = new_state(config.aggregation(metric))
        if state.kind == "sum":  # the common aggregation, at C speed
            picked = _pick(values, rows)
            state.samples = len(picked)
            state.total = reduce(_CTX_ADD, picked, _ZERO)
            continue
        if state.kind == "resource_mean":
            owners = _pick(resources, rows)
            if len(set(owners)) == len(owners):  # one sample per resource (a gauge per tick)
                state.samples = len(owners)
                state.per_resource = dict(zip(owners, map(list, zip(_pick(values, rows), repeat(1))),
                                              strict=True))
                continue
        for i in (range(len(metrics))[rows] if isinstance(rows, slice) else rows):
            state.add(values[i], times[i], cols.event_ids[i], resources[i])
    sources = set(map(_SOURCE, records))
    if sources <= _VM_SOURCES:
        vms = set(resources)
    else:
        vms = {r["resource_id"] for r in records if r.get("source") in _VM_SOURCES}
    (tenant,) = tenants
    return FoldedMessage(tenant, times, lo, hi, states, vms)


def _rows_by_metric(metrics: list[str], kinds: int) -> dict[str, slice] | dict[str, list[int]]:
    """Which rows hold each metric: a slice when the records repeat one metric order (a
    producer writes each resource's metrics in a fixed order), found at C speed; else
    lists of row numbers."""
    n = len(metrics)
    if kinds == 1:
        return {metrics[0]: slice(None)}
    if n % kinds == 0 and all(metrics[i::kinds].count(metrics[i]) == n // kinds for i in range(kinds)):
        return {metrics[i]: slice(i, None, kinds) for i in range(kinds)}
    groups: dict[str, list[int]] = {}
    for i, metric in enumerate(metrics):
        groups.setdefault(metric, []).append(i)
    return groups


def _pick(column: list[Any], rows: slice | list[int]) -> list[Any]:
    """The items of ``column`` in ``rows`` (see ``_rows_by_metric``), at C speed."""
    return column[rows] if isinstance(rows, slice) else list(map(column.__getitem__, rows))


def _states(wins: list[_Window], metric: str, kind: str) -> list[MetricState]:
    """The state of ``metric`` in each of ``wins``, created (as ``kind``) where missing."""
    return [w.metrics.get(metric) or w.metrics.setdefault(metric, new_state(kind)) for w in wins]


@dataclass(slots=True)
class MessageOutcome:
    """What one input message did: its late records, and when it may be released."""

    late: list[Mapping[str, Any]]
    release_at: int  # the message may be acked once closed_wm >= release_at
    duplicates: int = 0
    replayed: bool = False
    late_counted: int = 0  # late samples counted on a carrier (in a replay too)
    decided_with: int | None = None  # the closed_wm the lateness was judged against


class PartitionWindows:
    """Open windows of one input partition, its watermark, and the closed-window results."""

    def __init__(
        self,
        config: WindowConfig,
        saved: Mapping[str, Any] | None = None,
        ids: EventIdFilter | None = None,
    ) -> None:
        self.config = config
        self._grain = config.grain_ms
        self.ids = ids  # drops copies of records already counted, across windows and restarts
        self.open: dict[tuple[int, str, int], _Window] = {}  # (size, tenant, start)
        self.max_event_ms: int | None = None
        self.promised_ms: int | None = None
        self.closed_wm: int | None = None
        self.last_offset = -1
        self.late_total = 0
        self.duplicate_total = 0
        # NotifyPossibleGap ranges per tenant, until every window they overlap has closed
        self.gaps: dict[str, list[tuple[int, int]]] = {}
        # the durable close log: closed_wm after processing each logged offset
        self._log_offsets: list[int] = []
        self._log_values: list[int | None] = []
        self._base_wm: int | None = None
        self._replay_until = -1
        self._exact_from = -1  # the saved log decides exactly for offsets from here on
        self._final_wm: int | None = None
        if saved:
            self._restore(saved)

    # ---- state that survives a crash --------------------------------------------------

    def _restore(self, saved: Mapping[str, Any]) -> None:
        self.max_event_ms = saved.get("max_event_ms")
        self.promised_ms = saved.get("promised_ms")
        self._base_wm = saved.get("base_wm")
        for off, wm in saved.get("log", []):
            self._log_offsets.append(off)
            self._log_values.append(wm)
        self._replay_until = saved.get("last_offset", -1)
        self._exact_from = saved.get("exact_from", -1)
        self._final_wm = saved.get("closed_wm")
        self.closed_wm = self._final_wm  # a window at or before it was emitted before the crash

    def snapshot(self, min_held_offset: int | None) -> dict[str, Any]:
        """The state to save durably after a batch; log entries below the oldest held message
        are folded into a baseline (every window those messages touched is closed).

        While a replay is still under way the restored decisions stand: ``closed_wm`` is the
        value reached at the *saved* last offset, so it is neither logged at the current
        (earlier) offset nor is the saved last offset lowered — either would make the next
        restart judge the replayed messages against a watermark they never saw.
        """
        replaying = self.replaying
        if not replaying:
            self._log(self.last_offset, self.closed_wm)
        last_offset = max(self.last_offset, self._replay_until) if replaying else self.last_offset
        exact_from = min_held_offset if min_held_offset is not None else self.last_offset + 1
        cut = bisect.bisect_left(self._log_offsets, exact_from)
        if cut:
            self._base_wm = self._log_values[cut - 1]
            del self._log_offsets[:cut], self._log_values[:cut]
        return {
            "last_offset": last_offset,
            "closed_wm": self.closed_wm,
            "max_event_ms": self.max_event_ms,
            "promised_ms": self.promised_ms,
            "base_wm": self._base_wm,
            # below this offset every message was released: all it touched is closed and
            # emitted, so a replay (the commit lags the releases) skips those messages whole
            "exact_from": exact_from,
            "log": [[o, v] for o, v in zip(self._log_offsets, self._log_values, strict=True)],
        }

    def _log(self, offset: int, wm: int | None) -> None:
        if offset < 0:
            return
        if self._log_offsets and self._log_offsets[-1] == offset:
            self._log_values[-1] = wm
        elif not self._log_values or self._log_values[-1] != wm:
            self._log_offsets.append(offset)
            self._log_values.append(wm)

    def _closed_wm_before(self, offset: int) -> int | None:
        i = bisect.bisect_left(self._log_offsets, offset)
        return self._log_values[i - 1] if i else self._base_wm

    # ---- processing -----------------------------------------------------------------

    @property
    def watermark_ms(self) -> int | None:
        """Event time below which no more samples are expected."""
        candidates = []
        if self.max_event_ms is not None:
            candidates.append(self.max_event_ms - self.config.lateness_ms)
        if self.promised_ms is not None:
            candidates.append(self.promised_ms)
        return max(candidates) if candidates else None

    @property
    def resume_from(self) -> int | None:
        """Restored and nothing processed yet: the first offset the restored state needs
        (input must start at or before it); None otherwise."""
        if self.last_offset < 0 and self._exact_from >= 0:
            return self._exact_from
        return None

    @property
    def replaying(self) -> bool:
        """True while re-reading input that was processed before a restart."""
        return self.last_offset < self._replay_until

    def add(
        self, offset: int, records: Iterable[Mapping[str, Any]], watermark_ms: int | None = None,
        *, ids_digests: list[int] | None = None,
    ) -> MessageOutcome:
        """Fold one input message's canonical records in (offsets must increase).

        ``ids_digests``: the records' event-id :func:`~streams.dedup.digests`, when the
        caller has them already (the normalizer computed them for this very message)."""
        records = records if isinstance(records, list) else list(records)
        return self._add(offset, None, records, None, watermark_ms, ids_digests)

    def add_folded(
        self, offset: int, folded: FoldedMessage, load: Callable[[], list[Mapping[str, Any]]],
        watermark_ms: int | None = None, *, ids_digests: list[int] | None = None,
    ) -> MessageOutcome:
        """:meth:`add` for a message already folded by :func:`fold_message` (with this
        window configuration) where it was decoded. ``load()`` gives the message's records;
        it is called only when they are needed: when some of them are duplicates, when they
        are late (to report them), or when no ``ids_digests`` are given."""
        return self._add(offset, folded, None, load, watermark_ms, ids_digests)

    def _add(
        self, offset: int, folded: FoldedMessage | None, records: list[Mapping[str, Any]] | None,
        load: Callable[[], list[Mapping[str, Any]]] | None, watermark_ms: int | None,
        ids_digests: list[int] | None,
    ) -> MessageOutcome:
        def records_() -> list[Mapping[str, Any]]:
            nonlocal records
            if records is None:
                assert load is not None
                records = load()
            return records

        replay = offset <= self._replay_until
        ids = self.ids
        if ids is None and folded is not None:
            folded = None  # without an id filter, each window drops the ids it has seen
        if ids is not None and ids_digests is None:
            ids_digests = digests(map(_EVENT_ID, records_()))
        if replay and offset < self._exact_from:
            # counted before the crash: only teach the id filter again (its last save may
            # not have reached the broker), so re-published copies stay duplicates
            if ids is not None:
                times = folded.times if folded is not None else list(map(_TIME, records_()))
                ids.fresh(None, times, offset, ids_digests=ids_digests)
            self.last_offset = max(self.last_offset, offset)
            return MessageOutcome(late=[], release_at=0, replayed=True)
        closed = self._closed_wm_before(offset) if replay else self.closed_wm
        final = self._final_wm if replay else None
        out = MessageOutcome(late=[], release_at=0, replayed=replay, decided_with=closed)
        if ids is not None and (folded is not None or records_()):
            # one message's ids at once; the filter also drops an id repeated inside the
            # message, so no per-window set of ids is needed
            times = folded.times if folded is not None else list(map(_TIME, records_()))
            flags = ids.fresh(None, times, offset, ids_digests=ids_digests)
            if flags is not None:
                out.duplicates += flags.count(False)
                records = [r for r, new in zip(records_(), flags, strict=True) if new]
                folded = None
            if folded is None:
                folded = fold_message(self.config, records_())
        if folded is not None:
            self._merge(folded, closed, final, out, records_)
            self._finish(offset, watermark_ms, out)
            return out
        records = records_()
        aggregation = self.config.aggregation
        check_seen = ids is None
        release_at = 0
        max_event = self.max_event_ms
        grain = self._grain
        # every sample of one tenant in one grain (the sizes' gcd) falls into the same windows
        # and is late for the same sizes, so that is decided once per slot and message, not
        # once per sample and size (this loop runs for every sample)
        slots: dict[tuple[str, int], _Slot] = {}
        for r in records:
            ts = r["event_time_ms"]
            tenant = r["tenant_id"]
            metric = r["metric"]
            key = (tenant, ts - ts % grain)
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = self._slot(tenant, ts, closed, final)
                if slot.release_at > release_at:
                    release_at = slot.release_at
            if slot.late:
                for carrier in slot.carriers:
                    carrier.late += 1
                out.late_counted += len(slot.carriers)
                if not replay:
                    out.late.append(r)
            wins = slot.windows
            if wins:
                states = slot.states.get(metric)
                if states is None:
                    states = slot.states[metric] = _states(wins, metric, aggregation(metric))
                if check_seen:
                    # no id filter: each window drops an id it has seen already
                    event_id = r["event_id"]
                    keep = [i for i, w in enumerate(wins) if event_id not in w.seen]
                    out.duplicates += len(wins) - len(keep)
                    if len(keep) < len(wins):
                        wins, states = [wins[i] for i in keep], [states[i] for i in keep]
                    for w in wins:
                        w.seen.add(event_id)
                value = r["value"]
                if states and states[0].kind == "sum":  # the common aggregation, inline
                    for state in states:
                        state.samples += 1
                        state.total = _CTX_ADD(state.total, value)
                else:
                    for state in states:
                        state.add(value, ts, r["event_id"], r["resource_id"])
                for w in wins:
                    w.samples += 1
                if metric in _LIFECYCLE:
                    if metric == HEARTBEAT or metric == STARTED:
                        for w in wins:
                            w.alive.setdefault(r["resource_id"], []).append(ts)
                            if metric == STARTED:
                                w.starts.setdefault(r["resource_id"], []).append(ts)
                    elif metric == STOPPED:
                        for w in wins:
                            w.stops.setdefault(r["resource_id"], []).append(ts)
                elif r.get("source") in _VM_SOURCES:
                    for w in wins:
                        w.resources.add(r["resource_id"])
            if metric == POSSIBLE_GAP:
                resume = int((r.get("metadata") or {}).get("resume_time_ms", ts))
                self.gaps.setdefault(tenant, []).append((ts, max(ts, resume)))
                top = max(self.config.sizes_ms)
                release_at = max(release_at, resume - resume % top + top)
            if max_event is None or ts > max_event:
                max_event = ts
        self.max_event_ms = max_event
        out.release_at = release_at
        self._finish(offset, watermark_ms, out)
        return out

    def _finish(self, offset: int, watermark_ms: int | None, out: MessageOutcome) -> None:
        self.late_total += len(out.late)
        self.duplicate_total += out.duplicates
        if watermark_ms is not None and (self.promised_ms is None or watermark_ms > self.promised_ms):
            self.promised_ms = watermark_ms
        self.last_offset = max(self.last_offset, offset)

    def _merge(
        self, folded: FoldedMessage, closed: int | None, final: int | None, out: MessageOutcome,
        records: Callable[[], list[Mapping[str, Any]]],
    ) -> None:
        """Count a folded message in its windows, as the per-sample loop of :meth:`_add`
        would count its samples: once per message, not once per sample."""
        slot = self._slot(folded.tenant, folded.lo, closed, final)
        n = len(folded.times)
        if slot.late:
            for carrier in slot.carriers:
                carrier.late += n
            out.late_counted += len(slot.carriers) * n
            if not out.replayed:
                out.late.extend(records())
        for w in slot.windows:
            w.merge(folded)
        out.release_at = slot.release_at
        if self.max_event_ms is None or folded.hi > self.max_event_ms:
            self.max_event_ms = folded.hi

    def _slot(self, tenant: str, ts: int, closed: int | None, final: int | None) -> _Slot:
        """Where the samples of ``tenant`` at ``ts`` (and in its grain) go, per window size:
        the open window they count in, or, when that size's window is closed already, the
        carrier window their late count rides on (the tenant's first open window of that
        size; none when that one, too, was emitted before a crash)."""
        slot = _Slot()
        for size in self.config.sizes_ms:
            start = ts - ts % size
            end = start + size
            if closed is not None and end <= closed:
                slot.late = True
                carrier = closed - closed % size
                if final is not None and carrier + size <= final:
                    continue  # counted in a window emitted before the crash
                slot.carriers.append(self._window(size, tenant, carrier))
                slot.release_at = max(slot.release_at, carrier + size)
                continue
            if final is not None and end <= final:
                continue  # already in a window emitted before the crash
            slot.windows.append(self._window(size, tenant, start))
            slot.release_at = max(slot.release_at, end)
        return slot

    def promise(self, watermark_ms: int | None) -> None:
        """Record a promise (a producer's, or the idle clock's) that earlier event times are done."""
        if watermark_ms is not None and (self.promised_ms is None or watermark_ms > self.promised_ms):
            self.promised_ms = watermark_ms

    def _window(self, size: int, tenant: str, start: int) -> _Window:
        key = (size, tenant, start)
        win = self.open.get(key)
        if win is None:
            win = self.open[key] = _Window()
        return win

    def close_due(self) -> list[dict[str, Any]]:
        """Close every window whose end is at or before the watermark; WindowResult dicts.

        While replaying input processed before a restart nothing closes: every window still
        open then has an end after the saved ``closed_wm``, and those at or before it were
        emitted already (the replay skips their samples).
        """
        if self._replay_until >= 0:
            if self.last_offset < self._replay_until:
                return []
            self._replay_until = -1  # replay done: from here on, decide as a live run would
            self._final_wm = None
        wm = self.watermark_ms
        if wm is None:
            return []
        # every window end is a multiple of the sizes' gcd: closing up to the last such
        # boundary changes closed_wm only when a window really closes, which keeps the close
        # log to one entry per smallest window
        target = wm - wm % self._grain
        if self.closed_wm is not None and target <= self.closed_wm:
            return []
        due = sorted(
            (k for k in self.open if k[2] + k[0] <= target), key=lambda k: (k[2] + k[0], k[0], k[1])
        )
        results = [self._result(*key, self.open.pop(key)) for key in due]
        self.closed_wm = target
        self._log(self.last_offset, target)
        for tenant in list(self.gaps):
            # a gap range is kept while some window it overlaps may still be open
            left = [g for g in self.gaps[tenant] if g[1] >= target - max(self.config.sizes_ms)]
            if left:
                self.gaps[tenant] = left
            else:
                del self.gaps[tenant]
        return results

    def _has_gap(self, tenant: str, start: int, end: int, win: _Window) -> bool:
        if any(lo < end and hi >= start for lo, hi in self.gaps.get(tenant, ())):
            return True
        timeout = self.config.heartbeat_timeout_ms
        if not timeout or not win.alive:
            return False  # this tenant's VMs send no heartbeats: nothing to judge by
        for vm in win.resources | set(win.alive):
            beats = sorted(win.alive.get(vm, ()))
            # a stopped VM owes no heartbeats after its (last) stop
            hi = min(end, max(win.stops.get(vm, (end,))))
            points = [start, *beats, hi] if not beats or beats[0] > start else [*beats, hi]
            if any(b - a > timeout for a, b in zip(points, points[1:], strict=False)):
                return True
        return False

    def _result(self, size: int, tenant: str, start: int, win: _Window) -> dict[str, Any]:
        raw_totals = {m: st.result(start + size) for m, st in win.metrics.items()}
        totals = [
            {
                "metric": m,
                "aggregation": win.metrics[m].kind,
                "value": raw_totals[m].quantize(DECIMAL_QUANTUM, context=_CTX),
                "samples": win.metrics[m].samples,
            }
            for m in sorted(win.metrics)
        ]
        running = win.vm_running(start, start + size)
        if running is not None:  # derived from lifecycle records: it replaces an input metric
            totals = [t for t in totals if t["metric"] != VM_RUNNING_METRIC]  # of that name
            totals = sorted([*totals, running], key=lambda t: str(t["metric"]))
        return {
            "window_id": window_id(tenant, start, size),
            "tenant_id": tenant,
            "window_start_ms": start,
            "window_end_ms": start + size,
            "totals": totals,
            "sample_count": win.samples,
            "score": score(raw_totals, self.config.weights),
            "late_samples": win.late,
            "has_gap": self._has_gap(tenant, start, start + size, win),
        }
