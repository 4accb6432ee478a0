"""The Redis Enterprise producer against an emulated cluster REST API and a real Tansu broker.

A Redis Enterprise Software cluster cannot run on a build machine, so
:class:`~tests.producers.fake_redis_enterprise.FakeRedisEnterprise` — a real aiohttp server
in the test — emulates its REST API (``/v1/nodes``, ``/v1/bdbs``, ``/v1/shards``,
``/v1/license``, documented JSON shapes, HTTP basic auth). Kafka is not mocked: records are
consumed from ``usage.redis`` on the session's Tansu broker and decoded with the envelope
codec. Billing reports (``--send-to``) go to a real local HTTP receiver.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from metering.config import Settings
from metering.errors import ConfigError
from producers.publisher import EnvelopePublisher
from producers.redis_enterprise import (
    REDIS_TOPIC,
    SOURCE,
    RedisEnterpriseClient,
    RedisEnterpriseProducer,
    build_parser_args,
    build_records,
    parse_snapshot,
    producer_from_args,
    run_from_args,
)
from producers.simulators.redis_enterprise import RedisEnterpriseSimulator
from tests.producers.fake_redis_enterprise import FakeRedisEnterprise, ReportReceiver
from tests.producers.kafka_reader import consume

pytestmark = pytest.mark.integration

MINUTE = 60_000
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CLUSTER = "cluster.example.com"

#: what the documented cluster of fake_redis_enterprise must become: event id -> (resource, metric, value)
EXPECTED = {
    "node:1:node_memory_bytes": (f"{CLUSTER}/node:1", Decimal(6260334592)),
    "node:1:node_cpu_cores": (f"{CLUSTER}/node:1", Decimal(4)),
    "node:2:node_memory_bytes": (f"{CLUSTER}/node:2", Decimal(8589934592)),
    "node:2:node_cpu_cores": (f"{CLUSTER}/node:2", Decimal(8)),
    "cluster:shards_used": (CLUSTER, Decimal(3)),
    "cluster:shards_max": (CLUSTER, Decimal(12)),
    "db:1:db_memory_bytes": (f"{CLUSTER}/db:1", Decimal(1073741824)),
    "db:1:db_shards": (f"{CLUSTER}/db:1", Decimal(2)),  # master + replica
    "db:2:db_memory_bytes": (f"{CLUSTER}/db:2", Decimal(536870912)),
    "db:2:db_shards": (f"{CLUSTER}/db:2", Decimal(1)),
}


def iso(ms: int) -> str:
    """ISO 8601 UTC, as the receiver must see it."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def boundary() -> int:
    """The start of the current minute (ms), so event times are recent for the broker."""
    now = int(time.time() * 1000)
    return now - now % MINUTE


@pytest.fixture
def fake() -> Iterator[FakeRedisEnterprise]:
    f = FakeRedisEnterprise().start()
    yield f
    f.stop()


@pytest.fixture
def receiver() -> Iterator[ReportReceiver]:
    r = ReportReceiver().start()
    yield r
    r.stop()


def client_for(fake: FakeRedisEnterprise, **kw: Any) -> RedisEnterpriseClient:
    kw.setdefault("timeout", 0.5)
    return RedisEnterpriseClient(fake.url, fake.username, fake.password, **kw)


def publisher_for(settings: Settings) -> EnvelopePublisher:
    return EnvelopePublisher(settings.kafka_bootstrap_servers or "", settings.topic(REDIS_TOPIC),
                             source=SOURCE)


def check_interval(records: list[dict[str, Any]], end_ms: int, tenant: str) -> None:
    """``records`` are exactly the documented cluster's records for the interval ending ``end_ms``."""
    got = {r["event_id"]: r for r in records}
    assert len(got) == len(records), "an event id repeats within one poll"
    want = {f"redis:{CLUSTER}:{k}:{end_ms}": v for k, v in EXPECTED.items()}
    assert set(got) == set(want)
    for event_id, (resource, value) in want.items():
        r = got[event_id]
        assert (r["resource_id"], r["value"], r["tenant_id"], r["source"], r["event_time_ms"]) == (
            resource, value, tenant, SOURCE, end_ms), r
        assert r["metadata"]["cluster"] == CLUSTER
        assert r["metadata"]["interval_start_ms"] == str(end_ms - MINUTE)


# ---- publishing ----------------------------------------------------------------------------


def test_good_poll_publishes_exact_records_and_a_repoll_repeats_the_same_ids(
    settings: Settings, fake: FakeRedisEnterprise
) -> None:
    producer = RedisEnterpriseProducer(client_for(fake), publisher_for(settings), tenant="team-a",
                                       interval_seconds=60)
    end = boundary()
    first = producer.poll_once(now_ms=end + 1234)
    again = producer.poll_once(now_ms=end + 59_000)  # the same interval, polled again
    assert first.error is None and first.published and again.published
    assert first.end_ms == again.end_ms == end
    assert first.records == again.records
    check_interval(first.records, end, "team-a")
    # every request carried basic auth, and all four endpoints were read
    assert {p for p, _ in fake.requests} == {"/v1/nodes", "/v1/bdbs", "/v1/shards", "/v1/license"}
    assert all(a and a.startswith("Basic ") for _, a in fake.requests)

    pairs = consume(settings.kafka_bootstrap_servers or "", settings.topic(REDIS_TOPIC), 20)
    assert len(pairs) == 20, "the re-poll publishes the same records again (deduplicated downstream)"
    assert {k for k, _ in pairs} == {b"team-a"}
    by_id: dict[str, dict[str, Any]] = {}
    for _, r in pairs:
        assert by_id.setdefault(r["event_id"], r) == r, "two different records for one event id"
    check_interval(list(by_id.values()), end, "team-a")


FAILURES = {
    # name: (how to break the fake, what the log must say, endpoint named)
    "auth": ("password", "authentication failed (HTTP 401)", "/v1/nodes"),
    "timeout": ("stall", "timed out after 0.5s", "/v1/shards"),
    "not-json": ("raw", "malformed response body (not JSON", "/v1/bdbs"),
    "wrong-shape": ("shape", "malformed response body: nodes[1].total_memory is None", "/v1/nodes"),
    "license-not-object": ("license", "malformed response body: expected a JSON object", "/v1/license"),
    "server-error": ("status", "HTTP 503", "/v1/license"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_poll_logs_the_endpoint_and_publishes_nothing(
    failure: str, settings: Settings, fake: FakeRedisEnterprise, caplog: pytest.LogCaptureFixture
) -> None:
    how, message, path = FAILURES[failure]
    producer = RedisEnterpriseProducer(client_for(fake), publisher_for(settings), tenant="team-b",
                                       interval_seconds=60)
    good_password = fake.password
    docs = fake.documents
    if how == "password":
        fake.password = "rotated"
    elif how == "stall":
        fake.stall[path] = 2.0
    elif how == "raw":
        fake.raw_body[path] = b"<html><body>502 Bad Gateway</body></html>"
    elif how == "shape":
        fake.documents = {**docs, path: [docs[path][0], {"uid": 2, "cores": 8}]}
    elif how == "license":
        fake.documents = {**docs, path: ["not", "an", "object"]}
    elif how == "status":
        fake.status[path] = 503
    bad_end = boundary() - MINUTE
    with caplog.at_level(logging.ERROR, logger="producers.redis_enterprise"):
        bad = producer.poll_once(now_ms=bad_end + 10)
    assert bad.records == [] and not bad.published and bad.error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert f"GET {fake.url}{path}" in errors[0] and message in errors[0], errors[0]
    assert "nothing published" in errors[0]

    # the cluster recovers: the next interval is published, and nothing of the failed one ever was
    fake.password, fake.documents = good_password, docs
    fake.stall.clear()
    fake.raw_body.clear()
    fake.status.clear()
    good = producer.poll_once(now_ms=bad_end + MINUTE + 10)
    assert good.published and len(good.records) == len(EXPECTED)
    pairs = consume(settings.kafka_bootstrap_servers or "", settings.topic(REDIS_TOPIC), len(EXPECTED))
    assert len(pairs) == len(EXPECTED)
    check_interval([r for _, r in pairs], bad_end + MINUTE, "team-b")


def test_tls_is_verified_with_a_ca_file_or_skipped_with_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: sudo apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    fake = FakeRedisEnterprise(ssl_context=ctx).start()
    try:
        assert fake.url.startswith("https://")
        end = boundary()
        verified = RedisEnterpriseProducer(client_for(fake, ca_file=str(cert)), None, tenant="t")
        check_interval(verified.poll_once(now_ms=end).records, end, "t")
        insecure = RedisEnterpriseProducer(client_for(fake, insecure=True), None, tenant="t")
        check_interval(insecure.poll_once(now_ms=end).records, end, "t")
        with caplog.at_level(logging.ERROR, logger="producers.redis_enterprise"):
            unverified = RedisEnterpriseProducer(client_for(fake), None, tenant="t").poll_once(now_ms=end)
        assert unverified.records == []
        assert "TLS certificate verification failed" in caplog.text
        assert f"GET {fake.url}/v1/nodes" in caplog.text and "--ca-file" in caplog.text
    finally:
        fake.stop()


# ---- billing reports (--send-to) and the metric-name hook ----------------------------------


def test_send_to_reports_elapsed_seconds_in_the_ubbagent_shape(
    fake: FakeRedisEnterprise, receiver: ReportReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    producer = RedisEnterpriseProducer(client_for(fake), None, tenant="t", interval_seconds=60,
                                       send_to=receiver.url, metric_name="redis_time")
    e1 = boundary() - 3 * MINUTE
    assert producer.poll_once(now_ms=e1 + 5).report_sent
    receiver.status = 503  # the billing endpoint is down for one interval
    with caplog.at_level(logging.ERROR, logger="producers.redis_enterprise"):
        down = producer.poll_once(now_ms=e1 + MINUTE + 5)
    assert not down.report_sent and f"report to {receiver.url} answered HTTP 503" in caplog.text
    receiver.status = 200
    assert producer.poll_once(now_ms=e1 + 2 * MINUTE + 5).report_sent
    assert not producer.poll_once(now_ms=e1 + 2 * MINUTE + 30_000).report_sent  # same interval
    assert len(receiver.reports) == 2
    for report in receiver.reports:
        assert set(report) == {"name", "startTime", "endTime", "value"}
        assert ISO.match(report["startTime"]) and ISO.match(report["endTime"])
        assert set(report["value"]) == {"int64Value"} and isinstance(report["value"]["int64Value"], int)
    first, second = receiver.reports
    assert first == {"name": "redis_time", "startTime": iso(e1 - MINUTE), "endTime": iso(e1),
                     "value": {"int64Value": 60}}
    # the interval the endpoint refused is covered by the next report: elapsed since the last accepted
    assert second == {"name": "redis_time", "startTime": iso(e1), "endTime": iso(e1 + 2 * MINUTE),
                      "value": {"int64Value": 120}}


TIERS = '''
def infer_metric_name(values: dict) -> str:
    """A pricing tier from the cluster's size."""
    return "shards-small" if values["shards_used"] <= 4 else "shards-large"
'''


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser_args(p)
    return p.parse_args(argv)


def test_infer_metric_module_names_the_report_and_tags_the_records(
    settings: Settings, fake: FakeRedisEnterprise, receiver: ReportReceiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    tiers = tmp_path / "tiers.py"
    tiers.write_text(TIERS)
    monkeypatch.setenv("REDIS_ENTERPRISE_PASSWORD", fake.password)  # credentials from the env
    args = parse([
        "--url", fake.url, "--username", fake.username, "--namespace", "team-c", "--once",
        "--send-to", receiver.url, "--report-value", "shards_used",
        "--infer-metric-name", "--infer-metric-module", str(tiers),
    ])
    run_from_args(settings, args)  # the CLI path: one poll, published to Kafka, reported
    assert "published 10 records" in capsys.readouterr().out
    assert len(receiver.reports) == 1
    report = receiver.reports[0]
    assert report["name"] == "shards-small" and report["value"] == {"int64Value": 3}
    pairs = consume(settings.kafka_bootstrap_servers or "", settings.topic(REDIS_TOPIC), len(EXPECTED))
    assert len(pairs) == len(EXPECTED)
    assert {r["tenant_id"] for _, r in pairs} == {"team-c"}
    assert {r["metadata"]["billing_metric"] for _, r in pairs} == {"shards-small"}

    # a dotted module path works too, and the hook sees the cluster's values
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tiers_big.py").write_text(TIERS.replace("<= 4", "<= 2"))
    args = parse(["--url", fake.url, "--username", fake.username, "--send-to", receiver.url,
                  "--report-value", "node_memory_bytes", "--infer-metric-name",
                  "--infer-metric-module", "tiers_big"])
    report = producer_from_args(args, None).poll_once().report
    assert report is not None
    assert (report["name"], report["value"]) == ("shards-large", {"int64Value": 6260334592 + 8589934592})


def test_a_failing_hook_sends_no_report_and_bad_options_fail_fast(
    fake: FakeRedisEnterprise, receiver: ReportReceiver, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def infer_metric_name(values):\n    return values['no_such_value']\n")
    args = parse(["--url", fake.url, "--username", fake.username, "--password", fake.password,
                  "--send-to", receiver.url, "--infer-metric-name", "--infer-metric-module", str(broken)])
    with caplog.at_level(logging.ERROR, logger="producers.redis_enterprise"):
        result = producer_from_args(args, None).poll_once()
    assert "infer_metric_name" in caplog.text and "KeyError" in caplog.text
    assert result.report is None and receiver.reports == []
    assert len(result.records) == len(EXPECTED)  # usage is still metered, just not reported
    assert all("billing_metric" not in r["metadata"] for r in result.records)

    base = ["--url", fake.url, "--username", fake.username, "--password", "x"]
    monkeypatch.delenv("REDIS_ENTERPRISE_USERNAME", raising=False)
    monkeypatch.delenv("REDIS_ENTERPRISE_PASSWORD", raising=False)
    for argv, message in [
        (base + ["--infer-metric-name"], "needs --infer-metric-module"),
        (base + ["--infer-metric-module", str(broken)], "only used with --infer-metric-name"),
        (base + ["--infer-metric-name", "--infer-metric-module", str(tmp_path / "nope.py")], "no such file"),
        (["--url", fake.url], "needs --username and --password"),
        (base + ["--ca-file", str(tmp_path / "missing.pem")], "--ca-file"),
        (base + ["--interval", "0"], "--interval"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            producer_from_args(parse(argv), None)


# ---- simulator -----------------------------------------------------------------------------


def test_simulator_is_deterministic_and_speaks_the_documented_shapes(fake: FakeRedisEnterprise) -> None:
    start = boundary() - 10 * MINUTE

    def records(seed: int) -> list[dict[str, Any]]:
        return [r for batch in RedisEnterpriseSimulator(seed=seed).run(start, 10) for r in batch]

    a, b, c = records(7), records(7), records(8)
    assert a == b and a != c
    assert {r["metric"] for r in a} == {"node_memory_bytes", "node_cpu_cores", "shards_used",
                                       "shards_max", "db_memory_bytes", "db_shards"}
    assert len({r["event_id"] for r in a}) == len(a)
    # the producer reads the simulator's documents through HTTP exactly as the simulator does
    sim = RedisEnterpriseSimulator(seed=3)
    fake.documents = sim.documents(0)
    end = boundary()
    polled = RedisEnterpriseProducer(client_for(fake), None, tenant=sim.state[0].tenant).poll_once(end)
    assert parse_snapshot(sim.documents(0)).license.cluster_name == sim.state[0].name
    assert polled.records == build_records(parse_snapshot(sim.documents(0)), cluster=sim.state[0].name,
                                           tenant=sim.state[0].tenant, start_ms=end - MINUTE, end_ms=end)
