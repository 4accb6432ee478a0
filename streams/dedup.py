"""Deduplication of usage records by event_id over a horizon (default 24 h).

Producers retry with the same event_id (the client library's unique_key, the VM gateway's
batch identity), so the normalizer drops an event_id it has already passed on. Ids are kept
as 64-bit XXH3 digests in hourly buckets of the envelope's ``sent_at_ms`` (deterministic
on replay, unlike the wall clock); a bucket older than the horizon is forgotten whole.

Replays. A filter used on one ordered input (the window stage reads one partition of
``usage.records``) remembers the input offset that first passed each id; when the same
offset comes again after a restart, the id is "ours", not a duplicate, so the replay counts
exactly what the live run counted while a re-published copy (a later offset) is dropped.

Durability: after the batch's output is acknowledged, the ids it added are written to a
changelog-backed table (one entry per partition, bucket and batch, in chunks), so a restarted
worker forgets nothing it had passed on. A crash before that write re-publishes the batch:
a duplicate downstream, never a loss; the window stage also drops duplicates per window.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from itertools import chain, repeat
from typing import Any

import numpy as np
from xxhash import xxh3_64_intdigest

__all__ = [
    "COMPACT_AT", "EventIdFilter", "TableBackedFilters", "digest", "digests", "saved_arrays", "saved_entries",
]

_BUCKET_MS = 3_600_000
#: ids in a filter's older buckets beyond which they move to the compact store (about 70 MB of
#: Python objects); below it a filter keeps every id in one set, the fastest to check
COMPACT_AT = 1_000_000
#: ids at a time when the compact store rebuilds its bitmap of prefixes
REINDEX_CHUNK = 2_000_000


def digest(event_id: str) -> int:
    """A stable 64-bit digest of an event id (Python's own str hash is salted per process).

    XXH3: about ten times cheaper than an 8-byte BLAKE2b, which was a tenth of the stream
    stage's time; not cryptographic, which dedup does not need (ids come from our producers)."""
    return xxh3_64_intdigest(event_id.encode())


def digests(event_ids: Iterable[str]) -> list[int]:
    """:func:`digest` of each id, at C speed: a message's ids are hashed once, by the
    normalizer, and its digests handed on to the window stage with the decoded message."""
    return list(map(xxh3_64_intdigest, map(str.encode, event_ids)))


class _ColdIds:
    """The ids of sealed buckets: numpy arrays sorted by digest (digest, bucket, and for a
    filter on an ordered input the offset that first passed it), 16 or 24 bytes an id where a
    Python set, its bucket lists and the offset runs take about 70 to 100.

    Looked up one message at a time: digests are uniform hashes, so a fence on their top bits
    narrows each lookup to about 8 neighbours, then a binary search runs for all the
    message's ids at once; each id costs a few cache lines near its place, as in a set.
    """

    def __init__(self) -> None:
        self.ids = np.empty(0, dtype=np.uint64)
        self.buckets = np.empty(0, dtype=np.int64)
        # the input offset that first passed each id (-1: none recorded); None until an id
        # with an offset arrives, so a filter without offsets (the normalizer's) pays nothing
        self.offsets: np.ndarray | None = None
        self.oldest: int | None = None
        self._fence = np.zeros(2, dtype=np.int64)
        self._shift = np.uint64(0)
        self._bits = 0
        self._steps: list[int] = []  # the halving steps of a lookup, largest first
        self._marks = np.zeros(1, dtype=np.uint8)  # a bit per top-bits prefix held
        self._mark_shift = np.uint64(61)
        self._mark_bits = 3

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def _shape(n: int) -> tuple[int, int]:
        # (fence bits, mark bits) for n ids. About 8 ids a fence slot: a lookup then takes 4
        # to 5 halving steps, and the fence costs half a byte to a byte an id. 4 to 8 mark
        # bits an id: most ids not held fall on an unmarked prefix and need no search
        return min(28, max(0, (n // 8).bit_length() - 1)), max(3, (8 * n).bit_length() - 1)

    def _reindex(self, added: np.ndarray | None = None, before: int = 0) -> None:
        # ``added``: the sorted digests just inserted into ``before`` ids. While the index keeps
        # its shape it is brought up to date from them alone, a few milliseconds, instead of
        # being rebuilt from every id (seconds at tens of millions); both give the same arrays
        n = len(self.ids)
        bits, mark_bits = self._shape(n)
        if before <= 0 or not (bits, mark_bits) == self._shape(before) == (self._bits, self._mark_bits):
            added = None  # the shape changed (or nothing was indexed): rebuild from every id
        self._bits, self._mark_bits = bits, mark_bits
        dtype = np.int32 if n < 2**31 else np.int64
        if not bits:
            self._fence = np.array([0, n], dtype=np.int64)
        elif added is not None:
            counts = np.bincount((added >> self._shift).astype(np.int64), minlength=1 << bits)
            grown = np.concatenate(([0], np.cumsum(counts)))
            self._fence = (self._fence.astype(np.int64) + grown).astype(dtype)
        else:
            self._shift = np.uint64(64 - bits)
            starts = np.arange(1 << bits, dtype=np.uint64) << self._shift
            self._fence = np.append(np.searchsorted(self.ids, starts), n).astype(dtype)
        if added is not None:
            self._mark(added)
        else:
            self._mark_shift = np.uint64(64 - mark_bits)
            # bit k of byte j: prefix 8j + k
            self._marks = np.zeros((1 << mark_bits) // 8, dtype=np.uint8)
            self._mark(self.ids)
        widest = int(np.diff(self._fence).max()) if n else 0
        self._steps = [1 << k for k in reversed(range(widest.bit_length()))]
        self.oldest = int(self.buckets.min()) if n else None

    def _mark(self, ids: np.ndarray) -> None:
        # set the prefix bits of sorted ``ids``, REINDEX_CHUNK at a time: at a day's ids of a
        # busy worker (80 M) a bool per prefix and the prefixes of all ids took 1.3 GB for a
        # moment at each compaction
        marks = self._marks
        for i in range(0, len(ids), REINDEX_CHUNK):
            prefix = ids[i:i + REINDEX_CHUNK] >> self._mark_shift  # sorted, as the ids are
            byte = (prefix >> np.uint64(3)).astype(np.int64)
            bit = np.left_shift(np.uint8(1), (prefix & np.uint64(7)).astype(np.uint8))
            first = np.flatnonzero(np.concatenate(([True], byte[1:] != byte[:-1])))
            # OR of the bits of each byte's prefixes: a prefix held twice counts once
            marks[byte[first]] |= np.bitwise_or.reduceat(bit, first)

    def positions(self, digests: Sequence[int] | np.ndarray) -> np.ndarray:
        """Where each digest is in ``ids``, -1 where it is not."""
        q = np.asarray(digests, dtype=np.uint64)
        n = len(self.ids)
        out = np.full(len(q), -1, dtype=np.int64)
        if not n or not len(q):
            return out
        mark = q >> self._mark_shift
        bit = (mark & np.uint64(7)).astype(np.uint8)
        maybe = np.flatnonzero((self._marks[mark >> np.uint64(3)] >> bit) & 1)
        if not len(maybe):
            return out
        q = q[maybe]
        if self._bits:
            top = q >> self._shift
            lo, hi = self._fence[top].astype(np.int64), self._fence[top + 1].astype(np.int64)
        else:
            lo, hi = np.zeros(len(q), dtype=np.int64), np.full(len(q), n, dtype=np.int64)
        ids, last = self.ids, n - 1
        # below: the last place in [lo, hi) whose digest is < q (lo - 1: none); the step sizes
        # add up to the widest slot, so it is found in every slot
        below = lo - 1
        for step in self._steps:
            probe = below + step
            below = np.where((probe < hi) & (ids[np.minimum(probe, last)] < q), probe, below)
        at = below + 1
        found = (at < hi) & (ids[np.minimum(at, last)] == q)
        out[maybe] = np.where(found, at, -1)
        return out

    def find(self, digests: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """The places of the digests held here, and those digests (one lookup for them all)."""
        at = self.positions(digests)
        held = at >= 0
        if not held.any():
            return at[held], []
        return at[held], np.asarray(digests, dtype=np.uint64)[held].tolist()

    def offsets_at(self, at: np.ndarray) -> list[int]:
        """The first offsets recorded for the ids at places ``at`` (-1: none)."""
        if self.offsets is None:
            return [-1] * len(at)
        result: list[int] = self.offsets[at].tolist()
        return result

    def add(self, digests: np.ndarray, buckets: np.ndarray, offsets: np.ndarray | None = None) -> None:
        """Add digests not held yet, each with its bucket (and first offset, -1 for none)."""
        if not len(self.ids):
            # into an empty store (a restore): no insertion, and no sort when already sorted
            if len(digests) > 1 and not bool((digests[1:] > digests[:-1]).all()):
                order = np.argsort(digests, kind="stable")
                digests, buckets = digests[order], buckets[order]
                offsets = offsets[order] if offsets is not None else None
            self.ids, self.buckets = digests, buckets
            self.offsets = offsets if offsets is not None and bool((offsets >= 0).any()) else None
            self._reindex()
            return
        order = np.argsort(digests, kind="stable")
        digests, buckets = digests[order], buckets[order]
        at = np.searchsorted(self.ids, digests)
        if offsets is not None and self.offsets is None and bool((offsets >= 0).any()):
            self.offsets = np.full(len(self.ids), -1, dtype=np.int64)
        if self.offsets is not None:
            added = offsets[order] if offsets is not None else np.full(len(digests), -1, dtype=np.int64)
            self.offsets = np.insert(self.offsets, at, added)
        before = len(self.ids)
        self.ids = np.insert(self.ids, at, digests)
        self.buckets = np.insert(self.buckets, at, buckets)
        self._reindex(digests, before)

    def drop_upto(self, last: int) -> list[int]:
        """Forget the ids of buckets up to ``last``; returns those buckets."""
        if self.oldest is None or self.oldest > last:
            return []
        keep = self.buckets > last
        dropped = np.unique(self.buckets[~keep]).tolist()
        self.ids, self.buckets = self.ids[keep], self.buckets[keep]
        if self.offsets is not None:
            self.offsets = self.offsets[keep]
        self._reindex()
        return dropped


class EventIdFilter:
    """Event-id digests of one input partition, bucketed by send time for expiry.

    Kept as sets so a message's ids are checked and added with a few set operations
    (:meth:`fresh`) instead of several dict operations per id: this runs for every sample,
    twice (normalizer and window stage). Each digest is in exactly one bucket.

    Once the buckets older than the newest hold ``compact_at`` ids or more, they move to a
    compact store (:meth:`compact`), with the offsets that first passed them: a 24 h horizon
    (the normalizer's), or the window stage's few hours at high rates, would not fit in
    memory as Python ints. ``compact_at=None`` keeps everything in the set.
    """

    def __init__(self, horizon_ms: int, bucket_ms: int = _BUCKET_MS,
                 compact_at: int | None = COMPACT_AT) -> None:
        self.horizon_ms = horizon_ms
        self.bucket_ms = bucket_ms
        self.compact_at = compact_at
        self._known: set[int] = set()  # the ids of the buckets in _buckets
        self._cold = _ColdIds()  # and of the buckets compacted, never the same id
        # which input offset first passed each id, as it was recorded: (bucket, digests,
        # their offset or one offset each), in order. Only a repeated id needs the offset (a
        # replay, or a re-published copy), so the id -> offset map is built from these runs
        # when one comes (_first_offsets), not by a dict insert per id of every message
        self._runs: list[tuple[int, list[int], int | Sequence[int]]] = []
        self._first_offset: dict[int, int] = {}
        self._folded = 0  # runs already in _first_offset
        # bucket -> its digests; lists, not sets: they are only ever subtracted from _known
        self._buckets: dict[int, list[int]] = {}
        self._newest_bucket: int | None = None
        # since the last drain, per bucket: (digests, the input offset that passed them)
        self._pending: dict[int, list[tuple[list[int], int]]] = {}

    def __len__(self) -> int:
        return len(self._known) + len(self._cold)

    @property
    def compacted(self) -> int:
        """How many of the ids are in the compact store."""
        return len(self._cold)

    def check_and_add(self, event_id: str, at_ms: int, offset: int = -1) -> bool:
        """True when the id is new (and remember it); False for a duplicate.

        ``at_ms`` buckets the id for expiry; ``offset`` is the input position (>= 0 on an
        ordered input): an id first passed at this same offset or a later one is not a
        duplicate of itself when that input is replayed.
        """
        d = digest(event_id)
        return self._check(d, at_ms, offset, self._cold_offsets([d]).get(d))

    def fresh(
        self, event_ids: Sequence[str] | None, at_ms: int | Sequence[int], offset: int = -1,
        *, ids_digests: list[int] | None = None,
    ) -> list[bool] | None:
        """Check and remember one message's ids at once: None when every id is new (the
        common case, and nothing to filter), else one flag per id, True where it passes.

        Equivalent to :meth:`check_and_add` on each id in order (``at_ms`` one time for all
        or one per id), except that an id repeated inside the message passes only once, on
        a replay too. ``ids_digests``: the ids' :func:`digests`, when already computed
        (``event_ids`` may then be None). The digests are kept, not copied.
        """
        ds = ids_digests if ids_digests is not None else digests(event_ids or ())
        if not ds:
            return None
        new = set(ds)
        # which ids the compact store holds (with their first offsets), in one lookup for the
        # message (the store does not change below: only compact() and expire() move ids into
        # or out of it)
        in_cold = self._cold_offsets(ds)
        if len(new) == len(ds) and not in_cold and new.isdisjoint(self._known):
            if isinstance(at_ms, int):
                self._add_new(ds, at_ms - at_ms % self.bucket_ms, offset)
            else:
                bm = self.bucket_ms
                lo, hi = min(at_ms), max(at_ms)
                if lo - lo % bm == hi - hi % bm:
                    self._add_new(ds, lo - lo % bm, offset)
                else:
                    by_bucket: dict[int, list[int]] = {}
                    for d, t in zip(ds, at_ms, strict=True):
                        by_bucket.setdefault(t - t % bm, []).append(d)
                    for bucket, part in by_bucket.items():
                        self._add_new(part, bucket, offset)
            return None
        times = repeat(at_ms) if isinstance(at_ms, int) else at_ms
        flags = []
        here: set[int] = set()
        for d, t in zip(ds, times, strict=False):  # times may be an endless repeat
            flags.append(d not in here and self._check(d, t, offset, in_cold.get(d)))
            here.add(d)
        return flags

    def _cold_offsets(self, ds: Sequence[int]) -> dict[int, int]:
        # the ids of ds the compact store holds -> the offset it recorded for each
        if not self._cold:
            return {}
        at, held = self._cold.find(ds)
        return dict(zip(held, self._cold.offsets_at(at), strict=True)) if held else {}

    def _check(self, d: int, at_ms: int, offset: int, cold_offset: int | None) -> bool:
        # cold_offset: the compact store's offset for d, None when it does not hold d (looked
        # up by the caller, for a whole message)
        if cold_offset is not None or d in self._known:
            if offset < 0:
                return False
            # a run recorded since d was compacted is later, and wins as it would in one map
            first = self._first_offsets().get(d)
            if first is None:
                first = -1 if cold_offset is None else cold_offset
            return first >= offset
        self._add_new([d], at_ms - at_ms % self.bucket_ms, offset)
        return True

    def _add_new(self, ds: list[int], bucket: int, offset: int) -> None:
        # ds: digests not known yet, all in one bucket
        self._known.update(ds)
        members = self._buckets.get(bucket)
        if members is None:
            self._buckets[bucket] = list(ds)
        else:
            members.extend(ds)
        if offset >= 0:
            self._runs.append((bucket, ds, offset))
        pending = self._pending.get(bucket)
        if pending is None:
            self._pending[bucket] = [(ds, offset)]
        else:
            pending.append((ds, offset))
        if self._newest_bucket is None or bucket > self._newest_bucket:
            self._newest_bucket = bucket

    def load(self, bucket: int, digests: Iterable[int], offsets: Iterable[int] = ()) -> None:
        """Restore ids saved earlier, one saved entry at a time (a worker restores a partition
        with :meth:`restore`, in bulk).

        An id saved in two buckets stays in the newer one (the longer protection)."""
        ds = list(digests)
        incoming = set(ds)
        overlap = incoming & self._known
        if overlap:  # rare: the same id saved twice
            for b, members in self._buckets.items():
                common = overlap.intersection(members)
                if not common:
                    continue
                if b < bucket:  # moves to this, newer, bucket
                    members[:] = [d for d in members if d not in common]
                else:  # already here, or stays in the newer bucket
                    incoming -= common
        cold = self._cold
        if cold and incoming:
            at, held = cold.find(list(incoming))
            if held:
                cold.buckets[at] = np.maximum(cold.buckets[at], bucket)  # the newer bucket wins
                incoming.difference_update(held)
        self._known |= incoming
        self._buckets.setdefault(bucket, []).extend(incoming)
        offs = list(offsets)
        if offs:
            self._runs.append((bucket, ds, offs))
        if self._newest_bucket is None or bucket > self._newest_bucket:
            self._newest_bucket = bucket
        self._maybe_compact()

    def restore(self, entries: Iterable[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        """Restore saved ids in bulk, into an empty filter: what :meth:`load` of each entry
        in turn gives, in one pass of array operations instead of set work and compactions per
        entry (a restarted worker's partition holds up to a day of ids: tens of millions).

        ``entries``: (bucket, digests, their offsets or None), as saved. An id saved in
        several buckets is kept in the newest (the longer protection); its first offset is
        the last one recorded for it, as the id -> offset map built from every entry in turn
        gives it. Older buckets go to the compact store when they hold ``compact_at`` ids or
        more, as :meth:`load` leaves them after the last entry.

        One difference, once buckets expire: :meth:`load` forgets an offset with the bucket
        of the entry that recorded it, even while the id lives on in a newer bucket; here the
        offset stays with the id. Only an id saved with offsets in two buckets tells them
        apart, and no worker saves one: the window stage buckets an id by its event time,
        and the normalizer records no offsets.
        """
        if len(self) or self._buckets or self._runs:
            raise ValueError("restore() needs an empty filter")
        loaded: list[int] = []  # every entry's bucket, in order, empty ones too
        # by bucket: each entry's digests, offsets (None: none recorded) and the place of its
        # first id in entry order (the last recorded offset of an id is the one at the
        # largest place)
        groups: dict[int, list[tuple[np.ndarray, np.ndarray | None, int]]] = {}
        place = 0
        for bucket, ids, offsets in entries:
            loaded.append(bucket)
            n = len(ids)
            if n:
                offs = None if offsets is None or not len(offsets) else _run_offsets(offsets, n)
                groups.setdefault(bucket, []).append((np.asarray(ids, dtype=np.uint64), offs, place))
                place += n
        if not loaded:
            return
        self._newest_bucket = newest = max(loaded)
        for bucket in loaded:
            self._buckets.setdefault(bucket, [])
        if not groups:
            return
        ids, buckets, first_offsets = _merge_saved(groups, place)
        hot = buckets == newest
        older = len(ids) - int(np.count_nonzero(hot))
        if self._compacts(older):
            cold = ~hot
            self._cold.add(ids[cold], buckets[cold], first_offsets[cold] if first_offsets is not None
                           else None)
            for bucket in np.unique(buckets[cold]).tolist():
                del self._buckets[bucket]  # as compact() leaves them (empty ones stay)
            ids, buckets = ids[hot], buckets[hot]
            if first_offsets is not None:
                first_offsets = first_offsets[hot]
        if not len(ids):
            return
        # the ids kept in the set, bucket by bucket, with their offsets as runs
        by_bucket = np.argsort(buckets)  # a bucket's order of ids does not matter
        ids, buckets = ids[by_bucket], buckets[by_bucket]
        if first_offsets is not None:
            first_offsets = first_offsets[by_bucket]
        cuts = np.flatnonzero(np.concatenate(([True], buckets[1:] != buckets[:-1], [True])))
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            bucket = int(buckets[lo])
            members = ids[lo:hi].tolist()
            self._buckets[bucket] = members
            self._known.update(members)
            if first_offsets is not None:
                run = first_offsets[lo:hi]
                if bool((run >= 0).any()):
                    self._runs.append((bucket, members, run.tolist()))

    def compact(self) -> int:
        """Move the ids of every bucket but the newest to the compact store (a quarter of the
        memory; checking a message's ids costs about twice as much, python -m bench
        dedup_memory); returns how many.
        Nothing else changes: the same ids are known, in the same buckets.

        A bucket left without ids (every one saved again in a newer bucket) stays, empty, so
        that :meth:`expire` still reports it and its table entries are deleted."""
        newest = self._newest_bucket
        old = [b for b, members in self._buckets.items() if b != newest and members]
        if not old:
            return 0
        parts = [self._buckets.pop(b) for b in old]
        sizes = [len(part) for part in parts]
        moved = sum(sizes)
        if moved:
            ids = np.fromiter(chain.from_iterable(parts), dtype=np.uint64, count=moved)
            self._cold.add(ids, np.repeat(np.asarray(old, dtype=np.int64), sizes), self._move_runs(ids))
        self._known = set(self._buckets.get(newest, ())) if newest is not None else set()
        return moved

    def _move_runs(self, moved: np.ndarray) -> np.ndarray | None:
        """The first offset of each id in ``moved`` (-1: none), as the id -> offset map built
        from every run would give it (the last run that recorded the id wins); the runs keep
        only their other ids. The compact store holds the moved ids' offsets from then on, so
        a filter on an ordered input keeps no Python int of a compacted id. None: no runs."""
        runs = self._runs
        if not runs:
            return None
        sizes = [len(ds) for _, ds, _ in runs]
        ds_all = np.fromiter(chain.from_iterable(ds for _, ds, _ in runs), dtype=np.uint64, count=sum(sizes))
        offs_all = np.concatenate([_run_offsets(offs, n)
                                   for (_, _, offs), n in zip(runs, sizes, strict=True)])
        result = np.full(len(moved), -1, dtype=np.int64)
        recorded = offs_all >= 0
        if recorded.any():
            # the last recorded offset of each id: the first of each in reverse order
            rev_ids, rev_offs = ds_all[recorded][::-1], offs_all[recorded][::-1]
            uniq, first = np.unique(rev_ids, return_index=True)
            place = np.minimum(np.searchsorted(uniq, moved), len(uniq) - 1)
            hit = uniq[place] == moved
            result[hit] = rev_offs[first[place[hit]]]
        # keep every run's entries of the ids that stay (those of the newest bucket), in order
        gone = np.isin(ds_all, moved)
        kept: list[tuple[int, list[int], int | Sequence[int]]] = []
        start = 0
        for (bucket, ds, offs), n in zip(runs, sizes, strict=True):
            mask = gone[start:start + n]
            if not mask.any():
                kept.append((bucket, ds, offs))
            elif not mask.all():
                stay = np.flatnonzero(~mask)
                kept.append((bucket, [ds[i] for i in stay.tolist()], offs if isinstance(offs, int)
                             else offs_all[start:start + n][stay].tolist()))
            start += n
        self._runs = kept
        self._first_offset, self._folded = {}, 0  # rebuilt from the runs left, when needed
        return result

    def _maybe_compact(self) -> None:
        newest = self._buckets.get(self._newest_bucket) if self._newest_bucket is not None else None
        if self._compacts(len(self._known) - len(newest or ())):
            self.compact()

    def _compacts(self, older: int) -> bool:
        # whether buckets older than the newest, holding ``older`` ids, go to the compact store
        return self.compact_at is not None and len(self._buckets) >= 2 and older >= self.compact_at

    def _first_offsets(self) -> dict[int, int]:
        # the id -> first offset map, brought up to date with the runs recorded since
        runs = self._runs
        if self._folded < len(runs):
            first = self._first_offset
            for _, ds, offs in runs[self._folded:]:
                if isinstance(offs, int):
                    first.update(dict.fromkeys(ds, offs))
                else:
                    first.update((d, o) for d, o in zip(ds, offs, strict=False) if o >= 0)
            self._folded = len(runs)
        return self._first_offset

    def drain(self, chunk: int = 10_000) -> Iterator[tuple[int, dict[str, Any]]]:
        """The ids added since the last drain, per bucket, in chunks: table values to save."""
        pending, self._pending = self._pending, {}
        for bucket, parts in pending.items():
            ds = list(chain.from_iterable(p for p, _ in parts)) if len(parts) > 1 else parts[0][0]
            offs = array("q")
            for part, offset in parts:
                offs.extend(array("q", (offset,)) * len(part))
            for i in range(0, len(ds), chunk):
                # packed little-endian arrays, base64: one call per chunk instead of one
                # string per id (the changelog value is JSON)
                value: dict[str, Any] = {"bucket": bucket, "ids": _pack(array("Q", ds[i : i + chunk]))}
                chunk_offsets = offs[i : i + chunk]
                if max(chunk_offsets) >= 0:
                    value["offsets"] = _pack(chunk_offsets)
                yield bucket, value

    def expire(self) -> list[int]:
        """Forget buckets older than the horizon; returns the buckets dropped."""
        if self._newest_bucket is None:
            return []
        cutoff = self._newest_bucket - self.horizon_ms
        dropped = [b for b in self._buckets if b + self.bucket_ms <= cutoff]
        for b in dropped:
            self._known.difference_update(self._buckets.pop(b))
        if self._cold:
            dropped += [b for b in self._cold.drop_upto(cutoff - self.bucket_ms) if b not in dropped]
        self._maybe_compact()
        if dropped:
            gone = set(dropped)
            self._runs = [run for run in self._runs if run[0] not in gone]
            self._first_offset, self._folded = {}, 0  # rebuilt from the runs left, when needed
        return dropped


def _merge_saved(
    groups: dict[int, list[tuple[np.ndarray, np.ndarray | None, int]]], place: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Saved entries by bucket (digests, offsets or None, place of the first id in entry
    order; ``place``: how many ids in all), merged: each distinct id once, sorted, with its
    newest bucket and its last recorded offset (-1: none; None when no entry has offsets).
    Empties ``groups``."""
    with_offsets = any(offs is not None for parts in groups.values() for _, offs, _ in parts)
    distinct = np.asarray(sorted(groups), dtype=np.int64)
    runs: list[np.ndarray] = []
    places: list[np.ndarray] = []
    by_place = np.full(place, -1, dtype=np.int64) if with_offsets else None  # offsets, in entry order
    place_type = np.int32 if place < 2**31 else np.int64  # places take half the memory
    for bucket in distinct.tolist():
        parts = groups.pop(bucket)
        run = np.concatenate([ids for ids, _, _ in parts])
        if by_place is None:
            # sorted a bucket at a time, then merged below: half the time of one argsort
            # of every id (a day of the normalizer's is tens of millions)
            run.sort()
        else:
            at = np.concatenate([np.arange(start, start + len(ids), dtype=place_type)
                                 for ids, _, start in parts])
            for ids, offs, start in parts:
                if offs is not None:
                    by_place[start:start + len(ids)] = offs
            order = np.argsort(run)
            run, at = run[order], at[order]
            places.append(at)
        runs.append(run)
    sizes = [len(run) for run in runs]
    ds = np.concatenate(runs)
    del runs
    # stable: merges the buckets' sorted runs, and keeps an id's records in bucket order
    order = np.argsort(ds, kind="stable")
    ds = ds[order]
    first = np.flatnonzero(np.concatenate(([True], ds[1:] != ds[:-1])))
    ids = ds[first]
    del ds
    # the buckets are in ascending order, so an id's newest bucket is its last record's
    ranks = np.repeat(np.arange(len(distinct), dtype=np.int32), sizes)[order]
    last_record = np.append(first[1:], len(ranks)) - 1
    buckets = distinct[ranks[last_record]]
    del ranks
    first_offsets: np.ndarray | None = None
    if by_place is not None:
        at = np.concatenate(places)[order]
        del places
        recorded = np.where(by_place[at] >= 0, at, place_type(-1))
        latest = np.maximum.reduceat(recorded, first)
        first_offsets = np.where(latest >= 0, by_place[np.maximum(latest, 0)], -1)
        del at, recorded, latest
    del order
    return ids, buckets, first_offsets


def _run_offsets(offs: int | Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    # a run's offsets, one per id: one for all, or a saved chunk's (as many as its ids;
    # -1 pads one that is short, as the map built from runs skips the missing ones)
    if isinstance(offs, int):
        return np.full(n, offs, dtype=np.int64)
    out = np.full(n, -1, dtype=np.int64)
    given = np.asarray(offs[:n], dtype=np.int64)
    out[:len(given)] = given
    return out


def saved_entries(
    data: Mapping[Any, Any], prefix: str
) -> Iterator[tuple[str, int, list[int], list[int]]]:
    """Table entries under a key prefix (e.g. ``"p3:"``): (key, bucket, digests, offsets),
    as lists for :meth:`EventIdFilter.load`."""
    for key, bucket, ids, offsets in saved_arrays(data, prefix):
        yield key, bucket, ids.tolist(), offsets.tolist() if offsets is not None else []


def saved_arrays(
    data: Mapping[Any, Any], prefix: str
) -> Iterator[tuple[str, int, np.ndarray, np.ndarray | None]]:
    """Table entries under a key prefix (e.g. ``"p3:"``), for :meth:`EventIdFilter.restore`:
    (key, bucket, digests, offsets or None)."""
    for key, value in list(data.items()):
        if isinstance(key, str) and key.startswith(prefix) and value:
            offsets = value.get("offsets")
            yield (key, int(value["bucket"]), _unpack_array("<u8", value["ids"]),
                   _unpack_array("<i8", offsets) if offsets else None)


def _unpack_array(dtype: str, text: str) -> np.ndarray:
    # read-only views of the decoded bytes in the saved (little-endian) order, native order out
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(dtype[1:], copy=False)


def _pack(values: array[int]) -> str:
    if sys.byteorder != "little":
        values = array(values.typecode, values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()


class TableBackedFilters:
    """One EventIdFilter per input partition, saved to a changelog table under a key prefix.

    ``send(partition, key, value)`` writes a changelog entry (None deletes); ``data`` is the
    table's local store, read once per partition to restore its filter.
    """

    def __init__(
        self,
        data: MutableMapping[Any, Any],
        send: Callable[[int, str, Any], Any],
        prefix: str,
        horizon_ms: int,
        bucket_ms: int = _BUCKET_MS,
        compact_at: int | None = COMPACT_AT,
    ) -> None:
        self._data = data
        self._send = send
        self._prefix = prefix
        self._horizon_ms = horizon_ms
        self._bucket_ms = bucket_ms
        self._compact_at = compact_at
        self._filters: dict[int, EventIdFilter] = {}
        self._keys: dict[int, dict[int, list[str]]] = {}

    def get(self, part: int) -> EventIdFilter:
        """The filter of a partition, restored from the table on first use."""
        f = self._filters.get(part)
        if f is None:
            f = EventIdFilter(self._horizon_ms, self._bucket_ms, self._compact_at)
            keys: dict[int, list[str]] = {}

            def entries() -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
                # a generator: no list here keeps the entries' arrays alive while restore()
                # merges them (it frees each bucket's once merged)
                for key, bucket, ids, offsets in saved_arrays(self._data, f"{self._prefix}{part}:"):
                    keys.setdefault(bucket, []).append(key)
                    yield bucket, ids, offsets

            f.restore(entries())
            # only a filter restored whole is used: one missing some of the saved ids would
            # pass their duplicates (a restore that fails is tried again at the next use)
            self._filters[part], self._keys[part] = f, keys
        return f

    def save(self, part: int, tag: int) -> None:
        """Write the ids added since the last save; delete expired buckets."""
        f = self._filters.get(part)
        if f is None:
            return
        keys = self._keys[part]
        for n, (bucket, value) in enumerate(f.drain()):
            key = f"{self._prefix}{part}:{bucket}:{tag}:{n}"
            self._data[key] = value
            self._send(part, key, value)
            keys.setdefault(bucket, []).append(key)
        for bucket in f.expire():
            for key in keys.pop(bucket, []):
                self._data.pop(key, None)
                self._send(part, key, None)

    def forget(self, part: int) -> None:
        """Drop a revoked partition's filter; its next owner restores it from the table."""
        self._filters.pop(part, None)
        self._keys.pop(part, None)
