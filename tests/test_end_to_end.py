"""Issue 2 acceptance: VM samples flow through the real broker, the real Faust worker (a
subprocess, as in production), the ClickHouse sink on Debian's clickhouse-server over the
native protocol, and the webhook sink into the receiver.

Expected window totals and scores are computed here independently, from the samples the
test itself produced, with the formula written out longhand.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_driver import Client

from metering import topics
from metering.config import Settings
from metering.embedded import ClickHouseServer, TansuBroker
from producers import EnvelopePublisher
from producers.simulators import VmSimulator
from tests.workers import WorkerProcess

pytestmark = pytest.mark.integration

WINDOW_S = 10
LATENESS_S = 5


@pytest.fixture
def e2e_settings(settings: Settings, clickhouse_server: ClickHouseServer) -> Settings:
    db = f"e2e_{uuid.uuid4().hex[:8]}"
    Client("127.0.0.1", port=clickhouse_server.tcp_port).execute(f"CREATE DATABASE {db}")
    return settings.model_copy(update={
        "clickhouse_url": f"clickhouse://default:@127.0.0.1:{clickhouse_server.tcp_port}/{db}",
        "window_sizes_seconds": [WINDOW_S],
        "allowed_lateness_seconds": LATENESS_S,
        "sink_flush_seconds": 0.5,
    })


@pytest.fixture
def worker(e2e_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(e2e_settings.model_copy(update={"idle_close_seconds": 3.0}), tmp_path).start()
    yield w
    w.stop()


def expected_windows(samples: list[dict]) -> dict[tuple[str, int], dict]:
    """Recompute every tenant-window from the raw samples, longhand."""
    size = WINDOW_S * 1000
    sums: dict[tuple[str, int], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    mem: dict[tuple[str, int], dict[str, list[Decimal]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for r in samples:
        key = (r["tenant_id"], r["event_time_ms"] // size * size)
        counts[key] += 1
        if r["metric"] == "memory_usage_bytes":
            mem[key][r["resource_id"]].append(r["value"])
        else:
            sums[key][r["metric"]] += r["value"]
    out = {}
    for key in counts:
        memory = sum((sum(v) / len(v) for v in mem[key].values()), Decimal(0))
        s = sums[key]
        score = (s["cpu_time_nanos"] / Decimal(10**9) * Decimal("1.0")
                 + memory / Decimal(10**9) * Decimal("0.5")
                 + (s["disk_read_bytes"] + s["disk_write_bytes"]) / Decimal(10**6) * Decimal("0.3"))
        out[key] = {
            "samples": counts[key],
            "cpu_time_nanos": s["cpu_time_nanos"],
            "memory_usage_bytes": memory.quantize(Decimal("1e-9")),
            "network_rx_bytes": s["network_rx_bytes"],
            "score": score.quantize(Decimal("1e-9")),
        }
    return out


def test_vm_usage_end_to_end(
    e2e_settings: Settings, broker: TansuBroker, worker: WorkerProcess
) -> None:
    from sinks.clickhouse import ClickHouseSink, backend_from_settings
    from sinks.receiver import ReceiverServer
    from sinks.signing import generate_secret
    from sinks.webhook import WebhookSink

    s = e2e_settings
    secret = generate_secret()
    receiver = ReceiverServer(secret=secret)
    receiver.start()
    backend = backend_from_settings(s)
    ch_sink = ClickHouseSink.from_settings(s, broker.bootstrap_servers, backend=backend)
    wh_sink = WebhookSink.from_settings(s, broker.bootstrap_servers, url=receiver.url, secret=secret)
    threads = [threading.Thread(target=k.run, daemon=True) for k in (ch_sink, wh_sink)]
    for t in threads:
        t.start()
    try:
        sim = VmSimulator(tenants=3, vms_per_tenant=2, interval_ms=2_000, seed=11)
        pub = EnvelopePublisher(broker.bootstrap_servers,
                                s.topic(topics.SOURCE_TOPICS["vm"]), source="vm")
        size = WINDOW_S * 1000
        now = int(time.time() * 1000)
        start = now - now % size - 60_000
        samples: list[dict] = []
        # 30 ticks of 2 s; about a fifth of the samples arrive one tick late (within lateness)
        for batch in sim.run(start, 30, disorder=0.2):
            pub.send(batch)
            samples.extend(batch)
        pub.send_watermark(start + 32 * 2_000 + size + LATENESS_S * 1000, pub.partitions())
        pub.flush()
        expected = expected_windows(samples)
        assert len(expected) >= 3 * 6

        deadline = time.monotonic() + 120
        rows: list[tuple] = []
        while time.monotonic() < deadline:
            assert worker.alive(), "the stream worker died"
            rows = backend.query(
                "SELECT tenant_id, window_start_ms, sample_count, metrics, metric_values, score "
                "FROM usage_windows ORDER BY tenant_id, window_start_ms")
            if len(rows) >= len(expected) and len(receiver.reports) >= len(expected):
                break
            time.sleep(1)
        time.sleep(2)  # anything extra (a duplicate) would show up now
        rows = backend.query(
            "SELECT tenant_id, window_start_ms, sample_count, metrics, metric_values, score "
            "FROM usage_windows ORDER BY tenant_id, window_start_ms")

        got = {}
        for tenant, ws, n, metrics, values, score in rows:
            assert (tenant, ws) not in got, f"window {tenant} {ws} stored twice"
            totals = {m: Decimal(v) for m, v in zip(metrics, values, strict=True)}
            got[(tenant, ws)] = {
                "samples": n,
                "cpu_time_nanos": totals["cpu_time_nanos"],
                "memory_usage_bytes": totals["memory_usage_bytes"],
                "network_rx_bytes": totals["network_rx_bytes"],
                "score": Decimal(score),
            }
        assert got == expected

        # raw audit rows: every sample exactly once
        (n_raw, cpu_raw), = backend.query(
            "SELECT count(), sum(value) FROM usage_records WHERE metric = 'cpu_time_nanos'")
        assert n_raw == sum(1 for r in samples if r["metric"] == "cpu_time_nanos")
        assert Decimal(cpu_raw) == sum(r["value"] for r in samples if r["metric"] == "cpu_time_nanos")

        # the receiver got exactly one report per tenant-window
        ids = [r["payload"]["id"] for r in receiver.reports]
        assert len(ids) == len(set(ids)) == len(expected)
        assert set(ids) == {f"{t}|{ws}|{size}" for t, ws in expected}
    finally:
        for k in (ch_sink, wh_sink):
            k.stop()
        for t in threads:
            t.join(timeout=20)
        receiver.stop()
        backend.close()
