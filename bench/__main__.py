"""``python -m bench``: run every benchmark present, each against its own embedded broker."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["bench.client_latency", "bench.stream_throughput", "bench.clickhouse_sink"]


def main() -> int:
    """Run each benchmark module's ``main`` in turn; a missing one is reported, not hidden."""
    failed = 0
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"{name}: not present", file=sys.stderr)
                continue
            raise
        print(f"== {name}")
        failed += 1 if module.main([]) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
