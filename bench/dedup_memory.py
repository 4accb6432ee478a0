"""Bytes per event id held by a dedup filter, and what checking a message's ids costs, with
the older buckets in the compact store and with every id in the set::

    python -m bench dedup_memory                 # the normalizer's: 4,000,000 ids, 6 hourly buckets
    python -m bench dedup_memory --ids 20000000
    python -m bench dedup_memory --window-stage  # the window stage's: offsets, 10-minute buckets

``--window-stage`` builds the window stage's filter instead: each message's ids recorded
with its input offset, 10-minute buckets over a 2 h 10 min horizon (1-hour windows), and
also times a replay (a message checked again at its own offset, as after a restart: the
first one builds the id -> offset map of what is still in the set).

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench import publish_report
from streams.dedup import COMPACT_AT, EventIdFilter

__all__ = ["main"]

H = 3_600_000
PER_MESSAGE = 500
BATCH = 100  # messages between saves, as the normalizer takes them


def _shape(window_stage: bool) -> tuple[int, int]:
    """(horizon, bucket) in ms of the filter measured: the worker's, with default settings."""
    if not window_stage:
        return 24 * H, H
    from metering.config import load_settings
    from streams.agents import window_ids_horizon

    return window_ids_horizon(load_settings())


def build(ids: int, buckets: int, compact_at: int | None, seed: int,
          window_stage: bool = False) -> tuple[EventIdFilter, int]:
    """A filter (compacting at ``compact_at``: the worker's threshold, or None for never) of
    ``ids`` random digests over ``buckets`` buckets, and the bytes built for it. The window
    stage's records each message's offset (its message number here)."""
    rng = random.Random(seed)
    gc.collect()
    tracemalloc.start()
    horizon_ms, bucket_ms = _shape(window_stage)
    f = EventIdFilter(horizon_ms=horizon_ms, bucket_ms=bucket_ms, compact_at=compact_at)
    for _, batch_end in fill(f, ids, buckets, window_stage, rng):
        if batch_end:  # a batch saved: the worker drains, then expires (and compacts)
            for _ in f.drain():
                pass
            f.expire()
    for _ in f.drain():
        pass
    f.expire()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return f, size


def fill(f: EventIdFilter, ids: int, buckets: int, window_stage: bool,
         rng: random.Random) -> Iterator[tuple[int, bool]]:
    """Pass ``ids`` new random digests through ``f`` (``fresh``), ``PER_MESSAGE`` a message,
    as many in each of ``buckets`` buckets; after each message, yield its number and whether
    it ends a batch of ``BATCH`` (when the worker saves). The window stage's filter records
    each message's offset (its number)."""
    bucket_ms = _shape(window_stage)[1]
    per_bucket = ids // buckets
    message = 0
    for b in range(buckets):
        for start in range(0, per_bucket, PER_MESSAGE):
            n = min(PER_MESSAGE, per_bucket - start)
            f.fresh(None, b * bucket_ms, message if window_stage else -1,
                    ids_digests=[rng.getrandbits(64) for _ in range(n)])
            message += 1
            yield message, message % BATCH == 0


def check_cost(f: EventIdFilter, at_ms: int, messages: int, rng: random.Random) -> float:
    """Microseconds per id of ``fresh`` on ``messages`` messages of new ids."""
    batches = [[rng.getrandbits(64) for _ in range(PER_MESSAGE)] for _ in range(messages)]
    t0 = time.perf_counter()
    for ds in batches:
        f.fresh(None, at_ms, ids_digests=ds)
    return (time.perf_counter() - t0) / (messages * PER_MESSAGE) * 1e6


def replay_cost(f: EventIdFilter, ids: int, buckets: int, messages: int, seed: int) -> float:
    """Microseconds per id of ``fresh`` on ``messages`` messages of the oldest bucket checked
    again at their own offsets (a replay: every id passes), the first one included."""
    rng = random.Random(seed)
    per_bucket = ids // buckets
    batches = [[rng.getrandbits(64) for _ in range(min(PER_MESSAGE, per_bucket - start))]
               for start in range(0, per_bucket, PER_MESSAGE)][:messages]
    t0 = time.perf_counter()
    for offset, ds in enumerate(batches):
        flags = f.fresh(None, 0, offset, ids_digests=ds)
        assert flags is not None and all(flags), "a replayed message must pass whole"
    return (time.perf_counter() - t0) / sum(map(len, batches)) * 1e6


def run(ids: int, buckets: int, rounds: int, window_stage: bool = False) -> dict[str, Any]:
    """Build both filters, then time their checks alternately."""
    compact, compact_bytes = build(ids, buckets, COMPACT_AT, seed=1, window_stage=window_stage)
    plain, plain_bytes = build(ids, buckets, None, seed=1, window_stage=window_stage)
    rng = random.Random(2)
    newest = (buckets - 1) * _shape(window_stage)[1]
    times: dict[str, list[float]] = {"compact": [], "set": []}
    for _ in range(rounds):
        times["compact"].append(check_cost(compact, newest, 200, rng))
        times["set"].append(check_cost(plain, newest, 200, rng))
    best = {k: min(v) for k, v in times.items()}
    report: dict[str, Any] = {
        "filter": "window stage" if window_stage else "normalizer",
        "ids": ids, "buckets": buckets, "compacted_ids": compact.compacted,
        "bytes_per_id": {"compact": compact_bytes / ids, "set": plain_bytes / ids},
        "check_us_per_id": best,
        "memory_ratio_set_over_compact": plain_bytes / compact_bytes,
        "check_ratio_compact_over_set": best["compact"] / best["set"],
    }
    if window_stage:  # once each: the set's first replayed message builds its map
        report["replay_us_per_id"] = {"compact": replay_cost(compact, ids, buckets, 200, seed=1),
                                      "set": replay_cost(plain, ids, buckets, 200, seed=1)}
    return report


def _print(r: dict[str, Any]) -> None:
    b, c = r["bytes_per_id"], r["check_us_per_id"]
    print(f"the {r['filter']}'s filter: {r['ids']:,} ids over {r['buckets']} buckets, "
          f"{r['compacted_ids']:,} of them compacted")
    replay = r.get("replay_us_per_id")
    for label, k in (("every id in the set:  ", "set"), ("older buckets compact:", "compact")):
        extra = f", replay {replay[k]:.3f} us an id" if replay else ""
        print(f"  {label}  {b[k]:6.1f} bytes an id, check {c[k]:.3f} us an id{extra}")
    print(f"  memory: {r['memory_ratio_set_over_compact']:.1f} times less; "
          f"check: {r['check_ratio_compact_over_set']:.2f} times the set's")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (also used by ``python -m bench``)."""
    return _filter_main("dedup_memory", __doc__, run, _print, 5, argv)


def _filter_main(name: str, doc: str | None, run: Callable[[int, int, int, bool], dict[str, Any]],
                 show: Callable[[dict[str, Any]], None], rounds: int, argv: Sequence[str] | None) -> int:
    """The command line of a benchmark of one partition's id filter (this one's, and
    ``bench.dedup_restore``'s): ``run(ids, buckets, rounds, window_stage)`` gives its report."""
    p = argparse.ArgumentParser(prog=name, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=4_000_000)
    p.add_argument("--buckets", type=int, default=None,
                   help="default 6 (the normalizer's hourly buckets) or 13 (the window stage's)")
    p.add_argument("--window-stage", action="store_true",
                   help="the window stage's filter: offsets, 10-minute buckets, 2 h 10 min")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **run(args.ids, args.buckets or (13 if args.window_stage else 6), args.rounds,
                    args.window_stage)}
    return publish_report(name, report, None, args.json, show)


if __name__ == "__main__":
    raise SystemExit(main())
