"""A cAdvisor-like container simulator: containers of several tenants, scraped every interval.

Each scrape yields the raw series the container producer reads
(``container_cpu_usage_seconds_total``, ``container_memory_usage_bytes``, network and fs
byte counters, ``container_start_time_seconds``), with the awkward parts of real clusters:
counter resets, containers restarting as new series, and missed scrapes that leave gaps.
Output is fully determined by the seed. :meth:`ContainerSimulator.run` feeds the scrapes
through the real :class:`~producers.containers.ContainerCollector`, so the records are the
ones the producer would publish; :func:`render_exposition` gives the ``/metrics`` text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from producers.containers import START_TIME, ContainerCollector, Sample, sample

__all__ = ["ContainerSimulator", "render_exposition"]

_NS = Decimal(10) ** 9
_TYPES = {
    "container_cpu_usage_seconds_total": "counter",
    "container_network_receive_bytes_total": "counter",
    "container_network_transmit_bytes_total": "counter",
    "container_fs_reads_bytes_total": "counter",
    "container_fs_writes_bytes_total": "counter",
    "container_memory_usage_bytes": "gauge",
    START_TIME: "gauge",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_exposition(samples: Iterable[Sample], *, with_timestamps: bool = False) -> str:
    """Prometheus text format (0.0.4) of ``samples``, grouped per series name."""
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    lines: list[str] = []
    for name, group in by_name.items():
        lines.append(f"# TYPE {name} {_TYPES.get(name, 'untyped')}")
        for s in group:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            line = f"{name}{{{labels}}} {s.value}"
            if with_timestamps:
                line += f" {s.ts_ms}"
            lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class _Container:
    tenant: str
    pod: str
    cid: str
    cores: int
    mem_limit: int
    started_ms: int
    cpu: Decimal = Decimal(0)
    memory: int = 0
    rx: int = 0
    tx: int = 0
    reads: int = 0
    writes: int = 0
    missing_until: int = -1

    def labels(self) -> dict[str, str]:
        return {
            "namespace": self.tenant, "pod": self.pod, "container": "app",
            "id": f"/kubepods/{self.pod}/{self.cid}", "name": f"k8s_app_{self.pod}_{self.cid[:8]}",
            "image": "registry.example/app:1.0",
        }


@dataclass
class ContainerSimulator:
    """Deterministic cAdvisor series for ``tenants`` x ``containers_per_tenant`` containers."""

    tenants: int = 3
    containers_per_tenant: int = 2
    interval_ms: int = 15_000
    seed: int = 42
    reset_probability: float = 0.01
    restart_probability: float = 0.01
    miss_probability: float = 0.02
    containers: list[_Container] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._tick = 0
        self._last_ms: int | None = None
        for t in range(self.tenants):
            for c in range(self.containers_per_tenant):
                self.containers.append(self._new(f"tenant-{t:03d}", f"app-{t:03d}-{c:02d}", started_ms=0))

    def _new(self, tenant: str, pod: str, started_ms: int) -> _Container:
        rng = self._rng
        mem_limit = rng.choice([256, 512, 1024, 2048]) * 2**20
        return _Container(
            tenant=tenant, pod=pod, cid=f"{rng.getrandbits(64):016x}", cores=rng.choice([1, 2, 4]),
            mem_limit=mem_limit, started_ms=started_ms, memory=mem_limit // 4,
        )

    def scrape(self, ts_ms: int) -> list[Sample]:
        """Advance every container to ``ts_ms`` and return what a scrape would see."""
        rng = self._rng
        elapsed_ms = self.interval_ms if self._last_ms is None else ts_ms - self._last_ms
        self._last_ms = ts_ms
        self._tick += 1
        out: list[Sample] = []
        for i, c in enumerate(self.containers):
            if c.started_ms == 0:
                c.started_ms = ts_ms - rng.randrange(60_000, 3_600_000)
            if rng.random() < self.restart_probability:  # a new container (new series) replaces it
                started = ts_ms - rng.randrange(0, elapsed_ms)
                c = self.containers[i] = self._new(c.tenant, c.pod, started_ms=started)
                elapsed_ms_c = ts_ms - c.started_ms
            else:
                elapsed_ms_c = elapsed_ms
            used_ns = rng.randrange(0, c.cores * elapsed_ms_c * 10**6 + 1)
            if rng.random() < self.reset_probability:  # counters restart from zero in place
                c.cpu, c.rx, c.tx, c.reads, c.writes = Decimal(0), 0, 0, 0, 0
            c.cpu += Decimal(used_ns) / _NS
            c.memory = max(2**20, min(c.mem_limit, c.memory + rng.randrange(-2**24, 2**24)))
            c.rx += rng.randrange(0, 5_000_000)
            c.tx += rng.randrange(0, 2_000_000)
            c.reads += rng.randrange(0, 1_000_000)
            c.writes += rng.randrange(0, 3_000_000)
            if c.missing_until < self._tick and rng.random() < self.miss_probability:
                c.missing_until = self._tick + rng.randrange(0, 4)
            if self._tick <= c.missing_until:
                continue  # this scrape missed the container
            ts = ts_ms + rng.randrange(0, 50)  # scrape jitter
            base = c.labels()
            out += [
                sample("container_cpu_usage_seconds_total", {**base, "cpu": "total"}, ts, c.cpu),
                sample("container_memory_usage_bytes", base, ts, c.memory),
                sample("container_network_receive_bytes_total", {**base, "interface": "eth0"}, ts, c.rx),
                sample("container_network_transmit_bytes_total", {**base, "interface": "eth0"}, ts, c.tx),
                sample("container_fs_reads_bytes_total", {**base, "device": "/dev/sda"}, ts, c.reads),
                sample("container_fs_writes_bytes_total", {**base, "device": "/dev/sda"}, ts, c.writes),
                sample(START_TIME, base, ts, Decimal(c.started_ms) / 1000),
            ]
        return out

    def run(self, start_ms: int, ticks: int) -> Iterator[list[dict[str, Any]]]:
        """Batches of usage records, as the producer would publish them scrape by scrape."""
        collector = ContainerCollector(
            resolution_seconds=Decimal(self.interval_ms) / 1000, started_at_ms=start_ms)
        ts = start_ms
        for i in range(ticks):
            ts = start_ms + i * self.interval_ms
            batch = collector.collect(self.scrape(ts), ts)
            if batch:
                yield batch
        tail = collector.drain(ts + 3 * self.interval_ms)
        if tail:
            yield tail
