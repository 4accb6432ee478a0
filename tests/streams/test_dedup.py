"""Unit tests of streams/dedup.py."""

from streams.dedup import EventIdFilter, digest, saved_entries

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
