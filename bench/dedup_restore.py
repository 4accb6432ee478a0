"""Seconds to restore a partition's event-id filter from its changelog table, as a worker does
when it is assigned the partition, in bulk (``EventIdFilter.restore``, what the worker runs)
beside loading the saved entries one at a time (``EventIdFilter.load``, what it ran before)::

    python -m bench dedup_restore                   # the normalizer's: 4,000,000 ids, hourly buckets
    python -m bench dedup_restore --ids 20000000
    python -m bench dedup_restore --window-stage    # offsets, 10-minute buckets

The table is written the way the worker writes it (``TableBackedFilters.save`` after every
batch of 100 messages of 500 new ids). Both restores read the same table, alternated, best of
``--rounds``; the peak memory each allocates on the way (tracemalloc, numpy included) comes
from one more run of each. Restoring runs on the worker's event loop: nothing else of the
worker runs meanwhile.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from bench.dedup_memory import _filter_main, _shape, fill
from streams.dedup import COMPACT_AT, EventIdFilter, TableBackedFilters, saved_entries

__all__ = ["main"]

def table(ids: int, buckets: int, window_stage: bool, seed: int = 1) -> tuple[dict[str, Any], int]:
    """The changelog table's entries of one partition (prefix ``p0:``) holding about ``ids``
    ids (as many in each bucket), and how many."""
    horizon_ms, bucket_ms = _shape(window_stage)
    data: dict[str, Any] = {}
    filters = TableBackedFilters(data, lambda part, key, value: None, "p", horizon_ms, bucket_ms=bucket_ms)
    f = filters.get(0)
    message = 0
    for message, batch_end in fill(f, ids, buckets, window_stage, random.Random(seed)):
        if batch_end:
            filters.save(0, message)
    filters.save(0, message + 1)
    return data, len(f)


def bulk(data: dict[str, Any], window_stage: bool) -> EventIdFilter:
    """The worker's restore."""
    horizon_ms, bucket_ms = _shape(window_stage)
    filters = TableBackedFilters(data, lambda part, key, value: None, "p", horizon_ms, bucket_ms=bucket_ms)
    return filters.get(0)


def per_entry(data: dict[str, Any], window_stage: bool) -> EventIdFilter:
    """The restore before: each saved entry loaded in turn."""
    horizon_ms, bucket_ms = _shape(window_stage)
    f = EventIdFilter(horizon_ms, bucket_ms, COMPACT_AT)
    for _key, bucket, ids, offsets in saved_entries(data, "p0:"):
        f.load(bucket, ids, offsets)
    return f


def _timed(fn: Any, *args: Any) -> tuple[float, EventIdFilter]:
    gc.collect()
    t0 = time.perf_counter()
    f = fn(*args)
    return time.perf_counter() - t0, f


def _peak(fn: Any, *args: Any) -> int:
    gc.collect()
    tracemalloc.start()
    f = fn(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del f
    return peak


def run(ids: int, buckets: int, rounds: int, window_stage: bool) -> dict[str, Any]:
    """Build the table, then time both restores alternately and check they agree."""
    data, ids = table(ids, buckets, window_stage)
    seconds: dict[str, list[float]] = {"bulk": [], "per_entry": []}
    for _ in range(rounds):
        for name, fn in (("bulk", bulk), ("per_entry", per_entry)):
            s, f = _timed(fn, data, window_stage)
            seconds[name].append(s)
            if len(f) != ids:
                raise AssertionError(f"{name} restored {len(f)} ids of {ids}")
            del f
    best = {k: min(v) for k, v in seconds.items()}
    peaks = {name: _peak(fn, data, window_stage) for name, fn in (("bulk", bulk), ("per_entry", per_entry))}
    return {
        "filter": "window stage" if window_stage else "normalizer", "ids": ids, "buckets": buckets,
        "entries": len(data), "seconds": best, "us_per_id": {k: v / ids * 1e6 for k, v in best.items()},
        "speedup": best["per_entry"] / best["bulk"],
        "peak_bytes_per_id": {k: v / ids for k, v in peaks.items()},
    }


def _print(r: dict[str, Any]) -> None:
    print(f"restore the {r['filter']}'s filter: {r['ids']:,} ids over {r['buckets']} buckets, "
          f"{r['entries']:,} table entries (best of the rounds)")
    for label, k in (("in bulk (the worker's):", "bulk"), ("entry by entry:        ", "per_entry")):
        print(f"  {label} {r['seconds'][k]:7.2f} s, {r['us_per_id'][k]:.3f} us an id, "
              f"peak {r['peak_bytes_per_id'][k]:.0f} bytes an id allocated")
    print(f"  in bulk: {r['speedup']:.1f} times faster")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (also used by ``python -m bench``)."""
    return _filter_main("dedup_restore", __doc__, run, _print, 3, argv)


if __name__ == "__main__":
    raise SystemExit(main())
