"""A metald-like client driving the VM ingest gateway over HTTP (demo, tests, benchmarks).

Like unkey's metald, each simulated VM has *cumulative* counters (CPU nanoseconds, disk
and network bytes) and a memory gauge; every batch carries ``points_per_batch`` samples
``interval_ms`` apart; VMs are announced with ``NotifyVmStarted`` and retired with
``NotifyVmStopped``, and the host sends ``SendHeartbeat`` with its active VMs. Bodies are
Connect JSON (lowerCamelCase names, int64 as strings, RFC 3339 timestamps with
nanoseconds, as protojson writes them) or binary protobuf (``encoding="proto"``, what
connect-go sends by default), encoded here independently of the gateway's decoder.

Everything is determined by the seed. :attr:`MetaldSimulator.expected` maps each event id
the gateway should publish to ``(tenant, metric, value)``, computed from the simulated
counters (the first sample after a start is billed in full, a reset bills the new value).

    python -m producers.simulators.metald --url http://127.0.0.1:8081 --batches 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

__all__ = ["COUNTERS", "MetaldSimulator", "SimVm", "encode_proto", "rfc3339_ns"]

COUNTERS = ("cpu_time_nanos", "disk_read_bytes", "disk_write_bytes", "network_rx_bytes", "network_tx_bytes")
_NUMBERS = {
    "SendMetricsBatch": {"vm_id": 1, "customer_id": 2, "metrics": 3},
    "VMMetrics": {"timestamp": 1, "cpu_time_nanos": 2, "memory_usage_bytes": 3, "disk_read_bytes": 4,
                  "disk_write_bytes": 5, "network_rx_bytes": 6, "network_tx_bytes": 7},
    "SendHeartbeat": {"instance_id": 1, "active_vms": 2},
    "NotifyVmStarted": {"vm_id": 1, "customer_id": 2, "start_time": 3},
    "NotifyVmStopped": {"vm_id": 1, "stop_time": 2},
    "NotifyPossibleGap": {"vm_id": 1, "last_sent": 2, "resume_time": 3},
}


def rfc3339_ns(ts_ns: int) -> str:
    """``2024-01-31T12:00:00.123456789Z`` for a time in nanoseconds."""
    secs, nanos = divmod(ts_ns, 10**9)
    base = dt.datetime.fromtimestamp(secs, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z" if nanos else f"{base}Z"


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_proto(message_type: str, message: Mapping[str, Any]) -> bytes:
    """Binary protobuf of one billaged request (proto3: zero values are omitted)."""
    numbers = _NUMBERS[message_type]
    out = bytearray()
    for name, value in message.items():
        n = numbers[name]
        if name == "timestamp":
            secs, nanos = divmod(int(value), 10**9)
            ts = (_varint(1 << 3) + _varint(secs) if secs else b"") + (
                _varint(2 << 3) + _varint(nanos) if nanos else b"")
            out += _len_field(n, ts)
        elif name == "metrics":
            for m in value:
                out += _len_field(n, encode_proto("VMMetrics", m))
        elif isinstance(value, list):
            for item in value:
                out += _len_field(n, item.encode())
        elif isinstance(value, str):
            if value:
                out += _len_field(n, value.encode())
        elif value:
            out += _varint(n << 3) + _varint(int(value))
    return bytes(out)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _to_json(message: Mapping[str, Any], camel: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in message.items():
        key = _camel(name) if camel else name
        if name == "timestamp":
            out[key] = rfc3339_ns(int(value))
        elif name == "metrics":
            out[key] = [_to_json(m, camel) for m in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = str(value)  # protojson writes int64 as a string
        else:
            out[key] = value
    return out


@dataclass
class SimVm:
    """One simulated VM and its cumulative counters."""

    vm_id: str
    customer_id: str
    vcpus: int
    memory_bytes: int
    counters: list[int] = field(default_factory=lambda: [0] * len(COUNTERS))
    last_ts_ns: int | None = None
    running: bool = False


@dataclass
class MetaldSimulator:
    """Seeded VMs of ``tenants`` customers reporting to the gateway at ``base_url``."""

    base_url: str
    tenants: int = 2
    vms_per_tenant: int = 2
    interval_ms: int = 1_000
    points_per_batch: int = 5
    seed: int = 7
    instance_id: str = "metald-sim-1"
    encoding: str = "json"  # json | proto
    camel_case: bool = True
    reset_probability: float = 0.0
    service: str = "/billing.v1.BillingService/"
    timeout: float = 30.0
    vms: list[SimVm] = field(init=False)
    expected: dict[str, tuple[str, str, Decimal]] = field(init=False, default_factory=dict)
    responses: list[tuple[str, int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.vms = [
            SimVm(f"ud-{self.seed:02d}{t:03d}{v:02d}", f"customer-{t:03d}", self._rng.choice([1, 2, 4]),
                  self._rng.choice([1, 2, 4, 8]) * 2**30)
            for t in range(self.tenants)
            for v in range(self.vms_per_tenant)
        ]
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout)

    # ---- requests ---------------------------------------------------------------------------

    def call(self, method: str, message: Mapping[str, Any]) -> httpx.Response:
        """POST one Connect unary call; returns the response (any status)."""
        if self.encoding == "proto":
            body = encode_proto(method, message)
            ctype = "application/proto"
        else:
            body = json.dumps(_to_json(message, self.camel_case)).encode()
            ctype = "application/json"
        resp = self._http.post(self.service + method, content=body,
                               headers={"Content-Type": ctype, "Connect-Protocol-Version": "1"})
        self.responses.append((method, resp.status_code))
        return resp

    def start(self, vm: SimVm, ts_ns: int) -> httpx.Response:
        """NotifyVmStarted: counters begin at zero."""
        vm.counters = [0] * len(COUNTERS)
        vm.last_ts_ns, vm.running = ts_ns, True
        self.expected[f"vm:{vm.vm_id}:vm_started:{ts_ns}"] = (vm.customer_id, "vm_started", Decimal(1))
        return self.call("NotifyVmStarted", {"vm_id": vm.vm_id, "customer_id": vm.customer_id,
                                             "start_time": ts_ns})

    def stop(self, vm: SimVm, ts_ns: int) -> httpx.Response:
        """NotifyVmStopped."""
        vm.running = False
        self.expected[f"vm:{vm.vm_id}:vm_stopped:{ts_ns}"] = (vm.customer_id, "vm_stopped", Decimal(1))
        return self.call("NotifyVmStopped", {"vm_id": vm.vm_id, "stop_time": ts_ns})

    def heartbeat(self) -> httpx.Response:
        """SendHeartbeat with every running VM."""
        return self.call("SendHeartbeat", {"instance_id": self.instance_id,
                                           "active_vms": [v.vm_id for v in self.vms if v.running]})

    def possible_gap(self, vm: SimVm, last_sent_ns: int, resume_ns: int) -> httpx.Response:
        """NotifyPossibleGap."""
        self.expected[f"vm:{vm.vm_id}:vm_possible_gap:{last_sent_ns}"] = (
            vm.customer_id, "vm_possible_gap", Decimal(resume_ns - last_sent_ns) / Decimal(10**9))
        return self.call("NotifyPossibleGap", {"vm_id": vm.vm_id, "last_sent": last_sent_ns,
                                               "resume_time": resume_ns})

    def samples(self, vm: SimVm, first_ts_ns: int) -> list[dict[str, Any]]:
        """``points_per_batch`` cumulative samples from ``first_ts_ns``, advancing the counters."""
        rng = self._rng
        out = []
        step = self.interval_ms * 1_000_000
        for i in range(self.points_per_batch):
            ts = first_ts_ns + i * step
            reset = self.reset_probability and rng.random() < self.reset_probability
            before = [0] * len(COUNTERS) if reset else list(vm.counters)
            growth = [
                int(vm.vcpus * step * rng.uniform(0.05, 0.95)),
                rng.randrange(0, 5_000_000), rng.randrange(0, 2_000_000),
                rng.randrange(0, 8_000_000), rng.randrange(0, 4_000_000),
            ]
            vm.counters = [b + g for b, g in zip(before, growth, strict=True)]
            memory = int(vm.memory_bytes * rng.uniform(0.3, 0.9))
            out.append({"timestamp": ts, "cpu_time_nanos": vm.counters[0], "memory_usage_bytes": memory,
                        "disk_read_bytes": vm.counters[1], "disk_write_bytes": vm.counters[2],
                        "network_rx_bytes": vm.counters[3], "network_tx_bytes": vm.counters[4]})
            self.expected[f"vm:{vm.vm_id}:memory_usage_bytes:{ts}"] = (
                vm.customer_id, "memory_usage_bytes", Decimal(memory))
            # the delta the gateway must publish: since the last sample, or the whole new
            # value when the counter was reset (a started VM's baseline is zero)
            if vm.last_ts_ns is not None:
                for name, value, growth_value in zip(COUNTERS, vm.counters, growth, strict=True):
                    self.expected[f"vm:{vm.vm_id}:{name}:{ts}"] = (
                        vm.customer_id, name, Decimal(value if reset else growth_value))
            vm.last_ts_ns = ts
        return out

    def send_batch(self, vm: SimVm, first_ts_ns: int) -> httpx.Response:
        """SendMetricsBatch of fresh samples."""
        return self.call("SendMetricsBatch", {"vm_id": vm.vm_id, "customer_id": vm.customer_id,
                                              "metrics": self.samples(vm, first_ts_ns)})

    # ---- a whole run ------------------------------------------------------------------------

    def run(self, start_ns: int, batches: int, *, stop_at_end: bool = True) -> dict[str, Any]:
        """Start every VM, send ``batches`` batches per VM with a heartbeat after each round,
        stop the VMs; returns counts of requests per status."""
        for vm in self.vms:
            self.start(vm, start_ns)
        span = self.points_per_batch * self.interval_ms * 1_000_000
        for b in range(batches):
            first = start_ns + self.interval_ms * 1_000_000 + b * span
            for vm in self.vms:
                self.send_batch(vm, first)
            self.heartbeat()
        if stop_at_end:
            end = start_ns + self.interval_ms * 1_000_000 + batches * span
            for vm in self.vms:
                self.stop(vm, end)
        statuses: dict[int, int] = {}
        for _, status in self.responses:
            statuses[status] = statuses.get(status, 0) + 1
        return {"requests": len(self.responses), "statuses": statuses, "expected_records": len(self.expected)}

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()

    def __enter__(self) -> MetaldSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Drive a running gateway: ``python -m producers.simulators.metald --url ...``."""
    p = argparse.ArgumentParser(prog="metald-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8081")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--vms", type=int, default=2, help="VMs per tenant")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--points", type=int, default=5, help="samples per batch")
    p.add_argument("--interval-ms", type=int, default=1_000)
    p.add_argument("--encoding", choices=["json", "proto"], default="json")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    sim = MetaldSimulator(args.url, tenants=args.tenants, vms_per_tenant=args.vms,
                          interval_ms=args.interval_ms, points_per_batch=args.points,
                          seed=args.seed, encoding=args.encoding)
    span_ns = (args.batches * args.points + 1) * args.interval_ms * 1_000_000
    start = time.time_ns() - span_ns
    t0 = time.perf_counter()
    with sim:
        result = sim.run(start, args.batches)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(result))
    return 0 if set(result["statuses"]) <= {200} else 1


if __name__ == "__main__":
    sys.exit(main())
