"""Bytes per event id held by the normalizer's dedup filter, and what checking a message's
ids costs, with the older buckets in the compact store and with every id in the set::

    python -m bench dedup_memory                 # 4,000,000 ids over 6 hourly buckets
    python -m bench dedup_memory --ids 20000000

Both filters hold the same ids (random 64-bit digests, as XXH3 gives). Memory is what
tracemalloc sees allocated by building each (numpy reports its arrays to it); the check is
``EventIdFilter.fresh`` on 500-id messages of new ids, the normalizer's common case,
alternated between the two filters, best of several rounds. The Faust table that saves the
ids (about 11 bytes an id as base64 text) is not included: it is the same for both. The
compacting filter uses the worker's threshold (``COMPACT_AT``), so its newest buckets are
still in the set, as in the worker.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from bench import publish_report
from streams.dedup import COMPACT_AT, EventIdFilter

__all__ = ["main"]

H = 3_600_000
PER_MESSAGE = 500


def build(ids: int, buckets: int, compact_at: int | None, seed: int) -> tuple[EventIdFilter, int]:
    """A filter (compacting at ``compact_at``: the worker's threshold, or None for never) of
    ``ids`` random digests over ``buckets`` hourly buckets, and the bytes built for it."""
    rng = random.Random(seed)
    gc.collect()
    tracemalloc.start()
    f = EventIdFilter(horizon_ms=24 * H, compact_at=compact_at)
    per_bucket = ids // buckets
    for b in range(buckets):
        for start in range(0, per_bucket, PER_MESSAGE):
            n = min(PER_MESSAGE, per_bucket - start)
            f.fresh(None, b * H, ids_digests=[rng.getrandbits(64) for _ in range(n)])
            if start % 50_000 == 0:  # a batch saved: the worker drains, then expires (and compacts)
                for _ in f.drain():
                    pass
                f.expire()
    for _ in f.drain():
        pass
    f.expire()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return f, size


def check_cost(f: EventIdFilter, at_ms: int, messages: int, rng: random.Random) -> float:
    """Microseconds per id of ``fresh`` on ``messages`` messages of new ids."""
    batches = [[rng.getrandbits(64) for _ in range(PER_MESSAGE)] for _ in range(messages)]
    t0 = time.perf_counter()
    for ds in batches:
        f.fresh(None, at_ms, ids_digests=ds)
    return (time.perf_counter() - t0) / (messages * PER_MESSAGE) * 1e6


def run(ids: int, buckets: int, rounds: int) -> dict[str, Any]:
    """Build both filters, then time their checks alternately."""
    compact, compact_bytes = build(ids, buckets, COMPACT_AT, seed=1)
    plain, plain_bytes = build(ids, buckets, None, seed=1)
    rng = random.Random(2)
    newest = (buckets - 1) * H
    times: dict[str, list[float]] = {"compact": [], "set": []}
    for _ in range(rounds):
        times["compact"].append(check_cost(compact, newest, 200, rng))
        times["set"].append(check_cost(plain, newest, 200, rng))
    best = {k: min(v) for k, v in times.items()}
    return {
        "ids": ids, "buckets": buckets, "compacted_ids": compact.compacted,
        "bytes_per_id": {"compact": compact_bytes / ids, "set": plain_bytes / ids},
        "check_us_per_id": best,
        "memory_ratio_set_over_compact": plain_bytes / compact_bytes,
        "check_ratio_compact_over_set": best["compact"] / best["set"],
    }


def _print(r: dict[str, Any]) -> None:
    b, c = r["bytes_per_id"], r["check_us_per_id"]
    print(f"{r['ids']:,} ids over {r['buckets']} hourly buckets, {r['compacted_ids']:,} of them compacted")
    print(f"  every id in the set:    {b['set']:6.1f} bytes an id, check {c['set']:.3f} us an id")
    print(f"  older buckets compact:  {b['compact']:6.1f} bytes an id, check {c['compact']:.3f} us an id")
    print(f"  memory: {r['memory_ratio_set_over_compact']:.1f} times less; "
          f"check: {r['check_ratio_compact_over_set']:.2f} times the set's")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (also used by ``python -m bench``)."""
    p = argparse.ArgumentParser(prog="dedup_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=4_000_000)
    p.add_argument("--buckets", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = {"benchmark": "dedup_memory", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **run(args.ids, args.buckets, args.rounds)}
    return publish_report("dedup_memory", report, None, args.json, _print)


if __name__ == "__main__":
    raise SystemExit(main())
