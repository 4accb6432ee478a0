"""``metering demo``: the whole pipeline on embedded parts, for a bounded run.

Starts Tansu (unless KAFKA_BOOTSTRAP_SERVERS is set), the webhook receiver, the Faust worker
(a subprocess, as in production), the ClickHouse sink (chdb unless CLICKHOUSE_URL is set) and
the webhook sink, publishes simulated VM usage, waits until every window is stored and
delivered (and its delivery recorded in ClickHouse), and prints per-tenant results read back
from ClickHouse.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

from metering import topics
from metering.config import Settings
from metering.embedded import TansuBroker, free_port
from metering.errors import MeteringError
from metering.topics import ensure_topics

__all__ = ["run_demo"]


def _worker_env(settings: Settings, bootstrap: str, datadir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        TOPIC_PREFIX=settings.topic_prefix,
        TOPIC_PARTITIONS=str(settings.topic_partitions),
        WINDOW_SIZES_SECONDS=json.dumps(settings.window_sizes_seconds),
        ALLOWED_LATENESS_SECONDS=str(settings.allowed_lateness_seconds),
        WORKER_DATADIR=str(datadir),
        WORKER_WEB_PORT=str(free_port()),
    )
    return env


def run_demo(settings: Settings, *, tenants: int = 4, vms: int = 3, minutes: int = 5) -> None:
    """Run the pipeline end to end and print per-tenant window totals and scores."""
    from producers import EnvelopePublisher
    from producers.simulators import VmSimulator
    from sinks.clickhouse import ClickHouseSink, backend_from_settings
    from sinks.receiver import ReceiverServer
    from sinks.signing import generate_secret
    from sinks.webhook import WebhookSink

    root = Path(".demo")
    shutil.rmtree(root, ignore_errors=True)  # each demo run starts from empty state
    root.mkdir()
    settings = settings.model_copy(
        update={"chdb_path": str(root / "chdb"), "idle_close_seconds": 5.0}
    )
    started: list[str] = []
    broker: TansuBroker | None = None
    worker: subprocess.Popen[bytes] | None = None
    receiver = None
    sink_threads: list[threading.Thread] = []
    sinks_: list[ClickHouseSink | WebhookSink] = []
    t0 = time.monotonic()
    pub: EnvelopePublisher | None = None
    ch_sink: ClickHouseSink | None = None
    wh_sink: WebhookSink | None = None
    sink: ClickHouseSink | WebhookSink | None = None
    th: threading.Thread | None = None
    try:
        if settings.kafka_bootstrap_servers:
            bootstrap = settings.kafka_bootstrap_servers
            print(f"kafka       existing cluster at {bootstrap}")
        else:
            broker = TansuBroker(log_path=root / "tansu.log").start()
            bootstrap = broker.bootstrap_servers
            print(f"kafka       embedded Tansu broker on {bootstrap}")
        ensure_topics(settings, bootstrap)

        secret = settings.webhook_secret or generate_secret()
        receiver = ReceiverServer(secret=secret, store_path=str(root / "reports.jsonl"))
        receiver.start()
        print(f"webhook     receiver on {receiver.url} (Standard Webhooks signatures checked)")

        worker = subprocess.Popen(
            [sys.executable, "-m", "metering", "worker", "--loglevel", "warning"],
            env=_worker_env(settings, bootstrap, root / "faust"),
            stdout=open(root / "worker.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        print(f"streams     Faust worker pid {worker.pid} (log: {root / 'worker.log'})")

        backend = backend_from_settings(settings)
        where = "ClickHouse at CLICKHOUSE_URL" if settings.clickhouse_url else f"chdb in {root / 'chdb'}"
        ch_sink = ClickHouseSink.from_settings(settings, bootstrap, backend=backend)
        wh_sink = WebhookSink.from_settings(settings, bootstrap, url=receiver.url, secret=secret)
        for sink in (ch_sink, wh_sink):
            th = threading.Thread(target=sink.run, name=type(sink).__name__, daemon=True)
            th.start()
            sinks_.append(sink)
            sink_threads.append(th)
        print(f"sinks       ClickHouse ({where}) and webhook")

        sim = VmSimulator(tenants=tenants, vms_per_tenant=vms, seed=7)
        pub = EnvelopePublisher(
            bootstrap, settings.topic(topics.SOURCE_TOPICS["vm"]), source="vm",
            producer_name="vm-simulator",
        )
        size_ms = settings.window_sizes_seconds[0] * 1000
        ticks = minutes * 60_000 // sim.interval_ms
        now = int(time.time() * 1000)
        start = now - now % size_ms - ticks * sim.interval_ms
        expected: set[tuple[str, int]] = set()
        samples = 0
        for batch in sim.run(start, ticks, disorder=0.1):
            pub.send(batch)
            samples += len(batch)
            expected.update((r["tenant_id"], r["event_time_ms"] // size_ms) for r in batch)
        # promise the end of the run so the last windows close without waiting for idleness
        end_ms = start + (ticks + 1) * sim.interval_ms + size_ms + settings.allowed_lateness_seconds * 1000
        pub.send_watermark(end_ms, pub.partitions())
        pub.flush()
        print(f"producers   {samples} VM samples from {tenants * vms} VMs of {tenants} tenants, "
              f"{minutes} min of event time, ~10% out of order")

        deadline = time.monotonic() + 180
        stored = recorded = 0
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise MeteringError(f"the stream worker exited ({worker.returncode}); see {root}/worker.log")
            stored = backend.query(
                "SELECT count() FROM (SELECT DISTINCT window_id FROM usage_windows "
                f"WHERE window_end_ms - window_start_ms = {size_ms})")[0][0]
            reports = sum(1 for r in receiver.reports if r["payload"].get("type") == "usage.window"
                          and r["payload"]["window_end_ms"] - r["payload"]["window_start_ms"] == size_ms)
            # the webhook sink's records of those deliveries, through webhook.deliveries
            recorded = _delivery_counts(backend, size_ms)[0]
            if stored >= len(expected) and reports >= len(expected) and recorded >= len(expected):
                break
            time.sleep(1)
        else:
            raise MeteringError(
                f"timed out: {stored}/{len(expected)} windows stored, "
                f"{len(receiver.reports)} webhook reports, {recorded}/{len(expected)} deliveries "
                f"recorded; see {root}/worker.log"
            )
        _print_results(backend, size_ms, reports, time.monotonic() - t0)
    finally:
        for sink in sinks_:
            sink.stop()
        for th in sink_threads:
            th.join(timeout=15)
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if receiver is not None:
            receiver.stop()
        # drop every Kafka client before the broker goes, or they log reconnect failures
        sinks_.clear()
        sink_threads.clear()
        pub = ch_sink = wh_sink = sink = th = None  # noqa: F841
        gc.collect()
        if broker is not None:
            broker.stop()
        del started


def _delivery_counts(backend: object, size_ms: int) -> tuple[int, int]:
    """Windows of ``size_ms`` that ``webhook_deliveries`` records as delivered, and as
    dead-lettered (unique ids: a re-delivery after a crash is recorded again)."""
    from sinks.clickhouse import ClickHouseBackend

    assert isinstance(backend, ClickHouseBackend)
    delivered, dead = backend.query(
        "SELECT uniqExactIf(webhook_id, status IN ('delivered', 'duplicate')), "
        "uniqExactIf(webhook_id, status = 'dead_lettered') FROM webhook_deliveries "
        f"WHERE window_id LIKE '%|{size_ms}'")[0]
    return int(delivered), int(dead)


def _print_results(backend: object, size_ms: int, reports: int, elapsed: float) -> None:
    from sinks.clickhouse import ClickHouseBackend

    assert isinstance(backend, ClickHouseBackend)
    rows = backend.query(
        f"""
        SELECT tenant_id, count() AS windows, sum(sample_count) AS samples, sum(score) AS score,
               min(window_start) AS first_window, max(window_start) AS last_window
        FROM (
            SELECT window_id, any(tenant_id) AS tenant_id, any(sample_count) AS sample_count,
                   any(score) AS score, any(window_start) AS window_start
            FROM usage_windows WHERE window_end_ms - window_start_ms = {size_ms} GROUP BY window_id
        )
        GROUP BY tenant_id ORDER BY tenant_id
        """
    )
    raw = backend.query(
        "SELECT tenant_id, count(), sum(value) FROM usage_records "
        "WHERE metric = 'cpu_time_nanos' GROUP BY tenant_id ORDER BY tenant_id"
    )
    cpu = {t: (n, v) for t, n, v in raw}
    print()
    print(f"per-tenant results read back from ClickHouse (closed {size_ms // 1000} s windows)")
    header = f"{'tenant':<12} {'windows':>7} {'samples':>8} {'cpu seconds':>14} {'billing score':>16}"
    print(header)
    print("-" * len(header))
    for tenant, windows, samples, score, _first, _last in rows:
        cpu_s = Decimal(cpu.get(tenant, (0, 0))[1]) / Decimal(10**9)
        print(f"{tenant:<12} {windows:>7} {samples:>8} {cpu_s:>14.3f} {Decimal(score):>16.3f}")
    print("-" * len(header))
    print(f"webhook reports received for these windows (deduplicated by webhook-id): {reports}")
    delivered, dead = _delivery_counts(backend, size_ms)
    print(f"webhook_deliveries in ClickHouse for these windows: {delivered} delivered, "
          f"{dead} dead-lettered")
    print(f"done in {elapsed:.1f} s")
