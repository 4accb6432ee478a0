"""The webhook sink against a real Tansu broker and the real receiver over HTTP. Nothing is mocked.

Sink runs join a consumer group (about 5 s on Tansu each), so only three tests run the whole
consume -> deliver -> commit loop; the retry classification, the report format and stopping
mid-retry call ``write()`` directly (real HTTP, dead letters to the real broker, no group).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Context, Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from metering.config import Settings, load_settings
from metering.embedded import TansuBroker
from metering.topics import ensure_topics
from schemas import dead_letter_codec, quota_alert_codec, webhook_delivery_codec, window_codec
from sinks.base import Batch, SinkRecord
from sinks.errors import SinkUnavailableError
from sinks.receiver import ReceiverServer
from sinks.signing import generate_secret
from sinks.webhook import WebhookSink, parse_retry_after, report_payload, webhook_id, window_payload
from tests.topic_reader import read_all

pytestmark = pytest.mark.integration

WIDE = Context(prec=38)
Q = Decimal("0.000000001")
BASE_MS = int(dt.datetime(2024, 1, 31, 23, 0, tzinfo=dt.UTC).timestamp() * 1000)
MINUTE = 60_000

#: exact values that a float, a 28-digit context or str(Decimal) would get wrong
VALUES = [
    "12345678901234567890.123456789",
    "0.000000001",
    "0.000000000",
    "99999999999999999999999999999.999999999",
    "2.500000000",
    "7.125000000",
]


# ---- helpers -------------------------------------------------------------------------------------


def _dec(text: str) -> Decimal:
    return Decimal(text).quantize(Q, context=WIDE)


def _window(tenant: str, index: int, size_ms: int = MINUTE) -> dict[str, Any]:
    """A WindowResult dict as the stream worker emits it (decimals quantized to 9 places)."""
    start = BASE_MS + index * size_ms
    cpu = VALUES[index % len(VALUES)]
    mem = VALUES[(index + 3) % len(VALUES)]
    return {
        "window_id": f"{tenant}|{start}|{size_ms}",
        "tenant_id": tenant,
        "window_start_ms": start,
        "window_end_ms": start + size_ms,
        "totals": [
            {"metric": "cpu_seconds", "aggregation": "sum", "value": _dec(cpu), "samples": index + 1},
            {"metric": "memory_gb", "aggregation": "avg", "value": _dec(mem), "samples": 2},
        ],
        "sample_count": index + 3,
        "score": _dec(VALUES[(index + 1) % len(VALUES)]),
        "late_samples": index % 2,
        "has_gap": index % 3 == 0,
    }


def _expected_body(w: dict[str, Any]) -> dict[str, Any]:
    """The documented JSON of a window, written out independently of the sink's code."""

    def iso(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "type": "usage.window",
        "id": w["window_id"],
        "tenant_id": w["tenant_id"],
        "window_start": iso(w["window_start_ms"]),
        "window_end": iso(w["window_end_ms"]),
        "window_start_ms": w["window_start_ms"],
        "window_end_ms": w["window_end_ms"],
        "totals": {
            t["metric"]: {
                "aggregation": t["aggregation"], "value": f"{t['value']:.9f}", "samples": t["samples"]
            }
            for t in w["totals"]
        },
        "sample_count": w["sample_count"],
        "score": f"{w['score']:.9f}",
        "late_samples": w["late_samples"],
        "has_gap": w["has_gap"],
    }


def _msg_id(window_id: str) -> str:
    return "msg_" + hashlib.sha256(window_id.encode()).hexdigest()[:24]


def _produce(settings: Settings, windows: Sequence[dict[str, Any]], name: str = "usage.windows",
             codec: Any = None) -> list[int]:
    """Publish the windows (or, with ``name`` and ``codec``, alerts); the next offset of each
    partition (what a full commit must reach)."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all"})
    codec = codec or window_codec()
    ends = [0] * settings.topic_partitions

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None, err
        ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)

    for w in windows:
        producer.produce(settings.topic(name), codec.encode(w), key=w["tenant_id"].encode(),
                         on_delivery=on_delivery)
    assert producer.flush(30) == 0
    return ends


def _sink(settings: Settings, url: str, secret: str | None = None, **kwargs: Any) -> WebhookSink:
    params: dict[str, Any] = {
        "group_id": f"{settings.topic_prefix}webhook-sink",
        "flush_seconds": 0.2,
        "backoff_base_seconds": 0.02,
        "backoff_max_seconds": 0.2,
        "timeout_seconds": 2.0,
        "max_concurrency": 4,
    }
    params.update(kwargs)
    assert settings.kafka_bootstrap_servers is not None
    return WebhookSink.from_settings(settings, settings.kafka_bootstrap_servers, url=url, secret=secret,
                                     **params)


def _run_until(sink: WebhookSink, done: Callable[[], bool], timeout: float = 60.0) -> None:
    """Run the sink in a thread until ``done()`` holds (or it idles out), then stop it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run(idle_exit_seconds=30)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="webhook-sink", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done() and thread.is_alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"sink did not get there in {timeout}s: {sink.stats}")
            time.sleep(0.1)
    finally:
        sink.stop()
        thread.join(30)
    assert not thread.is_alive(), "sink did not stop"
    if errors:
        raise errors[0]


def _committed(settings: Settings, name: str = "usage.windows") -> list[int]:
    """The sink group's committed offsets of ``name``, per partition (0 when none).

    Compared with the offsets the producer was told, not with get_watermark_offsets: Tansu
    0.6 answers ListOffsets(latest) with 1 for a partition holding one batch of 5 records.
    """
    topic = settings.topic(name)
    parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                  "group.id": f"{settings.topic_prefix}webhook-sink", "enable.auto.commit": False})
    try:
        return [max(tp.offset, 0) for tp in c.committed(parts, timeout=10)]
    finally:
        c.close()


def _dead_letters(settings: Settings, expected: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    topic = settings.topic("usage.dlq")
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "dlq-reader",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.topic_partitions)])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(dead_letter_codec().decode(msg.value() or b""))
        extra = c.poll(1.0)  # nothing more than expected
        assert extra is None or extra.error() is not None, "more dead letters than expected"
    finally:
        c.close()
    return out


def _deliveries(settings: Settings) -> list[dict[str, Any]]:
    """Every WebhookDelivery record on ``webhook.deliveries``, decoded, each with its key."""
    return [{**webhook_delivery_codec().decode(m.value()), "key": m.key()}
            for m in read_all(settings, "webhook.deliveries")]


def _by_id(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Delivery records by webhook-id; fails if an id has two records."""
    out = {r["webhook_id"]: r for r in records}
    assert len(out) == len(records), "two delivery records of one webhook-id"
    return out


@contextmanager
def _standalone(sink: WebhookSink) -> Iterator[WebhookSink]:
    """A sink used through write() only: never subscribed, closed afterwards."""
    try:
        yield sink
    finally:
        sink.close()
        sink.close_clients()


def _batch(settings: Settings, windows: Sequence[dict[str, Any]]) -> Batch:
    topic = settings.topic("usage.windows")
    return Batch(topic, 0, [
        SinkRecord(topic, 0, i, w["tenant_id"].encode(), w, BASE_MS) for i, w in enumerate(windows)
    ])


# ---- payloads (pure) -----------------------------------------------------------------------------


def test_payloads_are_exact_and_ids_deterministic() -> None:
    w = _window("acme", 2)
    w["window_start_ms"] += 250  # not a whole second: milliseconds appear
    body = window_payload(w)
    assert body["window_start"] == "2024-01-31T23:02:00.250Z" and body["window_end"] == "2024-01-31T23:03:00Z"
    assert body["totals"]["cpu_seconds"]["value"] == "0.000000000"  # str() would say 0E-9
    assert body["totals"]["memory_gb"]["value"] == "7.125000000"
    assert body["score"] == "99999999999999999999999999999.999999999"
    assert webhook_id(w["window_id"]) == _msg_id(w["window_id"]) == webhook_id(w["window_id"])
    assert webhook_id(w["window_id"], "report:score") != webhook_id(w["window_id"])

    def report_value(score: str, metric: str | None = None) -> int:
        value = report_payload({**w, "score": _dec(score)}, "score", metric)["value"]["int64Value"]
        assert isinstance(value, int)
        return value

    assert [report_value(s) for s in ("2.5", "2.499999999", "3.5", "0", "0.5", "7.125")] == [3, 2, 4, 0, 1, 7]
    assert report_value("9223372036854775806.5") == 2**63 - 1
    with pytest.raises(ValueError, match="outside int64Value's range"):
        report_value("9223372036854775807.5")
    assert report_value("0", "memory_gb") == 7 and report_value("0", "disk_mb") == 0
    report = report_payload({**w, "score": _dec("41.5")}, "usage_score")
    assert report["value"] == {"int64Value": 42}
    assert report["name"] == "usage_score" and report["endTime"] == "2024-01-31T23:03:00Z"
    assert report["labels"] == {"tenant_id": "acme"}

    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    http_date = "Wed, 21 Oct 2015 07:28:00 GMT"
    now = dt.datetime(2015, 10, 21, 7, 27, 30, tzinfo=dt.UTC).timestamp()
    assert parse_retry_after(http_date, now=now) == 30.0
    assert parse_retry_after(http_date, now=now + 60) == 0.0


# ---- write() directly: real HTTP, real dead-letter topic -----------------------------------------


def test_status_classification_retry_after_and_dead_letters(settings: Settings) -> None:
    """400 and 301 are dead-lettered at once, 409 counts as delivered, 429 waits Retry-After,
    408 is retried, and an unreachable endpoint is retried and then dead-lettered."""
    windows = [_window("acme", i) for i in range(5)]
    # max_concurrency=1: requests arrive in record order, so request n is about record n
    plan = {1: "400", 2: "409", 3: "429:1", 5: "408", 7: "301"}
    secret = generate_secret()
    with ReceiverServer(secret=secret, failure_plan=plan.get) as receiver, _standalone(
        _sink(settings, receiver.url, secret, max_concurrency=1, backoff_base_seconds=0.01)
    ) as sink:
        t0 = time.monotonic()
        sink.write(_batch(settings, windows))
        elapsed = time.monotonic() - t0
        stats = receiver.stats()
        stored = {r["webhook_id"] for r in receiver.reports}
    assert elapsed >= 1.0, "Retry-After: 1 was not honoured"
    assert (sink.attempts, sink.delivered, sink.duplicates, sink.dead_lettered) == (7, 3, 1, 2)
    assert stats["received"] == 7 and stats["rejected"] == 0
    assert stored == {_msg_id(windows[2]["window_id"]), _msg_id(windows[3]["window_id"])}

    with ReceiverServer() as closed:
        dead_url = closed.url  # a port nobody listens on once this receiver stops
    with _standalone(_sink(settings, dead_url, max_attempts=2, timeout_seconds=0.5)) as sink2:
        sink2.write(_batch(settings, [_window("globex", 9)]))
    assert (sink2.attempts, sink2.delivered, sink2.dead_lettered) == (2, 0, 1)

    letters = _dead_letters(settings, 3)
    by_status = {d["reason"].split("last: ")[1][:8]: d for d in letters}
    assert set(by_status) == {"HTTP 400", "HTTP 301", "ConnectE"}
    assert "failed after 1 attempt(s); last: HTTP 400 (not retried" in by_status["HTTP 400"]["reason"]
    assert "failed after 1 attempt(s); last: HTTP 301" in by_status["HTTP 301"]["reason"]
    assert "failed after 2 attempt(s); last: ConnectError" in by_status["ConnectE"]["reason"]
    assert all(d["stage"] == "webhook-sink" for d in letters)
    assert (by_status["HTTP 400"]["source_offset"], by_status["HTTP 301"]["source_offset"]) == (0, 4)
    # the window is kept whole, with its key, so the dead letter can be replayed
    assert window_codec().decode(by_status["HTTP 400"]["payload"]) == windows[0]
    assert by_status["HTTP 400"]["key"] == b"acme"

    # one delivery record per window, whatever its outcome: the 409 is a duplicate after 1
    # attempt; 429 then 200, and 408 then 200, took 2 attempts each; 400 and 301 were
    # dead-lettered after 1, with the dead letter's reason and the last error
    records = _by_id(_deliveries(settings))
    topic = settings.topic("usage.windows")
    reasons = {d["source_offset"]: d["reason"] for d in (by_status["HTTP 400"], by_status["HTTP 301"])}
    ours = {i: r for i, r in records.items() if r["tenant_id"] == "acme"}
    assert {i: (r["status"], r["attempts"], r["last_status"], r["source_offset"], r["reason"])
            for i, r in ours.items()} == {
        _msg_id(windows[0]["window_id"]): ("dead_lettered", 1, 400, 0, reasons[0]),
        _msg_id(windows[1]["window_id"]): ("duplicate", 1, 409, 1, ""),
        _msg_id(windows[2]["window_id"]): ("delivered", 2, 200, 2, ""),
        _msg_id(windows[3]["window_id"]): ("delivered", 2, 200, 3, ""),
        _msg_id(windows[4]["window_id"]): ("dead_lettered", 1, 301, 4, reasons[4]),
    }
    assert ours[_msg_id(windows[0]["window_id"])]["last_error"].startswith("not retried: ")
    assert all(r["last_error"] == "" for i, r in ours.items() if r["status"] != "dead_lettered")
    assert all((r["window_id"], r["alert_id"], r["tenant_id"], r["key"], r["source_topic"],
                r["source_partition"], r["payload_format"])
               == (windows[r["source_offset"]]["window_id"], "", "acme", b"acme", topic, 0,
                   "usage.window") for r in ours.values())
    # the unreachable endpoint: no HTTP status, the connection error as the last error
    (unreachable,) = [r for r in records.values() if r["tenant_id"] == "globex"]
    assert (unreachable["webhook_id"], unreachable["status"], unreachable["attempts"],
            unreachable["last_status"], unreachable["reason"]) == (
        _msg_id(_window("globex", 9)["window_id"]), "dead_lettered", 2, 0, by_status["ConnectE"]["reason"])
    assert unreachable["last_error"].startswith("ConnectError")
    assert sink.delivery_records == 5 and sink2.delivery_records == 1


def test_report_format_posts_one_integer_report_per_window(settings: Settings) -> None:
    windows = [_window("initech", i) for i in range(6)]
    with ReceiverServer() as receiver, _standalone(
        _sink(settings, receiver.url, payload_format="report", report_name="billing_score")
    ) as sink:
        t0 = int(time.time() * 1000)
        sink.write(_batch(settings, windows))
        t1 = int(time.time() * 1000)
        reports = {r["webhook_id"]: r["payload"] for r in receiver.reports}
    # scores beyond int64 cannot be reported in this format: dead-lettered, never clamped
    rounded = {"0.000000001": 0, "0.000000000": 0, "2.500000000": 3, "7.125000000": 7}
    fits = [w for w in windows if f"{w['score']:.9f}" in rounded]
    assert (sink.delivered, sink.attempts, sink.dead_lettered) == (4, 4, 2)
    assert len(reports) == len(fits) == 4
    for w in fits:
        got = reports[webhook_id(w["window_id"], "report:billing_score")]
        start = dt.datetime.fromtimestamp(w["window_start_ms"] // 1000, dt.UTC)
        assert got == {
            "name": "billing_score",
            "startTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endTime": (start + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "value": {"int64Value": rounded[f"{w['score']:.9f}"]},
            "labels": {"tenant_id": "initech"},
        }
    letters = _dead_letters(settings, 2)
    assert all(d["reason"].startswith("webhook delivery not attempted: cannot build the report payload")
               and "outside int64Value's range" in d["reason"] for d in letters)
    # the delivery records name the id the receiver got: scoped by the report name; a window
    # that could not be reported has a record too, under the id it would have carried
    records = _by_id(_deliveries(settings))
    scoped = {
        "msg_" + hashlib.sha256(f"report:billing_score|{w['window_id']}".encode()).hexdigest()[:24]: w
        for w in windows
    }
    assert set(records) == set(scoped)
    assert {i for i, r in records.items() if r["status"] == "delivered"} == set(reports)
    assert not set(records) & {_msg_id(w["window_id"]) for w in windows}  # never the unscoped id
    reasons = {d["source_offset"]: d["reason"] for d in letters}
    for msg_id, r in records.items():
        assert (r["window_id"], r["alert_id"], r["payload_format"]) == (
            scoped[msg_id]["window_id"], "", "report")
        if scoped[msg_id] in fits:
            assert (r["status"], r["attempts"], r["last_status"], r["last_error"], r["reason"]) == (
                "delivered", 1, 200, "", "")
        else:  # never attempted
            assert (r["status"], r["attempts"], r["last_status"], r["reason"]) == (
                "dead_lettered", 0, 0, reasons[r["source_offset"]])
            assert r["last_error"].startswith("cannot build the report payload")
        assert t0 <= r["delivered_at_ms"] <= t1
    assert sink.delivery_records == 6


def test_dead_lettered_report_is_recorded_under_the_id_the_receiver_saw(settings: Settings) -> None:
    """A report-format sink whose receiver refuses (400: dead-lettered at once) or keeps
    failing (500 until the attempts run out): each WebhookDelivery is dead_lettered under the
    report-scoped ``webhook-id`` the receiver got in its header, beside an unchanged dead
    letter; a window whose report cannot be built names the id it would have carried."""
    windows = [_window("hooli", i) for i in range(3)]  # scores: 1e-9, 0, then beyond int64
    # max_concurrency=1: request 1 is windows[0]'s (400), requests 2-4 windows[1]'s (500)
    with ReceiverServer(failure_plan=lambda n: "400" if n == 1 else "500") as receiver, _standalone(
        _sink(settings, receiver.url, payload_format="report", report_name="billing_score",
              max_attempts=3, max_concurrency=1)
    ) as sink:
        t0 = int(time.time() * 1000)
        sink.write(_batch(settings, windows))
        t1 = int(time.time() * 1000)
        posts = receiver.posts_by_id()
        assert receiver.reports == []
    assert (sink.delivered, sink.dead_lettered, sink.attempts, sink.delivery_records) == (0, 3, 4, 3)
    ids = ["msg_" + hashlib.sha256(f"report:billing_score|{w['window_id']}".encode()).hexdigest()[:24]
           for w in windows]
    assert posts == {ids[0]: 1, ids[1]: 3}  # the ids the receiver saw in the webhook-id header
    letters = {d["source_offset"]: d for d in _dead_letters(settings, 3)}
    assert [window_codec().decode(letters[i]["payload"]) for i in range(3)] == windows
    records = _by_id(_deliveries(settings))
    assert set(records) == set(ids)
    got = {i: (r["source_offset"], r["status"], r["attempts"], r["last_status"], r["reason"])
           for i, r in records.items()}
    assert got == {
        ids[0]: (0, "dead_lettered", 1, 400, letters[0]["reason"]),
        ids[1]: (1, "dead_lettered", 3, 500, letters[1]["reason"]),
        ids[2]: (2, "dead_lettered", 0, 0, letters[2]["reason"]),
    }
    assert letters[0]["reason"].startswith("webhook delivery failed after 1 attempt(s); last: HTTP 400")
    assert letters[1]["reason"] == "webhook delivery failed after 3 attempt(s); last: HTTP 500"
    assert letters[2]["reason"].startswith("webhook delivery not attempted: cannot build the report")
    assert records[ids[0]]["last_error"].startswith("not retried: ")
    assert records[ids[0]]["last_error"] in letters[0]["reason"]
    assert records[ids[1]]["last_error"] == ""
    assert records[ids[2]]["last_error"].startswith("cannot build the report payload")
    assert all((r["window_id"], r["alert_id"], r["tenant_id"], r["key"], r["payload_format"])
               == (windows[r["source_offset"]]["window_id"], "", "hooli", b"hooli", "report")
               and t0 <= r["delivered_at_ms"] <= t1 for r in records.values())


def _alert(tenant: str, threshold: int) -> dict[str, Any]:
    """A QuotaAlert dict as the quota agent emits it."""
    day = BASE_MS - BASE_MS % (24 * 3600_000)
    return {
        "alert_id": f"{tenant}|cpu_seconds|day|{day}|{threshold}", "tenant_id": tenant,
        "metric": "cpu_seconds", "period": "day", "period_start_ms": day,
        "threshold_percent": threshold, "limit": _dec("1000.5"),
        "used": _dec(VALUES[0]) if threshold == 100 else _dec("800.400000001"),
        "crossed_at_window_end_ms": BASE_MS + MINUTE,
    }


def test_quota_alerts_are_delivered_signed_with_their_own_ids_or_dead_lettered(
        settings: Settings) -> None:
    alerts = [_alert("acme", 80), _alert("acme", 100)]
    topic = settings.topic("quota.alerts")
    batch = Batch(topic, 0, [SinkRecord(topic, 0, i, b"acme", a, BASE_MS)
                             for i, a in enumerate(alerts)])
    secret = generate_secret()
    # the second alert is refused for good (400): dead-lettered whole, as an alert
    with ReceiverServer(secret=secret, failure_plan={2: "400"}.get) as receiver, _standalone(
        _sink(settings, receiver.url, secret, max_concurrency=1)
    ) as sink:
        assert set(sink.codecs) == {settings.topic("usage.windows"), topic}
        sink.write(batch)
        reports = receiver.reports
    assert (sink.delivered, sink.dead_lettered) == (1, 1)
    # written out independently of the sink's code: exact decimals, ISO times, scoped id
    acme_80 = alerts[0]
    assert [(r["webhook_id"], r["payload"]) for r in reports] == [(
        "msg_" + hashlib.sha256(f"alert|{acme_80['alert_id']}".encode()).hexdigest()[:24], {
            "type": "quota.alert", "id": acme_80["alert_id"], "tenant_id": "acme",
            "metric": "cpu_seconds", "period": "day", "period_start": "2024-01-31T00:00:00Z",
            "period_start_ms": acme_80["period_start_ms"], "threshold_percent": 80,
            "limit": "1000.500000000", "used": "800.400000001",
            "crossed_at_window_end": "2024-01-31T23:01:00Z",
            "crossed_at_window_end_ms": BASE_MS + MINUTE,
        })]
    (letter,) = _dead_letters(settings, 1)
    assert letter["source_topic"] == topic and letter["stage"] == "webhook-sink"
    assert quota_alert_codec().decode(letter["payload"]) == alerts[1]
    # each alert has a delivery record under its alert-scoped id: the delivered one, and the
    # dead-lettered one (what webhook_deliveries stores) naming the alert and its reason
    delivered, refused = sorted(_deliveries(settings), key=lambda r: r["source_offset"])
    assert {k: v for k, v in delivered.items() if k != "delivered_at_ms"} == {
        "webhook_id": reports[0]["webhook_id"], "window_id": "", "alert_id": acme_80["alert_id"],
        "tenant_id": "acme", "status": "delivered", "attempts": 1, "last_status": 200,
        "source_topic": topic, "source_partition": 0, "source_offset": 0,
        "payload_format": "quota.alert", "last_error": "", "reason": "", "key": b"acme",
    }
    assert {k: v for k, v in refused.items() if k not in ("delivered_at_ms", "last_error")} == {
        "webhook_id": webhook_id(alerts[1]["alert_id"], "alert"), "window_id": "",
        "alert_id": alerts[1]["alert_id"], "tenant_id": "acme", "status": "dead_lettered",
        "attempts": 1, "last_status": 400, "source_topic": topic, "source_partition": 0,
        "source_offset": 1, "payload_format": "quota.alert", "reason": letter["reason"],
        "key": b"acme",
    }
    assert refused["last_error"].startswith("not retried: ")


def test_report_format_refuses_alerts_and_from_settings_follows_webhook_alerts(
        settings: Settings) -> None:
    with pytest.raises(ValueError, match="report format carries usage only"):
        WebhookSink(url="http://127.0.0.1:9/", bootstrap_servers="127.0.0.1:9", windows_topic="w",
                    group_id="g", dlq_topic="d", alerts_topic="a", payload_format="report")
    off = settings.model_copy(update={"webhook_alerts": False})
    for s, fmt, subscribed in ((settings, "report", False), (off, "usage.window", False),
                               (settings, "usage.window", True)):
        with _standalone(_sink(s, "http://127.0.0.1:9/", payload_format=fmt)) as sink:
            assert (settings.topic("quota.alerts") in sink.codecs) is subscribed, (fmt, s.webhook_alerts)


def test_stop_interrupts_retries_and_leaves_the_batch_uncommitted(settings: Settings) -> None:
    with ReceiverServer(failure_plan=lambda n: "503:30") as receiver, _standalone(
        _sink(settings, receiver.url, max_attempts=5, retry_after_max_seconds=30)
    ) as sink:
        threading.Timer(0.5, sink.stop).start()
        t0 = time.monotonic()
        with pytest.raises(SinkUnavailableError, match="stopping"):
            sink.write(_batch(settings, [_window("acme", 0), _window("acme", 1)]))
        assert time.monotonic() - t0 < 3
    assert sink.dead_lettered == 0 and sink.delivered == 0


def test_unacknowledged_delivery_records_leave_the_batch_uncommitted(tmp_path: Any) -> None:
    """Delivery records are part of the persist step: while Kafka does not acknowledge them,
    write() raises SinkUnavailableError (the base then commits nothing), and the base's retry
    of the batch POSTs again and records again, truthfully: two POSTs, two records per id."""
    broker = TansuBroker(log_path=tmp_path / "tansu.log").start()  # our own: pausing it freezes no one else
    try:
        s = load_settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix="ack.",
                          topic_partitions=2)
        ensure_topics(s, broker.bootstrap_servers)
        windows = [_window("acme", i) for i in range(3)]
        with ReceiverServer() as receiver, _standalone(_sink(s, receiver.url)) as sink:
            sink.persist_timeout_seconds = 2.0
            sink.write(_batch(s, windows[:1]))  # connected, the first record acknowledged
            broker.pause()
            try:
                with pytest.raises(SinkUnavailableError, match="did not acknowledge"):
                    sink.write(_batch(s, windows))
            finally:
                broker.resume()
            assert sink.delivery_records == 1  # nothing counted for the failed batch
            sink.write(_batch(s, windows))  # the base's retry of the same batch
            posts = receiver.posts_by_id()
            stored = [r["webhook_id"] for r in receiver.reports]
        ids = [_msg_id(w["window_id"]) for w in windows]
        assert sorted(stored) == sorted(ids)  # the receiver deduplicated
        assert posts == {ids[0]: 3, ids[1]: 2, ids[2]: 2}
        # the paused batch's records went out once the broker answered again
        records = _deliveries(s)
        assert sorted(r["webhook_id"] for r in records) == sorted(
            i for i, n in posts.items() for _ in range(n))
        assert all((r["status"], r["attempts"]) == ("delivered", 1) for r in records)
    finally:
        broker.resume()
        broker.stop()


# ---- the whole loop: consume, deliver, commit -----------------------------------------------------


def test_every_window_is_delivered_once_with_exact_values_then_committed(settings: Settings) -> None:
    windows = [_window(t, i) for t in ("acme", "globex", "initech") for i in range(4)]
    ends = _produce(settings, windows)
    secret = generate_secret()
    with ReceiverServer(secret=secret) as receiver:
        sink = _sink(settings, receiver.url, secret)
        _run_until(sink, lambda: len(receiver.reports) >= len(windows))
        reports = receiver.reports
        stats = receiver.stats()
    assert {r["webhook_id"]: r["payload"] for r in reports} == {
        _msg_id(w["window_id"]): _expected_body(w) for w in windows
    }
    assert len(reports) == len(windows)
    assert (stats["received"], stats["duplicates"], stats["rejected"]) == (12, 0, 0)
    assert (sink.delivered, sink.attempts, sink.dead_lettered) == (12, 12, 0)
    assert _committed(settings) == ends
    # exactly one delivery record per window, under the id the receiver saw, 1 attempt each
    records = _by_id(_deliveries(settings))
    received = {r["webhook_id"]: r for r in reports}
    assert set(records) == set(received)
    for msg_id, r in records.items():
        w = received[msg_id]["payload"]
        assert (r["window_id"], r["alert_id"], r["tenant_id"], r["status"], r["attempts"],
                r["last_status"], r["source_topic"], r["payload_format"]) == (
            w["id"], "", w["tenant_id"], "delivered", 1, 200, settings.topic("usage.windows"),
            "usage.window")
        assert r["delivered_at_ms"] >= received[msg_id]["received_at_ms"]
    # ... each pointing at its window on usage.windows
    positions = {(r["source_partition"], r["source_offset"]) for r in records.values()}
    assert len(positions) == 12 and all(o < ends[p] for p, o in positions)
    assert sink.delivery_records == 12


def test_flaky_receiver_gets_every_window_exactly_once_after_dedup(settings: Settings) -> None:
    """About half of the first 80 requests fail: 500, 429 (Retry-After 0 or 1) or a timeout
    AFTER the receiver stored the report. Every report and quota alert arrives, each once after
    dedup."""
    windows = [_window(f"tenant-{t}", i) for t in range(5) for i in range(6)]
    ends = _produce(settings, windows)
    alerts = [_alert(f"tenant-{t}", threshold) for t in range(2) for threshold in (80, 100)]
    alert_ends = _produce(settings, alerts, "quota.alerts", quota_alert_codec())
    rng = random.Random(20240131)
    plan: dict[int, str] = {}
    for n in range(1, 81):
        if rng.random() < 0.5:
            plan[n] = rng.choice(["500", "500", "429", "429:1", "timeout", "timeout"])
    secret = generate_secret()
    # no record can run out of attempts: there are fewer failing requests than attempts
    max_attempts = len(plan) + 1
    with ReceiverServer(secret=secret, failure_plan=plan.get, stall_seconds=3.0) as receiver:
        sink = _sink(settings, receiver.url, secret, timeout_seconds=1.0, max_attempts=max_attempts)
        _run_until(sink, lambda: sink.delivered >= len(windows) + len(alerts), timeout=90)
        everything = receiver.reports
        reports = [r for r in everything if r["payload"]["type"] == "usage.window"]
        alert_reports = [r for r in everything if r["payload"]["type"] == "quota.alert"]
        stats = receiver.stats()
    kinds = stats["injected_by_kind"]
    assert kinds.get("500") and kinds.get("429") and kinds.get("timeout"), kinds
    assert stats["injected"] >= 20
    ids = [r["webhook_id"] for r in reports]
    assert sorted(ids) == sorted(_msg_id(w["window_id"]) for w in windows)  # each exactly once
    assert {r["webhook_id"]: r["payload"] for r in reports} == {
        _msg_id(w["window_id"]): _expected_body(w) for w in windows
    }
    # a timed-out request had been stored: its retry came back as a duplicate, with the same id
    assert 1 <= stats["duplicates"] <= kinds["timeout"]
    assert stats["rejected"] == 0  # every retry was signed afresh within the tolerance
    assert sorted(r["webhook_id"] for r in alert_reports) == sorted(
        webhook_id(a["alert_id"], "alert") for a in alerts)  # each alert exactly once too
    assert len(everything) == 30 + 4
    assert (sink.delivered, sink.dead_lettered) == (30 + 4, 0)
    assert sink.attempts == stats["received"] == 30 + 4 + stats["injected"]
    assert _committed(settings) == ends
    assert _committed(settings, "quota.alerts") == alert_ends
    # exactly one delivery record per window and alert, under the id the receiver saw, with
    # as many attempts as the receiver got POSTs of that id (failed ones and timeouts included)
    records = _by_id(_deliveries(settings))
    assert set(records) == {r["webhook_id"] for r in everything}
    posts = receiver.posts_by_id()
    assert {i: r["attempts"] for i, r in records.items()} == posts
    assert sum(posts.values()) == stats["received"] and max(posts.values()) > 1
    assert all((r["status"], r["last_status"]) == ("delivered", 200) for r in records.values())
    stored_at = {r["webhook_id"]: r["received_at_ms"] for r in everything}
    assert all(r["delivered_at_ms"] >= stored_at[i] for i, r in records.items())
    window_records = [r for r in records.values() if r["window_id"]]
    assert sorted(r["window_id"] for r in window_records) == sorted(w["window_id"] for w in windows)
    assert all((r["alert_id"], r["payload_format"]) == ("", "usage.window") for r in window_records)
    alert_records = [r for r in records.values() if r["alert_id"]]
    assert sorted(r["alert_id"] for r in alert_records) == sorted(a["alert_id"] for a in alerts)
    assert all((r["window_id"], r["payload_format"], r["source_topic"])
               == ("", "quota.alert", settings.topic("quota.alerts")) for r in alert_records)
    assert sink.delivery_records == 34


def test_permanently_failing_endpoint_dead_letters_every_window(settings: Settings) -> None:
    windows = [_window("umbrella", i) for i in range(5)]
    ends = _produce(settings, windows)
    with ReceiverServer(failure_plan=lambda n: "500") as receiver:
        sink = _sink(settings, receiver.url, max_attempts=3)
        _run_until(sink, lambda: sink.dead_lettered >= len(windows))
        received = receiver.stats()["received"]
    assert (sink.delivered, sink.dead_lettered, sink.attempts, received) == (0, 5, 15, 15)
    letters = _dead_letters(settings, 5)
    assert all(d["stage"] == "webhook-sink" for d in letters)
    assert all("failed after 3 attempt(s); last: HTTP 500" in d["reason"] for d in letters)
    assert sorted(window_codec().decode(d["payload"])["window_id"] for d in letters) == sorted(
        w["window_id"] for w in windows
    )
    assert {(d["source_topic"], d["key"]) for d in letters} == {
        (settings.topic("usage.windows"), b"umbrella")
    }
    assert _committed(settings) == ends  # dead-lettered, so committed: the sink moves on
    # ... and recorded: one dead_lettered WebhookDelivery per window, beside its dead letter
    records = _by_id(_deliveries(settings))
    assert set(records) == {_msg_id(w["window_id"]) for w in windows}
    assert all((r["status"], r["attempts"], r["last_status"], r["last_error"])
               == ("dead_lettered", 3, 500, "") for r in records.values())
    assert sorted(r["reason"] for r in records.values()) == sorted(d["reason"] for d in letters)
    assert sink.delivery_records == 5
