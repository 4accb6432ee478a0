"""Microseconds per usage record to decode a 500-record envelope: before and after the fast path.

"before" is what ``AvroCodec.decode`` did until the fast path: the body sliced off and read by fastavro
with the decimal logical type and the codec's schema as reader schema. Both run in one process,
interleaved, best of several rounds (the machine is shared)::

    python -m bench codec_decode
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable, Sequence
from decimal import Context, Decimal
from typing import Any

import fastavro

from schemas import envelope_codec

RECORDS = 500


def envelope(n: int = RECORDS, seed: int = 1, max_digits: int = 38) -> dict[str, Any]:
    """A producer-like envelope: short ids, values of 1 to ``max_digits`` digits, small metadata."""
    rnd = random.Random(seed)
    ctx = Context(prec=38)
    return {
        "envelope_id": "env-0001", "source": "vm", "producer": "vm-gateway-1",
        "sent_at_ms": 1_700_000_000_000, "watermark_ms": 1_699_999_990_000,
        "records": [{
            "event_id": f"vm:{i:08d}:cpu", "tenant_id": f"tenant-{i % 37}", "source": "vm",
            "resource_id": f"vm-{i % 101}", "metric": "cpu_time_nanos",
            "value": Decimal(rnd.randrange(-(10 ** rnd.randrange(1, max_digits)),
                                           10 ** rnd.randrange(1, max_digits))).scaleb(-9, ctx),
            "event_time_ms": 1_700_000_000_000 + i, "metadata": {"region": "eu-west-1", "host": f"h{i % 7}"},
        } for i in range(n)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures for values of up to 38 digits (the full decimal(38, 9)) and of up to 15."""
    del argv  # no options
    for max_digits in (38, 15):
        measure(max_digits)
    return 0


def measure(max_digits: int, rounds: int = 7, loops: int = 20) -> None:
    """Best-of-``rounds`` microseconds per record of the old and the new decode, interleaved."""
    codec = envelope_codec()
    data = codec.encode(envelope(max_digits=max_digits))
    schema = codec.schema

    def before() -> Any:
        return fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, schema)

    def after() -> Any:
        return codec.decode(data)

    assert before() == after()
    best: dict[str, float] = {"before": float("inf"), "after": float("inf")}
    runs: dict[str, Callable[[], Any]] = {"before": before, "after": after}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / loops / RECORDS * 1e6)
    print(f"{RECORDS}-record envelope, values of up to {max_digits} digits, {len(data)} bytes; "
          f"best of {rounds} rounds x {loops} decodes")
    for name, us in best.items():
        print(f"  {name:6s} {us:6.2f} us/record")
    print(f"  speed-up x{best['before'] / best['after']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
