"""Unit tests of streams/dedup.py."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedup import EventIdFilter, digest, digests, saved_arrays, saved_entries

H = 3_600_000


def test_duplicate_within_horizon_is_rejected() -> None:
    f = EventIdFilter(horizon_ms=24 * H)
    assert f.check_and_add("a", 0)
    assert not f.check_and_add("a", 5 * H)
    assert f.check_and_add("b", 5 * H)


def test_buckets_older_than_horizon_are_forgotten() -> None:
    f = EventIdFilter(horizon_ms=2 * H)
    f.check_and_add("old", 0)
    f.check_and_add("new", 5 * H)
    assert f.expire() == [0]
    assert f.check_and_add("old", 5 * H)  # beyond the horizon: treated as new
    assert not f.check_and_add("new", 5 * H)


def test_drained_ids_restore_a_new_filter() -> None:
    f = EventIdFilter(horizon_ms=24 * H)
    for i in range(25):
        f.check_and_add(f"e{i}", i * 1000)
    table = {}
    for n, (bucket, value) in enumerate(f.drain(chunk=10)):
        table[f"p3:{bucket}:{n}"] = value
    table["p4:0:0"] = {"bucket": 0, "ids": [format(digest("other"), "016x")]}
    g = EventIdFilter(horizon_ms=24 * H)
    for _key, bucket, ids, offsets in saved_entries(table, "p3:"):
        g.load(bucket, ids, offsets)
    assert len(g) == 25
    assert not g.check_and_add("e7", 0)
    assert g.check_and_add("other", 0)  # another partition's ids are not ours


def test_replayed_offset_is_not_its_own_duplicate() -> None:
    f = EventIdFilter(horizon_ms=24 * H)
    assert f.check_and_add("a", 0, offset=5)
    assert f.check_and_add("a", 0, offset=5)  # the same input message, replayed
    assert f.check_and_add("a", 0, offset=3)  # replay from before it
    assert not f.check_and_add("a", 0, offset=9)  # a re-published copy
    saved = {f"w0:0:{n}": v for n, (_, v) in enumerate(f.drain())}
    g = EventIdFilter(horizon_ms=24 * H)
    g.restore((bucket, ds, offs) for _k, bucket, ds, offs in saved_arrays(saved, "w0:"))
    assert g.check_and_add("a", 0, offset=5)
    assert not g.check_and_add("a", 0, offset=6)


class _Model:
    """The filter's meaning, longhand: id -> (bucket, first offset)."""

    def __init__(self, horizon_ms: int, bucket_ms: int) -> None:
        self.horizon_ms, self.bucket_ms = horizon_ms, bucket_ms
        self.ids: dict[str, tuple[int, int]] = {}

    def check(self, event_ids: list[str], times: list[int], offset: int) -> list[bool]:
        flags, here = [], set()
        for e, t in zip(event_ids, times, strict=True):
            if e in here:
                flags.append(False)
            elif e in self.ids:
                flags.append(offset >= 0 and self.ids[e][1] >= offset)
            else:
                self.ids[e] = (t - t % self.bucket_ms, offset)
                flags.append(True)
            here.add(e)
        return flags

    def expire(self) -> None:
        if self.ids:
            newest = max(b for b, _ in self.ids.values())
            self.ids = {e: v for e, v in self.ids.items()
                        if v[0] + self.bucket_ms > newest - self.horizon_ms}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.sampled_from([f"e{i}" for i in range(30)]), max_size=12),
    st.integers(0, 6 * H), st.integers(0, 20 * 60_000), st.integers(-1, 8), st.booleans(),
    st.sampled_from(["none", "expire", "reload", "compact"]), st.booleans(),
), max_size=25), st.sampled_from([None, 0, 3]))
def test_fresh_matches_checking_each_id_in_order(ops: list[Any], compact_at: int | None) -> None:
    # compact_at 0 moves every bucket but the newest to the compact store at each expire and
    # load, 3 once a few ids are there, None never: the filter must mean the same either way
    f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=compact_at)
    model = _Model(2 * H, H)
    saved: dict[str, Any] = {}
    for n, (ids, at, spread, offset, per_id_times, then, hashed) in enumerate(ops):
        times = [at + i * spread for i in range(len(ids))] if per_id_times else [at] * len(ids)
        # digests handed in (as the window stage gets them from the normalizer) or not
        flags = f.fresh(ids, times if per_id_times else at, offset,
                        ids_digests=digests(ids) if hashed else None)
        expected = model.check(ids, times, offset)
        assert (flags if flags is not None else [True] * len(ids)) == expected
        for k, (_, value) in enumerate(f.drain(chunk=5)):
            saved[f"p0:{n}:{k}"] = value
        if then == "expire":
            forget(f.expire(), saved)
            model.expire()
            assert len(f) == len(model.ids)
        elif then == "compact":
            f.compact()
            assert len(f) == len(model.ids)
        elif then == "reload":  # a restart: a new filter from what was saved
            f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=compact_at)
            f.restore((bucket, ds, offs) for _key, bucket, ds, offs in saved_arrays(saved, "p0:"))
            assert len(f) == len(model.ids)


def forget(buckets: list[int], saved: dict[str, Any]) -> None:
    """Delete expired buckets' table entries, as TableBackedFilters.save does."""
    for key in [k for k, v in saved.items() if v["bucket"] in buckets]:
        del saved[key]


def test_compacted_ids_are_still_known_and_expire_with_their_bucket() -> None:
    f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=5)
    for i in range(10):
        assert f.check_and_add(f"old{i}", 0)
    assert f.check_and_add("new", 2 * H)
    assert f.expire() == []  # nothing beyond the horizon yet, but bucket 0 is compacted
    assert f.compacted == 10 and len(f) == 11
    assert not f.check_and_add("old3", 2 * H)
    assert f.fresh(["x", "old7", "y"], 2 * H) == [True, False, True]
    assert f.check_and_add("later", 4 * H)
    assert f.expire() == [0]
    # bucket 0 is gone from the compact store; bucket 2 * H ("new", "x", "y") stays in the
    # set: fewer than compact_at ids
    assert f.compacted == 0 and len(f) == 4
    assert f.check_and_add("old3", 4 * H)  # beyond the horizon: new again


def test_load_moves_a_compacted_id_to_the_newer_bucket() -> None:
    f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=0)
    f.load(0, digests(["a", "b"]))
    f.load(H, digests(["c"]))  # compacts bucket 0
    assert f.compacted == 2
    f.load(2 * H, digests(["a"]))  # saved again later: kept for the later bucket's horizon
    f.load(3 * H, [])
    f.check_and_add("z", 3 * H)
    assert 0 in f.expire()
    assert not f.check_and_add("a", 3 * H)
    assert f.check_and_add("b", 3 * H)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=3000),
       st.lists(st.integers(0, 2**64 - 1), max_size=50), st.integers(0, 2**20))
def test_compact_store_finds_exactly_its_ids(held: list[int], others: list[int], seed: int) -> None:
    import random

    import numpy as np

    from streams.dedup import _ColdIds

    cold = _ColdIds()
    rng = random.Random(seed)
    rng.shuffle(held)
    half = len(held) // 2
    for part in (held[:half], held[half:]):  # added in two goes, as buckets are
        cold.add(np.asarray(part, dtype=np.uint64), np.zeros(len(part), dtype=np.int64))
    queries = held[: 3 * len(others) + 1] + others + [0, 2**64 - 1]
    at = cold.positions(queries)
    members = set(held)
    assert [p >= 0 for p in at.tolist()] == [q in members for q in queries]
    assert all(int(cold.ids[p]) == q for p, q in zip(at.tolist(), queries, strict=True) if p >= 0)


def test_table_entries_of_a_compacted_bucket_are_deleted_when_it_expires() -> None:
    from streams.dedup import TableBackedFilters

    data: dict[str, Any] = {}
    sent: list[tuple[int, str, Any]] = []
    filters = TableBackedFilters(data, lambda p, k, v: sent.append((p, k, v)), "p",
                                 horizon_ms=2 * H, bucket_ms=H, compact_at=0)
    f = filters.get(0)
    f.fresh(["a", "b"], 0)
    filters.save(0, 10)
    f.fresh(["c"], H)
    filters.save(0, 11)  # bucket 0 is compacted now
    assert f.compacted == 2
    restored = TableBackedFilters(dict(data), lambda p, k, v: None, "p", 2 * H, H, compact_at=0).get(0)
    assert len(restored) == 3 and restored.fresh(["a", "z"], H) == [False, True]
    f.fresh(["d"], 4 * H)
    filters.save(0, 12)  # bucket 0 expires out of the compact store: its entries go
    assert not [k for k in data if k.startswith("p0:0:")]
    assert ("p0:0:10:0" in {k for _, k, v in sent if v is None})
    assert f.fresh(["a"], 4 * H) is None  # new again


def test_compacting_keeps_each_ids_first_offset_as_the_runs_gave_it() -> None:
    # ids saved twice (in two buckets, with different offsets): the later record of an id
    # wins, and an id that stays in the newest bucket keeps the offset an older bucket's
    # record gave it. Compaction moves offsets out of those records: nothing may change
    def build() -> EventIdFilter:
        f = EventIdFilter(horizon_ms=4 * H, bucket_ms=H, compact_at=None)
        f.load(H, digests(["a"]), [7])
        f.load(2 * H, digests(["c"]), [9])
        f.load(0, digests(["a", "b", "c"]), [3, 4, 2])  # a and c stay in their newer buckets
        return f

    plain, compacted = build(), build()
    assert compacted.compact() == 2  # a (bucket H) and b (bucket 0)
    assert compacted.compacted == 2 and len(compacted) == len(plain) == 3
    for e in ("a", "b", "c"):
        for offset in range(-1, 11):
            assert compacted.fresh([e], 2 * H, offset) == plain.fresh([e], 2 * H, offset), (e, offset)
    assert plain.fresh(["a"], 2 * H, 3) == [True] and plain.fresh(["a"], 2 * H, 4) == [False]
    assert plain.fresh(["c"], 2 * H, 2) == [True] and plain.fresh(["c"], 2 * H, 3) == [False]


def test_compact_store_index_built_in_chunks_equals_the_whole_array_one() -> None:
    # the prefix bitmap is built a chunk at a time (memory); chunk boundaries that split a
    # byte's prefixes must give the bitmap a bool per prefix over all ids gives
    import random

    import numpy as np

    import streams.dedup as dedup

    rng = random.Random(7)
    held = sorted({rng.getrandbits(64) for _ in range(5000)})
    # neighbours sharing prefixes, across chunk boundaries too
    held = sorted(set(held) | {h + 1 for h in held[:50]} | {h ^ 1 for h in held[100:140]})
    others = [rng.getrandbits(64) for _ in range(500)]
    saved = dedup.REINDEX_CHUNK
    try:
        for chunk in (1, 7, 64, 10**6):
            dedup.REINDEX_CHUNK = chunk
            cold = dedup._ColdIds()
            cold.add(np.asarray(held, dtype=np.uint64), np.zeros(len(held), dtype=np.int64))
            marked = np.zeros(8 * len(cold._marks), dtype=bool)
            marked[cold.ids >> cold._mark_shift] = True
            assert np.array_equal(cold._marks, np.packbits(marked, bitorder="little")), chunk
            at = cold.positions(held + others)
            assert set(others).isdisjoint(held)
            assert bool((at[: len(held)] >= 0).all()) and bool((at[len(held):] < 0).all())
    finally:
        dedup.REINDEX_CHUNK = saved


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=12), st.integers(0, 2**20))
def test_compact_store_index_brought_up_to_date_equals_a_rebuild(sizes: list[int], seed: int) -> None:
    # each add brings the index up to date from the ids added alone while its shape holds;
    # it must be the index a rebuild from every id gives, and find exactly the ids held
    import random

    import numpy as np

    from streams.dedup import _ColdIds

    rng = random.Random(seed)
    cold = _ColdIds()
    held: list[int] = []
    for size in sizes:
        part = [rng.getrandbits(64) for _ in range(size)]
        if held and rng.random() < 0.5:  # a neighbour of an id held: the same prefixes
            part[0] = (held[0] + 1) % 2**64
        part = sorted(set(part) - set(held))
        cold.add(np.asarray(part, dtype=np.uint64), np.full(len(part), rng.randrange(10), dtype=np.int64))
        held += part
        rebuilt = _ColdIds()
        rebuilt.ids, rebuilt.buckets = cold.ids.copy(), cold.buckets.copy()
        rebuilt._reindex()
        assert np.array_equal(cold._fence, rebuilt._fence) and cold._fence.dtype == rebuilt._fence.dtype
        assert np.array_equal(cold._marks, rebuilt._marks)
        assert (cold._bits, cold._mark_bits, cold._steps, cold.oldest) == (
            rebuilt._bits, rebuilt._mark_bits, rebuilt._steps, rebuilt.oldest)
        others = [rng.getrandbits(64) for _ in range(50)]
        at = cold.positions(held + others)
        assert bool((at[: len(held)] >= 0).all())
        assert [p >= 0 for p in at[len(held):].tolist()] == [o in set(held) for o in others]


def _entries(history: list[tuple[int, list[int], list[int] | None]]) -> list[Any]:
    import numpy as np

    return [(bucket * H, np.asarray(ids, dtype=np.uint64),
             None if offs is None else np.asarray(offs, dtype=np.int64)) for bucket, ids, offs in history]


@st.composite
def _history(draw: Any) -> list[tuple[int, list[int], list[int] | None]]:
    """Saved table entries as a worker's saves leave them: ids from a small pool (so they
    overlap across entries and buckets), with offsets (sometimes fewer than ids, sometimes
    disagreeing between entries) or without."""
    out = []
    for _ in range(draw(st.integers(0, 10))):
        bucket = draw(st.integers(0, 4))
        ids = draw(st.lists(st.integers(1, 40), max_size=10))
        offs = None
        if draw(st.booleans()):
            offs = draw(st.lists(st.integers(-1, 12), min_size=max(0, len(ids) - 2), max_size=len(ids) + 1))
        out.append((bucket, ids, offs))
    return out


@settings(max_examples=400, deadline=None)
@given(_history(), st.sampled_from([None, 0, 3, 1000]), st.lists(st.integers(1, 45), max_size=8))
def test_restore_equals_loading_each_entry_in_turn(
    history: list[tuple[int, list[int], list[int] | None]], compact_at: int | None, later: list[int],
) -> None:
    # the worker restores in bulk (restore); load, an entry at a time, is the reference: the
    # same ids, each kept for its newest bucket's horizon, each replayed offset judged alike
    bulk = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=compact_at)
    bulk.restore(_entries(history))
    ref = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=compact_at)
    for bucket, ids, offs in _entries(history):
        ref.load(bucket, ids.tolist(), [] if offs is None else offs.tolist())
    assert len(bulk) == len(ref)
    assert not list(bulk.drain())  # restored ids are not saved again
    newest = max((b for b, _, _ in history), default=0) * H
    for d in range(1, 46):
        for offset in range(-1, 14):
            assert bulk.fresh(None, newest, offset, ids_digests=[d]) == \
                ref.fresh(None, newest, offset, ids_digests=[d]), (d, offset)
    # as buckets expire, load forgets an id's offset with the bucket of the entry that
    # recorded it, even while the id lives on in a newer bucket; restore keeps it with the id.
    # They differ only for an id with an offset saved in two buckets, which no worker saves:
    # the window stage buckets an id by its event time (always the same bucket) and the
    # normalizer records no offsets. Beyond that, the filters stay alike as buckets expire
    buckets_of: dict[int, set[int]] = {}
    with_offset: set[int] = set()
    for bucket, ids, offs in history:
        for d in ids:
            buckets_of.setdefault(d, set()).add(bucket)
        with_offset.update(d for d, o in zip(ids, offs or [], strict=False) if o >= 0)
    if any(len(buckets_of[d]) > 1 for d in with_offset):
        return
    for step in range(1, 4):
        at = newest + step * H
        assert bulk.fresh(None, at, 20 + step, ids_digests=later) == \
            ref.fresh(None, at, 20 + step, ids_digests=later)
        bulk.expire()
        ref.expire()
        assert len(bulk) == len(ref)
        for d in range(1, 46):
            for offset in (-1, 0, 5, 12, 30):
                assert bulk.fresh(None, at, offset, ids_digests=[d]) == \
                    ref.fresh(None, at, offset, ids_digests=[d]), (step, d, offset)


def test_restore_of_a_table_in_bulk_keeps_every_saved_id() -> None:
    from streams.dedup import TableBackedFilters

    data: dict[str, Any] = {}
    filters = TableBackedFilters(data, lambda p, k, v: None, "w", horizon_ms=3 * H, bucket_ms=H, compact_at=5)
    f = filters.get(1)
    for hour in range(3):
        for m in range(4):
            f.fresh([f"h{hour}m{m}i{i}" for i in range(3)], hour * H, offset=10 * hour + m)
            filters.save(1, 10 * hour + m)
    assert f.compacted > 0
    restored = TableBackedFilters(dict(data), lambda p, k, v: None, "w", 3 * H, H, compact_at=5).get(1)
    assert len(restored) == len(f) == 36
    assert restored.compacted == f.compacted  # the older buckets, compacted as they were
    for hour in range(3):
        for m in range(4):
            ids = [f"h{hour}m{m}i{i}" for i in range(3)]
            assert restored.fresh(ids, 2 * H, 10 * hour + m) == [True] * 3  # its own offset: replayed
            assert restored.fresh(ids, 2 * H, 10 * hour + m + 1) == [False] * 3  # a later copy
    assert not list(restored.drain())


def test_a_partition_filter_is_used_only_once_restored_whole() -> None:
    from streams.dedup import TableBackedFilters

    data: dict[str, Any] = {}
    writer = TableBackedFilters(data, lambda p, k, v: None, "p", horizon_ms=2 * H, bucket_ms=H)
    writer.get(0).fresh([f"e{i}" for i in range(20)], 0)
    writer.save(0, 1)
    data["p0:0:2:0"] = {"bucket": 0, "ids": "AAAA"}  # 3 bytes: not whole digests
    filters = TableBackedFilters(data, lambda p, k, v: None, "p", horizon_ms=2 * H, bucket_ms=H)
    with pytest.raises(ValueError):
        filters.get(0)
    with pytest.raises(ValueError):  # again: not a filter missing what the bad entry held
        filters.get(0)
    del data["p0:0:2:0"]
    restored = filters.get(0)
    assert len(restored) == 20 and restored.fresh(["e3", "new"], 0) == [False, True]


def test_a_bucket_whose_ids_were_all_saved_again_later_still_expires_from_the_table() -> None:
    from streams.dedup import TableBackedFilters

    data: dict[str, Any] = {
        "p0:0:1:0": {"bucket": 0, "ids": _pack_digests(["a"])},
        "p0:3600000:2:0": {"bucket": H, "ids": _pack_digests(["a", "b"])},
    }
    sent: list[tuple[str, Any]] = []
    filters = TableBackedFilters(data, lambda p, k, v: sent.append((k, v)), "p", horizon_ms=2 * H,
                                 bucket_ms=H, compact_at=0)
    f = filters.get(0)  # restored in bulk and compacted: "a" lives on in bucket H
    f.fresh(["c"], 2 * H)
    f.compact()
    f.fresh(["d"], 4 * H)
    filters.save(0, 3)
    assert "p0:0:1:0" not in data and ("p0:0:1:0", None) in sent  # deleted with its bucket


def test_compacting_keeps_an_empty_bucket_until_it_expires() -> None:
    f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H, compact_at=None)
    f.load(0, digests(["a"]))
    f.load(H, digests(["a", "b"]))  # bucket 0 is left empty
    f.load(2 * H, digests(["c"]))
    assert f.compact() == 2 and f.compacted == 2
    f.fresh(["d"], 4 * H)
    assert 0 in f.expire()


def _pack_digests(event_ids: list[str]) -> str:
    import base64
    from array import array

    return base64.b64encode(array("Q", digests(event_ids)).tobytes()).decode()
