"""The VM ingest gateway against a real Tansu broker: every endpoint, exact deltas read back
from Kafka, invalid bodies, binary protobuf, and broker outages: paused (SIGSTOP) before a
request, and killed (SIGKILL) while a request waits for Kafka's acknowledgement.

Nothing is mocked: records are consumed from ``usage.vm`` and decoded with the envelope codec.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from metering.config import Settings, load_settings
from metering.embedded import TansuBroker
from metering.topics import ensure_topics
from producers.simulators.metald import MetaldSimulator, rfc3339_ns
from producers.vm_gateway import VmGateway
from tests.producers.kafka_reader import consume

pytestmark = pytest.mark.integration

RPC = "/billing.v1.BillingService/"
S = 10**9  # one second in nanoseconds


# ---- helpers -------------------------------------------------------------------------------


def by_id(pairs: list[tuple[bytes, dict[str, Any]]]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Records by event id; every copy of an id must be identical."""
    out: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for key, r in pairs:
        if r["event_id"] in out:
            assert out[r["event_id"]] == (key, r), f"two different records for {r['event_id']}"
        out[r["event_id"]] = (key, r)
    return out


def post(gw: VmGateway, method: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(gw.url + RPC + method, json=body, timeout=30, **kwargs)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[VmGateway]:
    gw = VmGateway(settings.kafka_bootstrap_servers or "", settings.topic("usage.vm"), ack_timeout=15)
    gw.start()
    yield gw
    gw.stop()


def now_s() -> int:
    return time.time_ns() // S * S - 600 * S  # whole seconds, ten minutes ago


# ---- metrics batches -----------------------------------------------------------------------


def test_cumulative_counters_become_exact_deltas_and_retries_add_nothing(
    gateway: VmGateway, settings: Settings
) -> None:
    t0 = now_s()
    big = 9_223_372_036_000_000_000  # near int64's top: exactness, not float
    r = post(gateway, "NotifyVmStarted", {"vmId": "vm-a", "customerId": "cust-1", "startTime": str(t0)})
    assert r.status_code == 200 and r.json() == {"success": True}
    # camelCase names, int64 as strings, RFC 3339 with nanoseconds (protojson's own output)
    batch1 = {"vmId": "vm-a", "customerId": "cust-1", "metrics": [
        {"timestamp": rfc3339_ns(t0 + S + 5), "cpuTimeNanos": "1000", "memoryUsageBytes": "100",
         "diskReadBytes": "10", "diskWriteBytes": "7", "networkRxBytes": str(big)},
        {"timestamp": rfc3339_ns(t0 + 2 * S), "cpuTimeNanos": "3500", "memoryUsageBytes": "200",
         "diskReadBytes": "10", "diskWriteBytes": "9", "networkRxBytes": str(big + 123_456_789),
         "networkTxBytes": "5"},
    ]}
    r = post(gateway, "SendMetricsBatch", batch1)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "message": "processed 2 metrics"}
    # proto names, JSON numbers; the CPU counter was reset (a VM reboot) at t0+3s
    batch2 = {"vm_id": "vm-a", "customer_id": "cust-1", "metrics": [
        {"timestamp": rfc3339_ns(t0 + 4 * S), "cpu_time_nanos": 900, "memory_usage_bytes": 50,
         "disk_read_bytes": 11, "disk_write_bytes": 9, "network_rx_bytes": big + 123_456_790,
         "network_tx_bytes": 5},
        {"timestamp": rfc3339_ns(t0 + 3 * S), "cpu_time_nanos": 700, "memory_usage_bytes": 300,
         "disk_read_bytes": 10, "disk_write_bytes": 9, "network_rx_bytes": big + 123_456_789,
         "network_tx_bytes": 5},  # out of order inside the batch: sorted by time
    ]}
    assert post(gateway, "SendMetricsBatch", batch2).status_code == 200
    retry = post(gateway, "SendMetricsBatch", batch2)  # metald retrying after a lost answer
    assert retry.status_code == 200
    assert retry.json() == {"success": True, "message": "processed 0 metrics; 2 already recorded"}

    expected: dict[tuple[str, int], tuple[int, dict[str, str]]] = {  # (metric, ts) -> (value, metadata)
        ("vm_started", t0): (1, {}),
        ("memory_usage_bytes", t0 + S + 5): (100, {}),
        ("memory_usage_bytes", t0 + 2 * S): (200, {}),
        ("memory_usage_bytes", t0 + 3 * S): (300, {}),
        ("memory_usage_bytes", t0 + 4 * S): (50, {}),
    }
    counters = {  # the started VM's counters begin at zero: the first sample bills in full
        t0 + S + 5: (1000, 10, 7, big, 0),
        t0 + 2 * S: (2500, 0, 2, 123_456_789, 5),
        t0 + 3 * S: (700, 0, 0, 0, 0),  # cpu reset: 700 is all new
        t0 + 4 * S: (200, 1, 0, 1, 0),
    }
    names = ("cpu_time_nanos", "disk_read_bytes", "disk_write_bytes", "network_rx_bytes", "network_tx_bytes")
    prev = t0
    for ts, values in counters.items():
        for name, v in zip(names, values, strict=True):
            meta = {"interval_ms": str((ts - prev) // 10**6)}
            if name == "cpu_time_nanos" and ts == t0 + 3 * S:
                meta["reset"] = "true"
            expected[(name, ts)] = (v, meta)
        prev = ts
    got = by_id(consume(gateway_bootstrap(settings), settings.topic("usage.vm"), len(expected)))
    assert len(got) == len(expected)
    for (metric, ts), (value, meta) in expected.items():
        key, rec = got[f"vm:vm-a:{metric}:{ts}"]
        assert key == b"cust-1"
        assert (rec["tenant_id"], rec["source"], rec["resource_id"], rec["metric"]) == (
            "cust-1", "vm", "vm-a", metric)
        assert rec["value"] == Decimal(value), (metric, ts)
        assert rec["event_time_ms"] == ts // 10**6
        assert rec["metadata"] == meta, (metric, ts)
    stats = httpx.get(gateway.url + "/stats").json()
    assert stats["published"] == len(expected)
    assert (stats["batches"], stats["samples"], stats["stale_samples"], stats["counter_resets"]) == (
        3, 6, 2, 1)
    assert stats["active_vms"] == 1 and stats["rejected"] == stats["errors"] == 0


def gateway_bootstrap(settings: Settings) -> str:
    return settings.kafka_bootstrap_servers or ""


def test_first_batch_of_a_vm_unknown_since_a_restart_only_sets_the_baseline(
    gateway: VmGateway, settings: Settings
) -> None:
    t0 = now_s()
    points = [{"timestamp": rfc3339_ns(t0 + i * S), "cpuTimeNanos": str(10**12 + i * 1000),
               "memoryUsageBytes": str(1 + i), "diskReadBytes": str(5 * i)} for i in range(3)]
    r = post(gateway, "SendMetricsBatch", {"vmId": "vm-b", "customerId": "cust-9", "metrics": points})
    assert r.status_code == 200
    assert r.json()["message"] == "processed 3 metrics; first sample set the baseline"
    got = by_id(consume(gateway_bootstrap(settings), settings.topic("usage.vm"), 3 + 2 * 5))
    assert len(got) == 3 + 2 * 5  # memory for all three points, counters for the last two
    assert f"vm:vm-b:cpu_time_nanos:{t0}" not in got  # a cumulative 1e12 is not billed
    assert got[f"vm:vm-b:cpu_time_nanos:{t0 + S}"][1]["value"] == Decimal(1000)
    assert got[f"vm:vm-b:disk_read_bytes:{t0 + 2 * S}"][1]["value"] == Decimal(5)
    assert got[f"vm:vm-b:memory_usage_bytes:{t0}"][1]["value"] == Decimal(1)
    assert httpx.get(gateway.url + "/stats").json()["baselines"] == 1


# ---- lifecycle, heartbeats, gaps -------------------------------------------------------------


def test_heartbeats_stops_and_gap_notices_follow_the_contract(gateway: VmGateway, settings: Settings) -> None:
    t0 = now_s()
    # a gap notice for a VM this gateway has not seen: held, answered success=false
    r = post(gateway, "NotifyPossibleGap",
             {"vmId": "vm-x", "lastSent": str(t0), "resumeTime": str(t0 + 90 * S + 5 * 10**8)})
    assert r.status_code == 200 and r.json() == {"success": False}
    # the VM's first batch names its customer: the held notice is published with it
    batch = {"vmId": "vm-x", "customerId": "cust-2", "metrics": [
        {"timestamp": rfc3339_ns(t0 + 100 * S), "cpuTimeNanos": "5", "memoryUsageBytes": "8"}]}
    assert post(gateway, "SendMetricsBatch", batch).status_code == 200
    r = post(gateway, "SendHeartbeat", {"instanceId": "metald-1", "activeVms": ["vm-x", "vm-nobody"]})
    assert r.status_code == 200 and r.json() == {"success": True}
    # a second gap, now for a known VM; int64 times in seconds (billaged's CLI) are understood
    r = post(gateway, "NotifyPossibleGap",
             {"vm_id": "vm-x", "last_sent": t0 // S + 200, "resume_time": t0 // S + 230})
    assert r.status_code == 200 and r.json() == {"success": True}
    r = post(gateway, "NotifyVmStopped", {"vmId": "vm-x", "stopTime": rfc3339_ns(t0 + 300 * S)})
    assert r.status_code == 200 and r.json() == {"success": True}
    r = post(gateway, "NotifyVmStopped", {"vmId": "vm-ghost", "stopTime": str(t0)})
    assert r.status_code == 200 and r.json() == {"success": True}  # as billaged: success, nothing known

    got = by_id(consume(gateway_bootstrap(settings), settings.topic("usage.vm"), 1 + 1 + 1 + 1 + 1))
    lifecycle = {rid: (k, r) for rid, (k, r) in got.items() if r["metric"].startswith("vm_")}
    gap1 = lifecycle[f"vm:vm-x:vm_possible_gap:{t0}"]
    assert gap1[0] == b"cust-2" and gap1[1]["tenant_id"] == "cust-2"
    assert gap1[1]["value"] == Decimal("90.5")  # gap seconds, exact
    assert gap1[1]["metadata"] == {"resume_time_ms": str((t0 + 90 * S + 5 * 10**8) // 10**6)}
    assert gap1[1]["event_time_ms"] == t0 // 10**6
    gap2 = lifecycle[f"vm:vm-x:vm_possible_gap:{t0 + 200 * S}"][1]
    assert gap2["value"] == Decimal(30)
    assert gap2["metadata"] == {"resume_time_ms": str((t0 + 230 * S) // 10**6)}
    beats = [r for _, r in lifecycle.values() if r["metric"] == "vm_heartbeat"]
    assert len(beats) == 1  # vm-nobody has no known customer: not published under a made-up tenant
    assert (beats[0]["tenant_id"], beats[0]["resource_id"], beats[0]["value"], beats[0]["metadata"]) == (
        "cust-2", "vm-x", Decimal(1), {"instance_id": "metald-1"})
    stopped = lifecycle[f"vm:vm-x:vm_stopped:{t0 + 300 * S}"][1]
    assert (stopped["tenant_id"], stopped["value"], stopped["event_time_ms"]) == (
        "cust-2", Decimal(1), (t0 + 300 * S) // 10**6)
    assert not any("vm-ghost" in rid or "vm-nobody" in rid for rid in got)
    stats = httpx.get(gateway.url + "/stats").json()
    assert (stats["parked_gaps"], stats["gaps"], stats["heartbeats"], stats["heartbeat_unknown_vms"],
            stats["unknown_vm_notices"], stats["active_vms"]) == (1, 2, 1, 1, 1, 0)


# ---- invalid requests -----------------------------------------------------------------------


INVALID = [
    ("SendMetricsBatch", {"vmId": 7, "metrics": [
        {"timestamp": "yesterday", "cpuTimeNanos": "-5", "memoryUsageBytes": "1.5"},
        {"cpuTimeNanos": "12"}]},
     {"vm_id", "customer_id", "metrics[0].timestamp", "metrics[0].cpu_time_nanos",
      "metrics[0].memory_usage_bytes", "metrics[1].timestamp"}),
    ("SendMetricsBatch", {"vmId": "v", "customerId": "c", "metrics": []}, {"metrics"}),
    ("SendMetricsBatch", {"vmId": "v", "vm_id": "v", "customerId": "c", "metrics": [
        {"timestamp": "2999-01-01T00:00:00Z"}, {"timestamp": {"seconds": "x"}}]},
     {"vm_id", "metrics[0].timestamp", "metrics[1].timestamp"}),
    ("SendHeartbeat", {"activeVms": ["ok", "", 5]}, {"instance_id", "active_vms[1]", "active_vms[2]"}),
    ("SendHeartbeat", {"instanceId": "i", "activeVms": "vm-1"}, {"active_vms"}),
    ("NotifyVmStarted", {"customerId": ["c"], "startTime": True}, {"vm_id", "customer_id", "start_time"}),
    ("NotifyVmStarted", {"vmId": "v", "customerId": "c", "startTime": "0"}, {"start_time"}),
    ("NotifyVmStopped", {"stopTime": "2000-01-01T00:00:00Z"}, {"vm_id", "stop_time"}),
    ("NotifyPossibleGap", {"vmId": "v", "lastSent": "200", "resumeTime": "100"},
     {"resume_time", "last_sent"}),
    ("NotifyPossibleGap", {"vmId": "", "resumeTime": "99999999999999999999"},
     {"vm_id", "last_sent", "resume_time"}),
]


def test_invalid_bodies_get_400_naming_every_bad_field(gateway: VmGateway) -> None:
    for method, body, fields in INVALID:
        r = post(gateway, method, body)
        assert r.status_code == 400, (method, body, r.text)
        err = r.json()
        assert err["code"] == "invalid_argument"
        named = {f["field"] for f in err["fields"]}
        assert named == fields, (method, body, err["fields"])
        for f in fields:
            assert f in err["message"]
        # Connect error details: a google.rpc.BadRequest, base64 protobuf plus a debug copy
        (detail,) = err["details"]
        assert detail["type"] == "google.rpc.BadRequest"
        raw = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        assert all(f.encode() in raw for f in fields)
        assert detail["debug"]["fieldViolations"] == err["fields"]
    r = httpx.post(gateway.url + RPC + "SendHeartbeat", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and [f["field"] for f in r.json()["fields"]] == ["body"]
    r = httpx.post(gateway.url + RPC + "SendHeartbeat", content=b"\x0a\xff",
                   headers={"Content-Type": "application/proto"})  # truncated protobuf
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = httpx.post(gateway.url + RPC + "SendHeartbeat", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert httpx.get(gateway.url + RPC + "SendHeartbeat").status_code == 405
    r = post(gateway, "GetActiveBillingSessions", {})
    assert r.status_code == 404 and r.json()["code"] == "unimplemented"
    stats = httpx.get(gateway.url + "/stats").json()
    assert stats["rejected"] == len(INVALID) + 2 and stats["published"] == 0


# ---- binary protobuf and the metald simulator ---------------------------------------------------


def test_protobuf_and_json_metald_simulators_publish_what_they_measured(
    gateway: VmGateway, settings: Settings
) -> None:
    start = now_s()
    sims = [
        MetaldSimulator(gateway.url, tenants=2, vms_per_tenant=2, points_per_batch=4, seed=3,
                        encoding="proto"),
        MetaldSimulator(gateway.url, tenants=1, vms_per_tenant=2, points_per_batch=3, seed=4,
                        encoding="json", camel_case=False, service="/deploy.billaged.v1.BillingService/"),
    ]
    expected: dict[str, tuple[str, str, Decimal]] = {}
    heartbeats = 0
    for sim in sims:
        with sim:
            result = sim.run(start, batches=2)
        assert result["statuses"] == {200: result["requests"]}, sim.responses
        expected.update(sim.expected)
        heartbeats += 2 * len(sim.vms)  # one heartbeat per round, every VM running
    r = httpx.post(gateway.url + RPC + "SendHeartbeat", content=b"\x0a\x03abc",
                   headers={"Content-Type": "application/proto"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/proto")
    assert r.content == b"\x08\x01"  # SendHeartbeatResponse{success: true}
    got = by_id(consume(gateway_bootstrap(settings), settings.topic("usage.vm"), len(expected) + heartbeats))
    beats = [rid for rid, (_, r) in got.items() if r["metric"] == "vm_heartbeat"]
    assert len(beats) == heartbeats
    published = {rid: (r["tenant_id"], r["metric"], r["value"]) for rid, (_, r) in got.items()
                 if r["metric"] != "vm_heartbeat"}
    assert published == expected
    assert all(key == r["tenant_id"].encode() for key, r in got.values())


def test_health_and_stats(gateway: VmGateway) -> None:
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["partitions"] == 2 and body["service"] == "metering-vm-ingest"
    stats = httpx.get(gateway.url + "/stats").json()
    for name in ("batches", "samples", "published", "rejected", "errors", "active_vms",
                 "in_flight_envelopes"):
        assert name in stats


def _kafka_threads() -> int:
    # librdkafka's native threads ("rdk:main", "rdk:broker..."), invisible to threading
    from pathlib import Path

    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return sum(1 for name in names if name.startswith("rdk:"))


def test_a_stopped_gateway_releases_its_producer_and_starts_again(settings: Settings) -> None:
    # kept until the gateway object is collected, its producer went on reconnecting (and
    # logging each failure) to a broker perhaps gone; a restarted gateway needs a new one
    import gc

    gc.collect()  # producers left by earlier tests, so they do not vanish mid-count
    before = _kafka_threads()
    gw = VmGateway(gateway_bootstrap(settings), settings.topic("usage.vm"), ack_timeout=15)
    t0 = now_s()
    try:
        gw.start()
        assert post(gw, "NotifyVmStarted", {"vmId": "vm-r1", "customerId": "cust-r",
                                            "startTime": str(t0)}).status_code == 200
        assert _kafka_threads() > before
        gw.stop()
        assert _kafka_threads() <= before
        gw.start()  # afresh, with a producer of its own
        assert post(gw, "NotifyVmStarted", {"vmId": "vm-r2", "customerId": "cust-r",
                                            "startTime": str(t0)}).status_code == 200
    finally:
        gw.stop()
    got = consume(gateway_bootstrap(settings), settings.topic("usage.vm"), 2)
    assert sorted(r["resource_id"] for _, r in got) == ["vm-r1", "vm-r2"]


# ---- a broker outage ------------------------------------------------------------------------------


def test_a_paused_broker_gets_503_never_200_and_the_retry_succeeds(tmp_path: Any) -> None:
    broker = TansuBroker(log_path=tmp_path / "tansu.log").start()  # our own: pausing it freezes no one else
    gw = None
    try:
        s = load_settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix="pause.",
                          topic_partitions=2)
        ensure_topics(s, broker.bootstrap_servers)
        gw = VmGateway(broker.bootstrap_servers, s.topic("usage.vm"), ack_timeout=1.0).start()
        t0 = now_s()
        started = {"vmId": "vm-p", "customerId": "cust-p", "startTime": str(t0)}
        assert post(gw, "NotifyVmStarted", started).status_code == 200

        def batch(i: int) -> dict[str, Any]:
            return {"vmId": "vm-p", "customerId": "cust-p", "metrics": [
                {"timestamp": rfc3339_ns(t0 + i * S), "cpuTimeNanos": str(1000 * i * i),
                 "memoryUsageBytes": "4"}]}

        assert post(gw, "SendMetricsBatch", batch(1)).status_code == 200
        broker.pause()
        try:
            began = time.monotonic()
            r = post(gw, "SendMetricsBatch", batch(2))
            took = time.monotonic() - began
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "unavailable"
            assert 0.8 < took < 8
            assert httpx.get(gw.url + "/health", timeout=30).status_code == 503
            r = post(gw, "SendHeartbeat", {"instanceId": "m", "activeVms": ["vm-p"]})
            assert r.status_code == 503
        finally:
            broker.resume()
        r = post(gw, "SendMetricsBatch", batch(2))  # metald's retry
        assert r.status_code == 200, r.text
        assert r.json()["message"] == "processed 1 metrics"  # the failed try did not move the baseline
        assert post(gw, "SendMetricsBatch", batch(3)).status_code == 200
        stats = httpx.get(gw.url + "/stats").json()
        assert stats["timeouts"] == 2
        got = by_id(consume(broker.bootstrap_servers, s.topic("usage.vm"), 1 + 3 * 6))
        cpu = {r["event_time_ms"]: r["value"] for _, r in got.values() if r["metric"] == "cpu_time_nanos"}
        assert cpu == {(t0 + S) // 10**6: Decimal(1000), (t0 + 2 * S) // 10**6: Decimal(3000),
                       (t0 + 3 * S) // 10**6: Decimal(5000)}
    finally:
        broker.resume()
        if gw is not None:
            gw.stop()
        broker.stop()


def test_a_broker_killed_while_a_request_waits_for_its_ack_gets_503_never_200(tmp_path: Any) -> None:
    broker = TansuBroker(log_path=tmp_path / "tansu.log").start()  # our own: killing it hurts no one else
    gw: VmGateway | None = None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-flight-post")
    ack_timeout = 2.0  # the gateway's --ack-timeout; production's 10 s would only make this slower
    try:
        s = load_settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix="kill.",
                          topic_partitions=2)
        ensure_topics(s, broker.bootstrap_servers)
        # librdkafka's own delivery timeout stays at its default (300 s): the answer comes
        # from the gateway's wait, and stop() gives up the undeliverable envelope after its
        # 5 s flush instead of leaving librdkafka retrying it
        gw = VmGateway(broker.bootstrap_servers, s.topic("usage.vm"), ack_timeout=ack_timeout).start()
        t0 = now_s()
        r = post(gw, "NotifyVmStarted", {"vmId": "vm-k", "customerId": "cust-k", "startTime": str(t0)})
        assert r.status_code == 200, r.text

        def batch(i: int) -> dict[str, Any]:
            return {"vmId": "vm-k", "customerId": "cust-k", "metrics": [
                {"timestamp": rfc3339_ns(t0 + i * S), "cpuTimeNanos": str(1000 * i),
                 "memoryUsageBytes": "4"}]}

        r = post(gw, "SendMetricsBatch", batch(1))  # the path works while the broker is up
        assert r.status_code == 200 and r.json() == {"success": True, "message": "processed 1 metrics"}
        before = httpx.get(gw.url + "/stats").json()
        assert before["published"] == 1 + 6 and before["in_flight_envelopes"] == 0

        broker.pause()  # Kafka holds the next produce request without answering it...
        began = time.monotonic()
        pending = pool.submit(post, gw, "SendMetricsBatch", batch(2))
        # ...until the gateway has produced this request's envelope and awaits its ack
        deadline = began + ack_timeout / 2  # leaves the kill well inside the request's wait
        while httpx.get(gw.url + "/stats").json()["in_flight_envelopes"] == 0:
            assert time.monotonic() < deadline, "the gateway never produced the request's records"
            assert not pending.done(), pending.result().text
            time.sleep(0.02)
        time.sleep(0.2)  # linger.ms is 5: the produce request is written to the frozen broker's socket
        assert not pending.done(), "answered before the broker was killed"
        assert broker.kill(), "the broker was not running"  # its sockets close, reconnects are refused
        killed = time.monotonic()
        assert killed - began < ack_timeout - 0.5, killed - began

        r = pending.result(timeout=ack_timeout + 5)  # bounded: never a hang
        took = time.monotonic() - began
        assert 500 <= r.status_code < 600, (r.status_code, r.text)
        assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text
        assert killed - began < took < ack_timeout + 2, (killed - began, took)

        stats = httpx.get(gw.url + "/stats").json()  # the server survived and counted no records
        assert stats["published"] == before["published"]
        assert stats["errors"] == before["errors"] + 1 and stats["timeouts"] == before["timeouts"] + 1
        health = httpx.get(gw.url + "/health", timeout=30)  # documented: 503 while Kafka is down
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unavailable"
        gw.stop()
        assert gw.snapshot()["in_flight_envelopes"] == 0  # every envelope reported: nothing left behind
    finally:
        if gw is not None:
            gw.stop()  # (a no-op when stopped) also ends a pending request, so the thread below ends
        pool.shutdown(wait=True)
        broker.stop()  # no-op once killed; stops it if the test failed before the kill
