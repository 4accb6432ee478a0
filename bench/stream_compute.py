"""The stream stage's per-sample compute alone, beside decoding alone: the ceiling of the
stage/raw-consumer ratio that ``bench.stream_throughput`` measures.

::

    python -m bench stream_compute [--samples 1000000] [--in-flight 100]

No Kafka and no Faust: the same VM envelopes as ``bench.stream_throughput`` (8 tenants x 83
VMs, 10 s ticks, about 500 records per envelope) are encoded once, then, in one process,
interleaved, best of ``--rounds``:

* **decode**: ``envelope_codec().decode`` of every envelope, which is all the raw
  consume-and-decode baseline does per sample besides fetching;
* **stage compute**: what the two agents do per message once it is fetched (see
  streams/agents.py): decode, validate (``invalid_records``), drop repeated ids (the
  normalizer's 24 h ``EventIdFilter``), fold (``Published.of``), then, ``--in-flight``
  messages later (what the normalizer has published and the window stage not yet taken),
  window it (``PartitionWindows.add_folded`` with the window stage's own id filter,
  ``close_due`` after every message, a ``snapshot`` and the filters' ``drain`` per 500
  messages, as the agents persist per batch), with the default window sizes (1 min and 1 h).

Since the raw baseline costs at least *decode*, and the stage at least *stage compute*, the
stage can reach at most ``decode / stage compute`` of the raw figure however little its
Kafka and Faust machinery costs. Quote that ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import publish_report

__all__ = ["main", "measure"]

TICK_MS = 10_000
PARTITIONS = 4
TAKE_MAX = 500  # messages per persisted batch, as the window agent takes them


def envelopes(samples: int) -> list[tuple[int, bytes]]:
    """(partition, encoded envelope) of ``samples`` VM samples, one envelope per tenant,
    tick and 500 records, partitioned by tenant as the pipeline does."""
    from producers.simulators import VmSimulator
    from schemas import envelope_codec
    from streams.views import partition_of

    codec = envelope_codec()
    sim = VmSimulator(tenants=8, vms_per_tenant=83, interval_ms=TICK_MS, seed=7)
    now = int(time.time() * 1000)
    ticks = -(-samples // (len(sim.vms) * 6))
    start = now - now % 60_000 - (ticks + 2) * TICK_MS
    out: list[tuple[int, bytes]] = []
    sent = 0
    for i in range(ticks):
        by_tenant: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in sim.tick(start + (i + 1) * TICK_MS)[: samples - sent]:
            by_tenant[r["tenant_id"]].append(r)
            sent += 1
        for tenant, recs in by_tenant.items():
            for j in range(0, len(recs), 500):
                out.append((partition_of(tenant, PARTITIONS), codec.encode({
                    "envelope_id": uuid.uuid4().hex, "source": "vm", "producer": "bench",
                    "sent_at_ms": now, "watermark_ms": None, "records": recs[j:j + 500]})))
    return out


def decode_only(data: list[tuple[int, bytes]]) -> int:
    """Decode every envelope; the number of samples."""
    from schemas import envelope_codec

    decode = envelope_codec().decode
    return sum(len(decode(payload)["records"]) for _, payload in data)


def stage_compute(data: list[tuple[int, bytes]], in_flight: int = 0) -> int:
    """The agents' per-message work on every envelope (no Kafka); the samples windowed.
    ``in_flight``: messages the normalizer is ahead of the window stage."""
    from collections import deque

    from metering.config import load_settings
    from schemas import envelope_codec
    from streams.agents import Published, window_config, window_ids_horizon
    from streams.columns import Columns
    from streams.dedup import EventIdFilter, digests
    from streams.normalize import invalid_records
    from streams.windows import PartitionWindows

    settings = load_settings()
    decode = envelope_codec().decode
    config = window_config(settings)
    horizon_ms, bucket_ms = window_ids_horizon(settings)
    source_ids = {p: EventIdFilter(settings.dedup_horizon_seconds * 1000) for p in range(PARTITIONS)}
    window_ids = {p: EventIdFilter(horizon_ms, bucket_ms=bucket_ms) for p in range(PARTITIONS)}
    windows = {p: PartitionWindows(config, None, window_ids[p]) for p in range(PARTITIONS)}
    offsets = dict.fromkeys(range(PARTITIONS), 0)
    smallest = min(config.sizes_ms)  # every sample is in exactly one window of each size
    samples = 0
    published: deque[tuple[int, bytes, Published]] = deque()

    def window(part: int, payload: bytes, pub: Published) -> int:
        pw = windows[part]
        pub.add_to(pw, offsets[part], lambda: decode(payload)["records"])
        offsets[part] += 1
        return sum(r["sample_count"] for r in pw.close_due()
                   if r["window_end_ms"] - r["window_start_ms"] == smallest)

    for n, (part, payload) in enumerate(data, 1):
        env = decode(payload)
        records = env["records"]
        cols = Columns.of(records)  # every field read once, as the normalizer does
        bad = invalid_records(records, env["sent_at_ms"], cols)
        if bad:
            raise AssertionError(f"the simulator made invalid records: {bad[:3]}")
        # the normalizer hashes the ids once; the window stage gets its digests (a hit in
        # the cache of what was just published)
        ds = digests(cols.event_ids)
        flags = source_ids[part].fresh(None, env["sent_at_ms"], ids_digests=ds)
        if flags is not None:
            raise AssertionError("the simulator repeated an event id")
        published.append((part, payload, Published.of(env, ds, config, cols)))
        del env, records, cols  # freed before the next decode, as the normalizer's are
        while len(published) > in_flight:
            samples += window(*published.popleft())
        if n % TAKE_MAX == 0 or n == len(data):
            while n == len(data) and published:
                samples += window(*published.popleft())
            for p in range(PARTITIONS):
                windows[p].snapshot(None)
                for f in (source_ids[p], window_ids[p]):
                    for _ in f.drain():
                        pass
                    f.expire()
    return samples + sum(w.samples for pw in windows.values()
                         for (size, _, _), w in pw.open.items() if size == smallest)


def measure(samples: int, rounds: int, in_flight: int = 100) -> dict[str, Any]:
    """Best-of-``rounds`` seconds of each, interleaved (the machine is shared)."""
    data = envelopes(samples)
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    runs: list[tuple[str, Callable[[list[tuple[int, bytes]]], int]]] = [
        ("decode", decode_only), ("stage_compute", lambda d: stage_compute(d, in_flight))]
    for _ in range(rounds):
        for name, fn in runs:
            t0 = time.perf_counter()
            counts[name] = fn(data)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    if counts["decode"] != counts["stage_compute"]:
        raise AssertionError(f"the stage windowed {counts['stage_compute']} of {counts['decode']} samples")
    return {
        "samples": counts["decode"], "envelopes": len(data), "rounds": rounds, "in_flight": in_flight,
        "decode_s": best["decode"], "stage_compute_s": best["stage_compute"],
        "decode_us_per_sample": best["decode"] / counts["decode"] * 1e6,
        "stage_compute_us_per_sample": best["stage_compute"] / counts["decode"] * 1e6,
        "ceiling_stage_over_raw": best["decode"] / best["stage_compute"],
    }


def _show(r: dict[str, Any]) -> None:
    print(f"{r['samples']:,} samples in {r['envelopes']:,} envelopes, best of {r['rounds']} rounds, "
          f"{r['in_flight']} messages in flight")
    for label, key in (("decode only", "decode"), ("stage compute", "stage_compute")):
        print(f"  {label:<15} {r[key + '_s']:6.2f} s  {r[key + '_us_per_sample']:5.2f} us/sample")
    print(f"  ceiling of stream stage / raw consume+decode: {r['ceiling_stage_over_raw']:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run and report (``bench/results/stream_compute-<time>.json``)."""
    p = argparse.ArgumentParser(prog="python -m bench stream_compute", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--in-flight", type=int, default=100,
                   help="messages between normalizer and window stage (the worker's normalizer "
                        "takes 100 per batch)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    report = {"benchmark": "stream_compute", **measure(args.samples, args.rounds, args.in_flight)}
    return publish_report("stream_compute", report, args.out, args.json, _show)


if __name__ == "__main__":
    raise SystemExit(main())
