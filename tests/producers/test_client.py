"""The metering client library and ``POST /track`` against a real Tansu broker, and the
once-only billing of a repeated unique key through the real stream worker into ClickHouse.

Nothing is mocked: an unreachable Kafka is a free port nobody listens on.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from clickhouse_driver import Client
from prometheus_client import CollectorRegistry

from metering.config import Settings
from metering.embedded import ClickHouseServer, free_port
from producers.client import BufferFullError, InvalidUsageError, MeteringClient
from producers.errors import PublishError
from producers.track_server import TrackServer
from tests.producers.kafka_reader import consume
from tests.workers import WorkerProcess

pytestmark = pytest.mark.integration


def sample(registry: CollectorRegistry, name: str, status: str, amount_type: str) -> float:
    return registry.get_sample_value(f"billing_client_{name}_total",
                                     {"status": status, "amount_type": amount_type}) or 0.0


def unreachable() -> str:
    return f"127.0.0.1:{free_port()}"


NOW_MS = int(time.time() * 1000) - 60_000
RFC_NOW = dt.datetime.fromtimestamp(NOW_MS // 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the library ----------------------------------------------------------------------------


def test_one_record_per_amount_type_with_exact_values(settings: Settings) -> None:
    reg = CollectorRegistry()
    with MeteringClient(settings=settings, tenant_id="acme", registry=reg, flush_interval=0.05) as client:
        assert client.topic == settings.topic("usage.client")
        n = client.add_amounts("req-1", "api-7", NOW_MS,
                               {"api_calls": 3, "egress_bytes": 10**20, "gpu_seconds": "0.000000001"},
                               {"region": "eu-west-1"})
        assert n == 3
        # another tenant per call; an aware datetime and an RFC 3339 string as event times
        when = dt.datetime.fromtimestamp(NOW_MS / 1000, tz=dt.UTC)
        client.add_amounts("req-2", "api-7", when, {"api_calls": Decimal("2")},
                           {"tenant_id": "globex", "plan": "pro"})
        local = dt.datetime.fromtimestamp(NOW_MS // 1000, tz=dt.timezone(dt.timedelta(hours=1)))
        client.add_amounts("req-3", "batch-1", local.strftime("%Y-%m-%dT%H:%M:%S.250+01:00"),
                           {"cpu_seconds": "12.5"})
        client.flush(20)
        assert client.pending == 0
    got = {r["event_id"]: (key, r) for key, r in consume(settings.kafka_bootstrap_servers or "",
                                                          settings.topic("usage.client"), 5)}
    assert set(got) == {"req-1:api_calls", "req-1:egress_bytes", "req-1:gpu_seconds", "req-2:api_calls",
                        "req-3:cpu_seconds"}
    key, r = got["req-1:gpu_seconds"]
    assert key == b"acme"
    assert r == {"event_id": "req-1:gpu_seconds", "tenant_id": "acme", "source": "client",
                 "resource_id": "api-7", "metric": "gpu_seconds", "value": Decimal("0.000000001"),
                 "event_time_ms": NOW_MS, "metadata": {"region": "eu-west-1"}}
    assert got["req-1:egress_bytes"][1]["value"] == Decimal(10**20)
    key, r = got["req-2:api_calls"]
    assert key == b"globex" and r["tenant_id"] == "globex"
    assert r["metadata"] == {"plan": "pro"} and r["event_time_ms"] == NOW_MS
    r = got["req-3:cpu_seconds"][1]
    assert r["event_time_ms"] == NOW_MS // 1000 * 1000 + 250
    assert r["value"] == Decimal("12.5") and r["tenant_id"] == "acme"
    assert sample(reg, "events", "published", "api_calls") == 2
    assert sample(reg, "amounts", "published", "api_calls") == 5
    assert sample(reg, "events", "buffered", "egress_bytes") == 1
    assert sample(reg, "amounts", "published", "egress_bytes") == 1e20
    stats = client.stats()
    assert stats["buffered"] == stats["published"] == 5 and stats["failed"] == stats["rejected"] == 0
    exact = Context(prec=60)  # the default 28 digits would round this sum
    total = exact.add(exact.add(Decimal("12.5"), 5 + 10**20), Decimal("0.000000001"))
    assert stats["amounts"]["published"] == str(total) == "100000000000000000017.500000001"


def test_invalid_calls_raise_naming_every_bad_field_and_buffer_nothing() -> None:
    reg = CollectorRegistry()
    client = MeteringClient(unreachable(), registry=reg, publisher_config={"log_level": 0})
    try:
        with pytest.raises(InvalidUsageError) as info:
            bad: Any = {"cpu": 0.25, "io": "-1", "net": "1.0000000001", "ok": 1, "bad": "abc", "neg": -3}
            client.add_amounts("", 5, 1.5, bad, {"k": 1})  # type: ignore[arg-type, dict-item]
        fields = {f.field for f in info.value.fields}
        assert fields == {"unique_key", "instance_id", "timestamp", "amounts.cpu", "amounts.io",
                          "amounts.net", "amounts.bad", "amounts.neg", "metadata.k", "tenant_id"}
        assert "floats are inexact" in dict(info.value.fields)["amounts.cpu"]
        with pytest.raises(InvalidUsageError) as info:
            client.add_amounts("k", "i", dt.datetime(2024, 1, 1), {}, {"tenant_id": "t"})
        assert {f.field for f in info.value.fields} == {"timestamp", "amounts"}
        # outside the stream stage's bounds: refused now rather than dead-lettered later
        for ts, why in ((NOW_MS - 36 * 86_400_000, "35 days"), (NOW_MS + 3_600_000, "future")):
            with pytest.raises(InvalidUsageError, match=why):
                client.add_amounts("k", "i", ts, {"ok": 1}, {"tenant_id": "t"})
        assert client.pending == 0
        stats = client.stats()
        assert stats["buffered"] == 0 and stats["rejected"] == 9  # one per amount type named, +1 empty
        assert sample(reg, "events", "rejected", "ok") == 3
    finally:
        with pytest.raises(PublishError) if client.pending else _nothing():
            client.close(1)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_full_buffer_blocks_then_raises_or_raises_at_once_and_nothing_is_dropped_silently() -> None:
    reg = CollectorRegistry()
    blocking = MeteringClient(unreachable(), tenant_id="t", registry=reg, max_buffer=5, block_timeout=0.4,
                              full_policy="block", publisher_config={"log_level": 0})
    raising = MeteringClient(unreachable(), tenant_id="t", registry=reg, max_buffer=2, full_policy="raise",
                             publisher_config={"log_level": 0})
    try:
        assert blocking.add_amounts("a", "i", NOW_MS, {"x": 1, "y": 2, "z": 3}) == 3
        assert blocking.add_amounts("b", "i", NOW_MS, {"x": 4, "y": 5}) == 2
        began = time.monotonic()
        with pytest.raises(BufferFullError, match="after waiting 0.4s"):
            blocking.add_amounts("c", "i", NOW_MS, {"x": 6})
        assert 0.35 < time.monotonic() - began < 2.0
        with pytest.raises(BufferFullError):
            blocking.add_amounts("d", "i", NOW_MS, {"x": 1, "y": 1, "z": 1, "w": 1, "v": 1, "u": 1})  # > max
        assert raising.add_amounts("e", "i", NOW_MS, {"x": 7, "y": 8}) == 2
        began = time.monotonic()
        with pytest.raises(BufferFullError):
            raising.add_amounts("f", "i", NOW_MS, {"x": 9})
        assert time.monotonic() - began < 0.1
        with pytest.raises(BufferFullError):  # try_add_amounts never blocks, whatever the policy
            blocking.try_add_amounts("g", "i", NOW_MS, {"x": 1})
    finally:
        for client in (blocking, raising):
            with pytest.raises(PublishError, match="counted as failed"):
                client.close(timeout=0.5)  # Kafka never answered: pending records fail, loudly
    b, r = blocking.stats(), raising.stats()
    assert (b["buffered"], b["published"], b["failed"], b["pending"]) == (5, 0, 5, 0)
    assert b["rejected"] == 1 + 6 + 1
    assert (r["buffered"], r["failed"], r["rejected"]) == (2, 2, 1)
    # the Prometheus view adds up: every accepted record is published or failed
    for kind in ("x", "y", "z"):
        assert sample(reg, "events", "buffered", kind) == sample(reg, "events", "failed", kind)
    assert sample(reg, "amounts", "failed", "x") == 1 + 4 + 7
    assert sample(reg, "amounts", "rejected", "x") == 6 + 1 + 9 + 1


def test_a_blocked_caller_proceeds_as_kafka_acknowledges(settings: Settings) -> None:
    reg = CollectorRegistry()
    with MeteringClient(settings=settings, tenant_id="t", registry=reg, max_buffer=10, flush_interval=0.01,
                        flush_size=5, block_timeout=20) as client:
        for i in range(150):
            client.add_amounts(f"k{i}", "i", NOW_MS, {"n": 1})
        client.flush(20)
        stats = client.stats()
    assert (stats["buffered"], stats["published"], stats["rejected"], stats["failed"]) == (150, 150, 0, 0)
    assert sample(reg, "amounts", "published", "n") == 150
    assert len({r["event_id"] for _, r in consume(settings.kafka_bootstrap_servers or "",
                                                     settings.topic("usage.client"), 150)}) == 150


# ---- POST /track ----------------------------------------------------------------------------


def test_track_endpoint_buffers_names_bad_fields_and_sheds_load(settings: Settings) -> None:
    reg = CollectorRegistry()
    client = MeteringClient(settings=settings, registry=reg, flush_interval=0.05)  # no default tenant
    full = MeteringClient(unreachable(), tenant_id="t", registry=CollectorRegistry(), max_buffer=1,
                          full_policy="block", block_timeout=30, publisher_config={"log_level": 0})
    with TrackServer(client, registry=reg) as server, TrackServer(full, retry_after_seconds=3) as busy:
        r = httpx.post(server.url, json={
            "unique_key": "t-1", "instance_id": "edge-3", "timestamp": RFC_NOW,
            "amounts": {"requests": 12, "gb": "0.5"}, "metadata": {"tenant_id": "initech", "pop": "fra"},
            "comment": "ignored"})
        assert r.status_code == 202, r.text
        assert r.json() == {"status": "buffered", "records": 2, "event_ids": ["t-1:requests", "t-1:gb"]}
        r = httpx.post(server.url, json={"unique_key": "t-2", "instance_id": "edge-3", "timestamp": NOW_MS,
                                         "amounts": {"requests": 1}, "metadata": {"tenant_id": "initech"}})
        assert r.status_code == 202
        r = httpx.post(server.url, json={"unique_key": 5, "timestamp": "noon",
                                         "amounts": {"a": 1.5, "b": "-2", "c": True}, "metadata": {"k": 1}})
        assert r.status_code == 400
        err = r.json()
        assert err["error"] == "invalid_argument"
        assert {f["field"] for f in err["fields"]} == {
            "unique_key", "instance_id", "timestamp", "amounts.a", "amounts.b", "amounts.c", "metadata.k",
            "tenant_id"}
        assert httpx.post(server.url, content=b"[1, 2", headers={"Content-Type": "application/json"}
                          ).json()["fields"][0]["field"] == "body"
        assert httpx.post(server.url, json=[1]).status_code == 400
        # a full buffer: 503 with Retry-After, answered at once although the client's policy blocks
        ok = {"unique_key": "b-1", "instance_id": "i", "timestamp": NOW_MS, "amounts": {"x": 1}}
        assert httpx.post(busy.url, json=ok).status_code == 202
        began = time.monotonic()
        r = httpx.post(busy.url, json={**ok, "unique_key": "b-2"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "3"
        assert time.monotonic() - began < 1.0
        client.flush(20)
        health = httpx.get(server.url.replace("/track", "/health")).json()
        assert health["status"] == "ok" and health["pending"] == 0
        metrics = httpx.get(server.url.replace("/track", "/metrics")).text
        assert 'billing_client_events_total{amount_type="requests",status="published"} 2.0' in metrics
        stats = httpx.get(server.url.replace("/track", "/stats")).json()
        assert stats["server"] == {"requests": 5, "accepted": 2, "invalid": 3, "full": 0}
    client.close()
    with pytest.raises(PublishError):
        full.close(timeout=0.3)
    got = {r["event_id"]: (k, r) for k, r in consume(settings.kafka_bootstrap_servers or "",
                                                      settings.topic("usage.client"), 3)}
    assert set(got) == {"t-1:requests", "t-1:gb", "t-2:requests"}
    key, rec = got["t-1:gb"]
    assert key == b"initech" and rec["value"] == Decimal("0.5") and rec["metadata"] == {"pop": "fra"}
    assert rec["resource_id"] == "edge-3" and rec["event_time_ms"] == NOW_MS // 1000 * 1000


# ---- once-only billing, end to end into ClickHouse ----------------------------------------------


@pytest.fixture
def ch_settings(settings: Settings, clickhouse_server: ClickHouseServer) -> Iterator[Settings]:
    db = f"client_{uuid.uuid4().hex[:8]}"
    admin = Client("127.0.0.1", port=clickhouse_server.tcp_port)
    admin.execute(f"CREATE DATABASE {db}")
    yield settings.model_copy(update={
        "clickhouse_url": f"clickhouse://default:@127.0.0.1:{clickhouse_server.tcp_port}/{db}",
        "window_sizes_seconds": [10],
        "allowed_lateness_seconds": 1,
        "idle_close_seconds": 2.0,
        "sink_flush_seconds": 0.3,
    })
    admin.execute(f"DROP DATABASE IF EXISTS {db}")
    admin.disconnect()


def test_the_same_unique_key_sent_three_times_is_billed_once_in_clickhouse(
    ch_settings: Settings, tmp_path: Path
) -> None:
    from sinks.clickhouse import ClickHouseSink, NativeBackend

    s = ch_settings
    bootstrap = s.kafka_bootstrap_servers or ""
    worker = WorkerProcess(s, tmp_path).start()
    backend = NativeBackend(s.clickhouse_url or "")
    sink = ClickHouseSink.from_settings(s, bootstrap, backend=backend,
                                        group_id=f"{s.topic_prefix}ch-{uuid.uuid4().hex[:6]}")
    sink_thread = threading.Thread(target=sink.run, name="clickhouse-sink", daemon=True)
    sink_thread.start()
    client = MeteringClient(settings=s, tenant_id="tenant-a", registry=CollectorRegistry(),
                            flush_interval=0.05)
    server = TrackServer(client).start()
    try:
        ts = NOW_MS - NOW_MS % 10_000 + 2_000
        amounts: dict[str, int | str] = {"api_calls": 5, "gpu_seconds": "1.25"}
        # the first try, a library retry (another message), and an HTTP retry of the same key
        client.add_amounts("order-1", "inst-1", ts, amounts)
        client.flush(20)
        client.add_amounts("order-1", "inst-1", ts, amounts)
        client.flush(20)
        r = httpx.post(server.url, json={"unique_key": "order-1", "instance_id": "inst-1", "timestamp": ts,
                                         "amounts": amounts})
        assert r.status_code == 202
        client.add_amounts("order-2", "inst-1", ts + 1_000, {"api_calls": 2})
        client.flush(20)
        assert client.stats()["published"] == 2 + 2 + 2 + 1  # Kafka took every copy

        def windows() -> list[tuple[Any, ...]]:
            return backend.query(
                "SELECT window_start_ms, metrics, metric_values, sample_count FROM usage_windows "
                "WHERE tenant_id = 'tenant-a'")

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not windows():
            assert worker.alive(), (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # a duplicate, had one got through, would be stored by now
        rows = backend.query("SELECT event_id, value FROM usage_records WHERE tenant_id = 'tenant-a' "
                             "ORDER BY event_id")  # no FINAL: the stream stage itself deduplicated
        assert [(e, Decimal(v)) for e, v in rows] == [
            ("order-1:api_calls", Decimal(5)), ("order-1:gpu_seconds", Decimal("1.25")),
            ("order-2:api_calls", Decimal(2))]
        # ClickHouse's ReplacingMergeTree could hide copies by merging; the normalized topic
        # and the window totals cannot: the stream stage dropped the repeats itself
        normalized = [r["event_id"] for _, r in consume(bootstrap, s.topic("usage.records"), 3)]
        assert sorted(normalized) == ["order-1:api_calls", "order-1:gpu_seconds", "order-2:api_calls"]
        (start, metrics, values, samples), = windows()
        assert start == ts - 2_000
        totals = {m: Decimal(v) for m, v in zip(metrics, values, strict=True)}
        assert totals == {"api_calls": Decimal(7), "gpu_seconds": Decimal("1.25")}
        assert samples == 3
    finally:
        server.stop()
        client.close()
        sink.stop()
        sink_thread.join(30)
        worker.stop()
        backend.close()
