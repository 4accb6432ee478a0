"""A metald-like VM usage simulator: VMs of several tenants send metrics batches.

Each tick every VM reports, for the interval just ended, cpu_time_nanos, disk and network
bytes (deltas) and memory_usage_bytes (a gauge). Output is fully determined by the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producers.publisher import usage_record

__all__ = ["VM_METRICS", "VmSimulator"]

VM_METRICS = (
    "cpu_time_nanos",
    "memory_usage_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "network_rx_bytes",
    "network_tx_bytes",
)


@dataclass
class VmSimulator:
    """Deterministic VM metrics for ``tenants`` x ``vms_per_tenant`` VMs."""

    tenants: int = 3
    vms_per_tenant: int = 2
    interval_ms: int = 10_000
    seed: int = 42

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.vms = [
            (f"tenant-{t:03d}", f"vm-{t:03d}-{v:02d}", rng.choice([1, 2, 4, 8]),
             rng.choice([2, 4, 8, 16]) * 2**30)
            for t in range(self.tenants)
            for v in range(self.vms_per_tenant)
        ]
        self._rng = rng

    def tick(self, end_ms: int) -> list[dict[str, Any]]:
        """Every VM's samples for the interval ending at ``end_ms`` (event time)."""
        rng = self._rng
        out = []
        for tenant, vm, vcpus, mem in self.vms:
            values = {
                "cpu_time_nanos": int(vcpus * self.interval_ms * 1e6 * rng.uniform(0.05, 0.95)),
                "memory_usage_bytes": int(mem * rng.uniform(0.3, 0.9)),
                "disk_read_bytes": rng.randrange(0, 50_000_000),
                "disk_write_bytes": rng.randrange(0, 20_000_000),
                "network_rx_bytes": rng.randrange(0, 80_000_000),
                "network_tx_bytes": rng.randrange(0, 40_000_000),
            }
            for metric, value in values.items():
                out.append(
                    usage_record(
                        event_id=f"vm:{vm}:{metric}:{end_ms}",
                        tenant_id=tenant,
                        source="vm",
                        resource_id=vm,
                        metric=metric,
                        value=value,
                        event_time_ms=end_ms,
                        metadata={"vcpus": str(vcpus)},
                    )
                )
        return out

    def run(
        self, start_ms: int, ticks: int, *, disorder: float = 0.0
    ) -> Iterator[list[dict[str, Any]]]:
        """Batches in send order; with ``disorder`` > 0 a VM's batch is sometimes held back one
        tick, so it arrives after newer samples (out of order, within one interval)."""
        held: list[dict[str, Any]] = []
        for i in range(ticks):
            batch = self.tick(start_ms + (i + 1) * self.interval_ms)
            now: list[dict[str, Any]] = []
            later: list[dict[str, Any]] = []
            for r in batch:
                (later if disorder and self._rng.random() < disorder else now).append(r)
            yield now + held
            held = later
        if held:
            yield held
