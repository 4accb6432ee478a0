"""Property-based tests of streams/windows.py against a straightforward batch recomputation.

Random streams: several tenants, resources and metrics, out-of-order event times, duplicated
event ids, split into messages; optionally a crash at a random point, after which a fresh
engine restored from the last snapshot replays from the oldest held message.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from metering.config import DEFAULT_SCORE_WEIGHTS
from streams import windows
from streams.aggregations import new_state
from streams.columns import Columns
from streams.dedup import EventIdFilter, digests, saved_arrays
from streams.windows import PartitionWindows, WindowConfig

SIZES = (10_000, 30_000)
METRICS = ["cpu_time_nanos", "memory_usage_bytes", "disk_read_bytes", "network_rx_bytes"]
AGG = {"cpu_time_nanos": "sum", "memory_usage_bytes": "resource_mean",
       "disk_read_bytes": "max", "network_rx_bytes": "count"}


def config(lateness: int) -> WindowConfig:
    return WindowConfig(sizes_ms=SIZES, lateness_ms=lateness, weights=DEFAULT_SCORE_WEIGHTS,
                        aggregations=AGG)


@st.composite
def streams_(draw: Any, max_disorder: int) -> list[list[dict]]:
    n = draw(st.integers(1, 60))
    base = 1_000_000
    recs: list[dict] = []
    t = base
    for i in range(n):
        t += draw(st.integers(0, 4_000))
        ts = max(base, t - draw(st.integers(0, max_disorder)))
        tenant = draw(st.sampled_from(["a", "b", "c"]))
        metric = draw(st.sampled_from(METRICS))
        r = {"event_id": f"e{i}", "tenant_id": tenant, "resource_id": draw(st.sampled_from(["r1", "r2"])),
             "metric": metric, "value": Decimal(draw(st.integers(0, 10**12))) / 1000,
             "event_time_ms": ts}
        recs.append(r)
        if draw(st.booleans()) and draw(st.booleans()):
            recs.append(dict(r))  # an exact duplicate (a producer retry)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(recs) - 1)), max_size=15)))
    out, prev = [], 0
    for c in cuts + [len(recs)]:
        if c > prev:
            out.append(recs[prev:c])
            prev = c
    return out


def run(messages: list[list[dict]], lateness: int, crash_at: int | list[int] | None = None,
        republish: int = 0, commit_lag: int = 0, hashed: bool = False,
        folded: bool = False, loads: list[int] | None = None,
        compact_at: int | None = None) -> tuple[dict[str, dict], list[dict]]:
    """Feed messages, emitting windows. ``crash_at``: the processing steps (counting replayed
    messages too, so a crash can hit a replay) after which the worker dies and restarts from
    the last snapshot; the first crash also appends, like a restarted normalizer, copies of
    the last ``republish`` messages. ``hashed``: hand each message's id digests in, as the
    worker does for what its normalizer just published. ``folded`` (with ``hashed``): hand
    in each message folded beforehand, as the normalizer does, with its records only on
    request; the steps that requested them are appended to ``loads``. ``compact_at``: the
    restored id filters' threshold (0 moves every bucket but the newest, with the offsets
    that first passed its ids, to the compact store; None never), as the worker's does at a
    million ids."""
    crash_steps = sorted({crash_at} if isinstance(crash_at, int) else set(crash_at or ()))
    cfg = config(lateness)
    table: dict[str, dict] = {}

    def restored_ids() -> EventIdFilter:
        f = EventIdFilter(horizon_ms=10**9, bucket_ms=60_000, compact_at=compact_at)
        f.restore((bucket, ids, offs) for _k, bucket, ids, offs in saved_arrays(table, "w0:"))
        return f

    pw = PartitionWindows(cfg, ids=restored_ids())
    messages = list(messages)
    emitted: dict[str, dict] = {}
    late: list[dict] = []
    held: dict[int, int] = {}
    snap: dict | None = None
    off = 0
    committed = 0
    crashed = False
    step = -1
    while off < len(messages):
        step += 1
        msg = messages[off]
        ds = digests([r["event_id"] for r in msg]) if hashed else None
        pre = windows.fold_message(cfg, msg) if folded and hashed else None
        if pre is not None:
            def load(msg: list[dict] = msg, step: int = step) -> list[dict]:
                if loads is not None:
                    loads.append(step)
                return [dict(r) for r in msg]  # decoded again: equal records, not the same
            out = pw.add_folded(off, pre, load, ids_digests=ds)
        else:
            out = pw.add(off, msg, ids_digests=ds)
        late.extend(out.late)
        held[off] = out.release_at
        for w in pw.close_due():
            assert emitted.setdefault(w["window_id"], w) == w, "re-emitted differently"
        held = {o: r for o, r in held.items() if pw.closed_wm is None or r > pw.closed_wm}
        snap = pw.snapshot(min(held, default=None))
        if off % 3 == 0:  # a periodic commit; it never goes back
            committed = max(committed, min(held, default=off + 1))
        assert pw.ids is not None
        for n, (bucket, value) in enumerate(pw.ids.drain()):
            table[f"w0:{bucket}:{off}:{n}"] = value
        if crash_steps and step == crash_steps[0]:
            crash_steps.pop(0)
            if not crashed:
                copies = messages[max(0, off + 1 - republish): off + 1]
                messages[off + 1:off + 1] = [[dict(r) for r in m] for m in copies]
            crashed = True
            pw = PartitionWindows(cfg, saved=snap, ids=restored_ids())
            # the committed offset: at most the oldest held message, often behind it (commits
            # are periodic), never before what an earlier commit had reached
            off = max(committed, min(held, default=off + 1) - commit_lag)
            held = {}  # a new process holds nothing yet
            continue
        off += 1
    pw.promise(10**13)
    for w in pw.close_due():
        assert emitted.setdefault(w["window_id"], w) == w
    return emitted, late


def recompute(records: list[dict]) -> dict[str, tuple[int, dict[str, Decimal]]]:
    """Group-by of unique samples per (size, tenant, window), aggregated longhand."""
    groups: dict[tuple[int, str, int], dict[str, dict]] = defaultdict(dict)
    for r in records:
        for size in SIZES:
            start = r["event_time_ms"] // size * size
            groups[(size, r["tenant_id"], start)].setdefault(r["event_id"], r)
    out = {}
    for (size, tenant, start), by_id in groups.items():
        totals: dict[str, Decimal] = {}
        for m in {r["metric"] for r in by_id.values()}:
            vals = [r for r in by_id.values() if r["metric"] == m]
            if AGG[m] == "sum":
                totals[m] = sum((r["value"] for r in vals), Decimal(0))
            elif AGG[m] == "max":
                totals[m] = max(r["value"] for r in vals)
            elif AGG[m] == "count":
                totals[m] = Decimal(len(vals))
            else:
                per: dict[str, list[Decimal]] = defaultdict(list)
                for r in vals:
                    per[r["resource_id"]].append(r["value"])
                totals[m] = sum((sum(v) / len(v) for v in per.values()), Decimal(0))
        out[f"{tenant}|{start}|{size}"] = (len(by_id), totals)
    return out


def as_comparable(emitted: dict[str, dict]) -> dict[str, tuple[int, dict[str, Decimal]]]:
    return {wid: (w["sample_count"], {t["metric"]: t["value"] for t in w["totals"]})
            for wid, w in emitted.items() if w["sample_count"]}


def quantized(d: dict[str, tuple[int, dict[str, Decimal]]]) -> dict:
    return {k: (n, {m: v.quantize(Decimal("1e-9")) for m, v in t.items()}) for k, (n, t) in d.items()}


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=5_000))
def test_bounded_disorder_equals_batch_recomputation(messages: list[list[dict]]) -> None:
    """Disorder within the allowed lateness: every unique sample lands in its windows."""
    emitted, late = run(messages, lateness=5_000)
    assert late == []
    flat = [r for m in messages for r in m]
    assert quantized(as_comparable(emitted)) == quantized(recompute(flat))


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=40_000))
def test_unbounded_disorder_conserves_every_sample(messages: list[list[dict]]) -> None:
    """Late samples are reported, the rest are windowed exactly; none vanish."""
    emitted, late = run(messages, lateness=2_000)
    late_ids = {r["event_id"] for r in late}
    counted = sum(w["sample_count"] for w in emitted.values())
    late_counted = sum(w["late_samples"] for w in emitted.values())
    unique = {r["event_id"]: r for m in messages for r in m}
    # every (unique sample, size) is in a window or counted late on a carrier (a late
    # duplicate is counted late again, hence >=), and no window counts a sample twice
    assert counted + late_counted >= len(unique) * len(SIZES)
    assert counted <= len(unique) * len(SIZES)
    on_time = [r for r in unique.values() if r["event_id"] not in late_ids]
    expected = recompute(on_time)
    got = as_comparable(emitted)
    # windows of samples never late for any size agree exactly with the recomputation
    for wid, (n, totals) in got.items():
        if wid in expected and expected[wid][0] == n:
            assert quantized({wid: (n, totals)}) == quantized({wid: expected[wid]})


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=20_000), st.data())
def test_crash_and_replay_emit_what_an_uninterrupted_run_emits(
        messages: list[list[dict]], data: Any) -> None:
    crash_at = data.draw(st.integers(0, len(messages) - 1))
    republish = data.draw(st.integers(0, 3))
    lag = data.draw(st.integers(0, 10))
    clean, clean_late = run(messages, lateness=3_000)
    hashed = data.draw(st.booleans())
    crashed, _ = run(messages, lateness=3_000, crash_at=crash_at, republish=republish, commit_lag=lag,
                     hashed=hashed, folded=hashed and data.draw(st.booleans()),
                     compact_at=data.draw(st.sampled_from([None, 0])))
    assert crashed == clean


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=20_000), st.data())
def test_repeated_crashes_also_during_replay_emit_what_an_uninterrupted_run_emits(
        messages: list[list[dict]], data: Any) -> None:
    # a restarted worker can die again while it replays; its snapshots taken mid-replay must
    # keep the first run's decisions (a CI failure once came from exactly that)
    n = len(messages)
    crashes = data.draw(st.lists(st.integers(0, 3 * n), min_size=2, max_size=5))
    lag = data.draw(st.integers(0, 10))
    clean, _ = run(messages, lateness=3_000)
    crashed, _ = run(messages, lateness=3_000, crash_at=crashes, republish=data.draw(
        st.integers(0, 3)), commit_lag=lag, compact_at=data.draw(st.sampled_from([None, 0])))
    assert crashed == clean


def by_slot(messages: list[list[dict]]) -> list[list[dict]]:
    """Each message cut into runs of one tenant and one grain (the sizes' gcd), in order: the
    shape of a usage.records envelope, which PartitionWindows folds in as a whole."""
    out = []
    for msg in messages:
        run_: list[dict] = []
        for r in msg:
            if run_ and (r["tenant_id"], r["event_time_ms"] // 10_000) != (
                    run_[0]["tenant_id"], run_[0]["event_time_ms"] // 10_000):
                out.append(run_)
                run_ = []
            run_.append(r)
        if run_:
            out.append(run_)
    return out


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=20_000), st.data())
def test_folding_a_message_whole_equals_folding_it_sample_by_sample(
        messages: list[list[dict]], data: Any) -> None:
    messages = by_slot(messages)
    crash = data.draw(st.one_of(st.none(), st.integers(1, len(messages) + 2)))
    whole = run(messages, lateness=5_000, crash_at=crash, republish=1)
    original = windows.fold_message
    windows.fold_message = lambda *args: None  # type: ignore[assignment]  # every message sample by sample
    try:
        one_by_one = run(messages, lateness=5_000, crash_at=crash, republish=1)
    finally:
        windows.fold_message = original  # type: ignore[assignment]
    assert whole == one_by_one


@settings(max_examples=150, deadline=None)
@given(streams_(max_disorder=20_000), st.data())
def test_a_message_folded_where_it_was_decoded_counts_as_its_records_do(
        messages: list[list[dict]], data: Any) -> None:
    # the normalizer folds a message and hands the window stage that instead of its records:
    # the same windows and late samples, and the records are asked for only when some of
    # them are duplicates or late
    messages = by_slot(messages)
    lateness = data.draw(st.sampled_from([2_000, 5_000]))
    plain = run(messages, lateness=lateness, hashed=True)
    loads: list[int] = []
    folded = run(messages, lateness=lateness, hashed=True, folded=True, loads=loads)
    assert folded == plain
    late_ids = {r["event_id"] for r in plain[1]}
    seen: set[str] = set()
    for step, msg in enumerate(messages):
        ids = [r["event_id"] for r in msg]
        needed = len(set(ids)) < len(ids) or not seen.isdisjoint(ids) or not late_ids.isdisjoint(ids)
        seen.update(ids)
        assert (step in loads) == needed, (step, ids)


@st.composite
def producer_batches(draw: Any) -> list[dict]:
    """One tenant's records in one grain as a producer writes them: each resource's metrics
    in one fixed order (the fold's fast paths), sometimes with a resource repeated or the
    order broken by a stray record."""
    kinds = draw(st.permutations(METRICS))[: draw(st.integers(1, len(METRICS)))]
    resources = draw(st.lists(st.sampled_from(["r1", "r2", "r3", "r4"]), min_size=1, max_size=6))
    recs = [{"event_id": f"{i}-{j}", "tenant_id": "a", "resource_id": res, "metric": metric,
             "value": Decimal(draw(st.integers(0, 10**12))) / 1000,
             "event_time_ms": 1_000_000 + draw(st.integers(0, 9_999))}
            for i, res in enumerate(resources) for j, metric in enumerate(kinds)]
    if draw(st.booleans()):
        stray = dict(recs[draw(st.integers(0, len(recs) - 1))], event_id="stray")
        recs.insert(draw(st.integers(0, len(recs))), stray)
    return recs


@settings(max_examples=300, deadline=None)
@given(producer_batches())
def test_folding_a_producer_batch_equals_adding_its_samples_one_by_one(recs: list[dict]) -> None:
    cfg = config(5_000)
    expected: dict[str, Any] = {}
    for r in recs:
        state = expected.setdefault(r["metric"], new_state(cfg.aggregation(r["metric"])))
        state.add(r["value"], r["event_time_ms"], r["event_id"], r["resource_id"])
    folded = windows.fold_message(cfg, recs)
    assert folded is not None
    assert folded.metrics == expected
    assert folded.times == [r["event_time_ms"] for r in recs]
    assert folded.vms == {r["resource_id"] for r in recs}
    # the columns the normalizer read already give the same fold
    assert windows.fold_message(cfg, recs, Columns.of(recs)) == folded
