"""Microseconds per usage record to decode envelopes that stay alive for a while, as in the
worker (the normalizer's cache of what it just published), under CPython's default collector
thresholds and under the worker's (``streams.worker.tune_gc``). Interleaved, best of several
rounds, one process::

    python -m bench gc_decode
"""

from __future__ import annotations

import collections
import gc
import time
from collections.abc import Sequence

from bench.codec_decode import envelope
from schemas import envelope_codec
from streams.worker import GC_YOUNG_THRESHOLD

__all__ = ["main"]

ENVELOPES = 200
ALIVE = 400  # envelopes kept alive at once: the worker's cache holds up to 200,000 records


def main(argv: Sequence[str] | None = None) -> int:
    """Print both figures and their ratio."""
    del argv  # no options
    codec = envelope_codec()
    payloads = [codec.encode(envelope(seed=i, max_digits=15)) for i in range(ENVELOPES)]
    records = sum(len(codec.decode(p)["records"]) for p in payloads)
    default = gc.get_threshold()
    tuned = (GC_YOUNG_THRESHOLD, *default[1:])

    def run() -> float:
        alive: collections.deque[object] = collections.deque(maxlen=ALIVE)
        t0 = time.perf_counter()
        for _ in range(5):
            for p in payloads:
                alive.append(codec.decode(p))
        return (time.perf_counter() - t0) / (5 * records) * 1e6

    best = {"default": float("inf"), "tuned": float("inf")}
    try:
        for _ in range(5):
            for name, threshold in (("default", default), ("tuned", tuned)):
                gc.set_threshold(*threshold)
                gc.collect()
                best[name] = min(best[name], run())
    finally:
        gc.set_threshold(*default)
    print(f"decode with {ALIVE} envelopes alive, best of 5 rounds")
    print(f"  gc threshold {default}: {best['default']:6.2f} us/record")
    print(f"  gc threshold {tuned}: {best['tuned']:6.2f} us/record")
    print(f"  speed-up x{best['default'] / best['tuned']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
