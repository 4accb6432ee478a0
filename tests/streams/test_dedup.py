"""Unit tests of streams/dedup.py."""

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedup import EventIdFilter, digest, digests, saved_entries

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
    for _k, bucket, ids, offsets in saved_entries(saved, "w0:"):
        g.load(bucket, ids, offsets)
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.sampled_from([f"e{i}" for i in range(30)]), max_size=12),
    st.integers(0, 6 * H), st.integers(0, 20 * 60_000), st.integers(-1, 8), st.booleans(),
    st.sampled_from(["none", "expire", "reload"]), st.booleans(),
), max_size=25))
def test_fresh_matches_checking_each_id_in_order(ops: list[Any]) -> None:
    f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H)
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
        elif then == "reload":  # a restart: a new filter from what was saved
            f = EventIdFilter(horizon_ms=2 * H, bucket_ms=H)
            for _key, bucket, saved_digests, offsets in saved_entries(saved, "p0:"):
                f.load(bucket, saved_digests, offsets)
            assert len(f) == len(model.ids)


def forget(buckets: list[int], saved: dict[str, Any]) -> None:
    """Delete expired buckets' table entries, as TableBackedFilters.save does."""
    for key in [k for k, v in saved.items() if v["bucket"] in buckets]:
        del saved[key]
