"""``python -m bench``: run every benchmark present, each against its own embedded broker.

``python -m bench NAME [ARGS...]`` runs one benchmark with its own arguments, e.g.
``python -m bench stream_throughput --samples 2000000``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = [
    "bench.client_latency", "bench.codec_decode", "bench.dedup_memory", "bench.dedup_restore",
    "bench.gc_decode",
    "bench.stream_compute",
    "bench.stream_throughput",
    "bench.clickhouse_sink",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run each benchmark module's ``main`` in turn; a missing one is reported, not hidden."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected, args = BENCHMARKS, []
    if argv:
        name = argv[0] if argv[0].startswith("bench.") else f"bench.{argv[0]}"
        if name not in BENCHMARKS:
            print(f"unknown benchmark {argv[0]!r}; known: "
                  f"{', '.join(b.split('.', 1)[1] for b in BENCHMARKS)}", file=sys.stderr)
            return 2
        selected, args = [name], argv[1:]
    failed = 0
    for name in selected:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"{name}: not present", file=sys.stderr)
                continue
            raise
        print(f"== {name}")
        failed += 1 if module.main(args) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
