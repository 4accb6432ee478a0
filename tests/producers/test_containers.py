"""The container producer against a real Prometheus, a real exporter and a real Tansu broker.

The module's Prometheus (Debian's ``prometheus``, private config and TSDB, free loopback
port) scrapes, every second, :class:`~tests.producers.exporter.Exporter`: an HTTP server in
the test serving cAdvisor series whose values the test sets. The test counts the exporter's
true increase (resets included) and asserts that the CPU seconds published to
``usage.containers`` equal it exactly, as decimals; the exporter answers 500 for a few
scrapes to make Prometheus miss them, and the gap must be reported, not filled. The direct
``/metrics`` scrape path is tested against the exporter too. Nothing is mocked.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import pytest

from metering.config import Settings
from metering.embedded.ports import free_port
from metering.embedded.prometheus import PrometheusServer
from metering.errors import ConfigError, EmbeddedServerError
from producers.containers import (
    CONTAINERS_TOPIC,
    GAP_METRIC,
    SOURCE,
    START_TIME,
    CadvisorSource,
    ContainerCollector,
    ContainerProducer,
    PrometheusSource,
    Sample,
    build_parser_args,
    parse_exposition,
    producer_from_args,
    run_from_args,
    sample,
)
from producers.publisher import EnvelopePublisher
from producers.simulators.containers import ContainerSimulator, render_exposition
from streams.normalize import invalid_reason
from tests.producers.exporter import Exporter, key
from tests.producers.kafka_reader import consume

pytestmark = pytest.mark.integration

CPU = "container_cpu_usage_seconds_total"
MEM = "container_memory_usage_bytes"
RX = "container_network_receive_bytes_total"


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    ex = Exporter().start()
    yield ex
    ex.stop()


@pytest.fixture(scope="module")
def prometheus(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Debian's prometheus scraping the exporter every second (fails, never skips, when absent)."""
    server = PrometheusServer([exporter.target], root=tmp_path_factory.mktemp("prometheus"),
                              scrape_interval=1.0)
    try:
        server.start()
        server.wait_scraped()
    except EmbeddedServerError as exc:
        server.stop()
        pytest.fail(str(exc))
    yield server
    server.stop()


def publisher_for(settings: Settings) -> EnvelopePublisher:
    return EnvelopePublisher(settings.kafka_bootstrap_servers or "", settings.topic(CONTAINERS_TOPIC),
                             source=SOURCE)


def now_ms() -> int:
    return int(time.time() * 1000)


def wait_ingested(prom: PrometheusServer, name: str, labels: Mapping[str, str], value: str,
                  timeout: float = 20.0) -> None:
    """Block until Prometheus' latest sample of the series is ``value`` (so it was stored)."""
    selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = prom.query(selector)["result"]
        last = result[0]["value"][1] if result else None
        if last is not None and Decimal(last) == Decimal(value):
            return
        time.sleep(0.1)
    raise TimeoutError(f"prometheus never stored {selector} = {value} (latest: {last})")


class Truth:
    """The exporter's true increase per series, as ``increase()`` defines it (reset: the new value)."""

    def __init__(self) -> None:
        self.last: dict[Any, Decimal] = {}
        self.total: dict[Any, Decimal] = defaultdict(Decimal)

    def observe(self, series: Any, value: str, *, from_zero: bool = False) -> None:
        v = Decimal(value)
        prev = self.last.get(series)
        if prev is not None:
            self.total[series] += v - prev if v >= prev else v
        elif from_zero:
            self.total[series] += v
        self.last[series] = v


def sums(records: list[dict[str, Any]], metric: str) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for r in records:
        if r["metric"] == metric:
            out[r["resource_id"]] += r["value"]
    return dict(out)


# ---- against a real Prometheus -------------------------------------------------------------


def test_prometheus_cpu_seconds_are_the_exact_true_increase_through_resets_and_a_gap(
    settings: Settings, exporter: Exporter, prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tag = uuid.uuid4().hex[:10]  # this test's series only (the label selector)
    a = {"test": tag, "namespace": "team-a", "pod": "web-1", "container": "app", "id": "/kubepods/web-1/aaa"}
    b = {"test": tag, "namespace": "team-b", "pod": "db-1", "container": "pg", "id": "/kubepods/db-1/bbb"}
    c = {"test": tag, "namespace": "team-c", "pod": "job-1", "container": "worker", "id": "/kubepods/job-1/c"}
    d = {"test": tag, "namespace": "team-c", "pod": "job-2", "container": "worker", "id": "/kubepods/job-2/d"}
    # series that must never be billed: per-CPU, the pause container, the pod-level cgroup,
    # a system cgroup without a namespace, and another test's series
    ignored = [
        key(CPU, {**a, "cpu": "cpu0"}),
        key(CPU, {**a, "id": "/kubepods/web-1/pause", "container": "POD", "cpu": "total"}),
        key(CPU, {"test": tag, "namespace": "team-a", "pod": "web-1", "id": "/kubepods/web-1",
                  "cpu": "total"}),
        key(CPU, {"test": tag, "id": "/system.slice/docker.service", "cpu": "total"}),
        key(CPU, {**a, "test": "other", "cpu": "total"}),
    ]
    cpu_a, cpu_b = key(CPU, {**a, "cpu": "total"}), key(CPU, {**b, "cpu": "total"})
    cpu_c, cpu_d = key(CPU, {**c, "cpu": "total"}), key(CPU, {**d, "cpu": "total"})
    rx_a = key(RX, {**a, "interface": "eth0"})
    mem_a, mem_b = "268435456", "1073741824"
    truth = Truth()

    def step(values: dict[Any, str], *, from_zero: tuple[Any, ...] = ()) -> None:
        """Serve new values (ignored series move too) and wait until Prometheus stored them."""
        for i, k in enumerate(ignored):
            values.setdefault(k, str(Decimal(values.get(cpu_a, "1")) + 100 + i))
        exporter.update(values)
        for k, v in values.items():
            if k[0] in (CPU, RX) and k not in ignored:
                truth.observe(k, v, from_zero=k in from_zero)
        wait_ingested(prometheus, CPU, dict(cpu_a[1]), values.get(cpu_a) or str(truth.last[cpu_a]))

    step({cpu_a: "100.125", cpu_b: "7.5", rx_a: "1000", key(MEM, a): mem_a, key(MEM, b): mem_b})
    collector = ContainerCollector(resolution_seconds=1, label_name="test", label_value=tag)
    source = PrometheusSource(prometheus.url, label_name="test", label_value=tag,
                              initial_lookback_seconds=5, overlap_seconds=2)
    producer = ContainerProducer(source, collector, publisher_for(settings))
    published = producer.poll_once()  # baselines: nothing counted yet
    assert [r for r in published if r["metric"] == "cpu_seconds" and r["value"]] == []

    step({cpu_a: "100.5", cpu_b: "7.875"})
    started = str(Decimal(now_ms()) / 1000)
    step({cpu_a: "101.375", rx_a: "1500",
          # C started after the collector: its first sample counts from zero
          cpu_c: "2.5", key(START_TIME, c): started, key(MEM, c): "1000",
          # D has run for an hour: its first sample is a baseline
          cpu_d: "50.0", key(START_TIME, d): str(Decimal(started) - 3600)},
         from_zero=(cpu_c,))
    step({cpu_a: "102.0", cpu_c: "3.0", cpu_d: "50.75"})
    step({cpu_a: "0.25", rx_a: "200"})  # the container restarted in place: counters reset
    step({cpu_a: "1.125"})
    published += producer.poll_once()

    # Prometheus misses at least three scrapes while the counter goes on
    exporter.set_status(500)
    gap_from = now_ms()
    exporter.wait_failed(3)
    exporter.update({cpu_a: "3.5"})
    exporter.set_status(200)
    gap_to = now_ms()
    truth.observe(cpu_a, "3.5")
    wait_ingested(prometheus, CPU, dict(cpu_a[1]), "3.5")
    step({cpu_a: "4.0", cpu_b: "8.0"})
    time.sleep(3.2)  # let every step with a change close (steps close 2 x resolution late)
    with caplog.at_level(logging.WARNING, logger="producers.containers"):
        published += producer.poll_once()
    published += producer.poll_once()  # an immediate re-poll adds nothing twice

    # what reached Kafka is what the producer returned, once each
    pairs = consume(settings.kafka_bootstrap_servers or "", settings.topic(CONTAINERS_TOPIC), len(published))
    records = [r for _, r in pairs]
    assert len(records) == len(published) and len({r["event_id"] for r in records}) == len(records)
    assert sorted(records, key=lambda r: r["event_id"]) == sorted(published, key=lambda r: r["event_id"])
    for k, r in pairs:
        assert k.decode() == r["tenant_id"] and r["source"] == SOURCE
        assert invalid_reason(r, now_ms()) is None

    res = {"a": "team-a/web-1/app", "b": "team-b/db-1/pg", "c": "team-c/job-1/worker",
           "d": "team-c/job-2/worker"}
    cpu = sums(records, "cpu_seconds")
    assert cpu == {
        res["a"]: truth.total[cpu_a], res["b"]: truth.total[cpu_b],
        res["c"]: truth.total[cpu_c], res["d"]: truth.total[cpu_d],
    }
    assert cpu[res["a"]] == Decimal("5.875") and cpu[res["c"]] == Decimal("3.0")  # by hand, too
    assert cpu[res["d"]] == Decimal("0.75")
    assert sums(records, "network_rx_bytes") == {res["a"]: Decimal(700)}
    assert {r["resource_id"] for r in records} == set(res.values())
    assert {(r["resource_id"], r["tenant_id"]) for r in records} == {
        (res["a"], "team-a"), (res["b"], "team-b"), (res["c"], "team-c"), (res["d"], "team-c")}
    assert collector.resets >= 2

    # the missed scrapes are reported as a gap covering them, and a warning names it
    gaps = [r for r in records if r["metric"] == GAP_METRIC and r["resource_id"] == res["a"]]
    assert any(int(g["metadata"]["gap_start_ms"]) <= gap_from and int(g["metadata"]["gap_end_ms"]) >= gap_to
               for g in gaps), (gaps, gap_from, gap_to)
    for g in gaps:
        span = int(g["metadata"]["gap_end_ms"]) - int(g["metadata"]["gap_start_ms"])
        assert g["value"] == Decimal(span) / 1000 and span > 2500
    assert "scrape gap" in caplog.text and res["a"] in caplog.text

    # memory: 1 s x the gauge per step, and no step inside a gap is filled
    mem = [r for r in records if r["metric"] == "memory_byte_seconds" and r["resource_id"] == res["a"]]
    assert len(mem) >= 5 and {r["value"] for r in mem} == {Decimal(mem_a)}
    for g in gaps:
        lo, hi = int(g["metadata"]["gap_start_ms"]), int(g["metadata"]["gap_end_ms"])
        assert not [r for r in mem if lo <= r["event_time_ms"] < hi]
    # exactly one record per whole second g between two stored samples less than 2.5 s apart,
    # from the first sample the producer saw to the last step it closed
    raw = prometheus.query(f'{MEM}{{test="{tag}",pod="web-1",container="app"}}[120s]')["result"]
    stamps = [int(Decimal(repr(t)) * 1000) for t, _ in raw[0]["values"]]
    closed = collector.closed_upto_ms or 0
    steps = sorted(r["event_time_ms"] for r in mem)
    grid = {g for p, n in zip(stamps, stamps[1:], strict=False) if n - p <= 2500
            for g in range(-(-p // 1000) * 1000, n, 1000) if steps[0] <= g <= closed}
    assert steps == sorted(grid)


def test_prometheus_errors_are_logged_and_nothing_is_published(
    exporter: Exporter, prometheus: PrometheusServer, caplog: pytest.LogCaptureFixture
) -> None:
    collector = ContainerCollector(resolution_seconds=1)
    down = PrometheusSource(f"http://127.0.0.1:{free_port()}")
    not_prometheus = PrometheusSource(exporter.url.removesuffix("/metrics"))
    with caplog.at_level(logging.ERROR, logger="producers.containers"):
        assert ContainerProducer(down, collector, None).poll_once() == []
        assert ContainerProducer(not_prometheus, collector, None).poll_once() == []
    assert f"GET {down.endpoint}: ConnectError" in caplog.text
    assert f"GET {not_prometheus.endpoint}: HTTP 200, body is not JSON" in caplog.text
    assert collector.closed_upto_ms is None  # a failed poll closes no step
    # label values are quoted for PromQL: a quote in the value is a valid query that matches nothing
    odd = PrometheusSource(prometheus.url, label_name="test", label_value='we"ird\\')
    assert odd.fetch(now_ms()) == []


# ---- scraping cAdvisor's /metrics directly -------------------------------------------------


@pytest.mark.parametrize("with_timestamps", [False, True], ids=["scrape-time", "cadvisor-timestamps"])
def test_direct_cadvisor_scrape_counts_resets_and_reports_gaps(
    with_timestamps: bool, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    ex = Exporter().start()
    try:
        labels = {"tenant": "acme", "name": "web", "id": "/docker/abc", "image": "web:1"}
        cpu = key(CPU, {**labels, "cpu": "total"})
        mem = key(MEM, labels)
        t0 = now_ms() // 1000 * 1000 - 60_000
        collector = ContainerCollector(resolution_seconds=1, tenant_label="tenant", started_at_ms=t0)
        producer = ContainerProducer(CadvisorSource(ex.url), collector, publisher_for(settings))
        truth = Truth()
        published: list[dict[str, Any]] = []
        sample_ts: list[int] = []
        plan = ["10.5", "11.25", "12.0", "0.5", "1.0", None, None, None, "2.5", "3.0", "3.0", "3.0",
                "3.0", "3.0", "3.0"]
        with caplog.at_level(logging.WARNING, logger="producers.containers"):
            for i, value in enumerate(plan):
                t = t0 + i * 1000 + 7  # scrape time, with a little jitter
                ex.set_status(500 if value is None else 200)
                if value is not None:
                    ex.update({cpu: value, mem: "104857600"})
                    truth.observe(cpu, value)
                if with_timestamps:
                    ex.timestamp_ms = t - 300  # cAdvisor stamps samples when it collected them
                if value is not None:
                    sample_ts.append(t - 300 if with_timestamps else t)
                last_poll = t + (300 if with_timestamps else 0)
                published += producer.poll_once(now_ms=last_poll)
        assert "HTTP 500" in caplog.text and "nothing published this poll" in caplog.text
        pairs = consume(settings.kafka_bootstrap_servers or "", settings.topic(CONTAINERS_TOPIC),
                        len(published))
        records = [r for _, r in pairs]
        assert len(records) == len(published)
        assert sums(records, "cpu_seconds") == {"web": truth.total[cpu]} == {"web": Decimal("4.5")}
        assert {r["tenant_id"] for r in records} == {"acme"}
        [gap] = [r for r in records if r["metric"] == GAP_METRIC]
        start = t0 + 4 * 1000 + 7 - (300 if with_timestamps else 0)
        assert (gap["value"], gap["metadata"]["gap_start_ms"], gap["metadata"]["gap_end_ms"]) == (
            Decimal(4), str(start), str(start + 4000))
        assert "scrape gap of 4s" in caplog.text
        mem_steps = sorted(r["event_time_ms"] for r in records if r["metric"] == "memory_byte_seconds")
        assert all(r["value"] == Decimal(104857600) for r in records if r["metric"] == "memory_byte_seconds")
        assert not [s for s in mem_steps if start <= s < start + 4000]
        # one record per grid point g (whole seconds) between two samples less than 2.5 s apart,
        # for the steps closed by the last poll (2 s behind it)
        closed = (last_poll - 2000) // 1000 * 1000
        grid = {g for p, n in zip(sample_ts, sample_ts[1:], strict=False) if n - p <= 2500
                for g in range(-(-p // 1000) * 1000, n, 1000) if g <= closed}
        assert mem_steps == sorted(grid) and len(grid) >= 8
    finally:
        ex.stop()


# ---- the collector on its own --------------------------------------------------------------


def cpu_sample(ts: int, value: str, **labels: str) -> Sample:
    return sample(CPU, {"namespace": "ns", "pod": "p", "container": "c", "cpu": "total", **labels}, ts, value)


def test_collector_exactness_first_samples_and_idempotence() -> None:
    res = 15_000
    coll = ContainerCollector(resolution_seconds=15, started_at_ms=1_000_000)
    # 0.1 + 0.2 as floats is 0.30000000000000004; as decimals it is 0.3
    samples = [cpu_sample(990_000 + i * res, v) for i, v in enumerate(["5", "5.1", "5.3", "5.6"])]
    out = coll.collect(samples, now_ms=2_000_000)
    again = coll.collect(samples + samples[:2], now_ms=2_000_000)  # an overlapping window
    assert again == []
    assert sum(r["value"] for r in out) == Decimal("0.6") and len(out) == 3
    assert [r["event_time_ms"] for r in out] == [1_005_000, 1_020_000, 1_035_000]
    assert out[0]["event_id"] == "containers:ns/p/c:cpu_seconds:1005000"

    # new series: a baseline, unless the container started after the collector did
    def start(ms: int, pod: str) -> Sample:
        return sample(START_TIME, {"namespace": "ns", "pod": pod, "container": "c"}, ms, Decimal(ms) / 1000)

    fresh = [start(1_500_000, "new"), cpu_sample(1_510_000, "2.5", pod="new")]
    old = [start(900_000, "old"), cpu_sample(1_510_000, "9.5", pod="old")]
    out = coll.collect(fresh + old, now_ms=3_000_000)
    assert sums(out, "cpu_seconds") == {"ns/new/c": Decimal("2.5")}
    assert out[0]["metadata"]["counted_from"] == "container_start"
    assert coll.forget(older_than_ms=1_200_000) == 1  # only the first series went silent


def test_collector_gap_tolerance_and_memory_integration() -> None:
    coll = ContainerCollector(resolution_seconds=15)
    mem = lambda ts, v: sample(MEM, {"namespace": "ns", "name": "m"}, ts, v)  # noqa: E731
    # one missed scrape (with jitter) is not a gap and is held; two are a gap, not filled
    samples = [mem(0, "10"), mem(15_010, "20"), mem(45_049, "30"), mem(90_020, "40"), mem(105_000, "50")]
    out = coll.collect(samples, now_ms=10**6)
    gaps = [r for r in out if r["metric"] == GAP_METRIC]
    assert [(g["metadata"]["gap_start_ms"], g["metadata"]["gap_end_ms"], g["value"]) for g in gaps] == [
        ("45049", "90020", Decimal("44.971"))]
    steps = {r["event_time_ms"]: r["value"] for r in out if r["metric"] == "memory_byte_seconds"}
    # grid 0, 15 000 <- 10; 30 000, 45 000 <- 20 (held over one missed scrape); 60 000 to 90 000
    # fall in the gap and stay empty; 105 000 is the last sample's own time: it waits for the next
    assert steps == {0: 150, 15_000: 150, 30_000: 300, 45_000: 300}


def test_collector_late_samples_move_forward_and_filters_apply() -> None:
    coll = ContainerCollector(resolution_seconds=1)
    assert coll.collect([cpu_sample(1_000, "1"), cpu_sample(2_000, "2")], now_ms=10_000)
    # a sample ingested after its step closed is added to the first open step, not lost
    out = coll.collect([cpu_sample(3_500, "4")], now_ms=10_000)  # step 4000 is closed already
    assert out == [] and coll.moved_late == 1
    out = coll.collect([], now_ms=20_000)
    assert [(r["event_time_ms"], r["value"]) for r in out] == [(9_000, Decimal(2))]

    ignored = [
        cpu_sample(1_000, "1", cpu="cpu1"),  # per-CPU series
        cpu_sample(1_000, "1", container="POD"),  # pause container
        sample(CPU, {"namespace": "ns", "pod": "p", "cpu": "total"}, 1_000, "1"),  # pod-level cgroup
        sample(CPU, {"id": "/", "cpu": "total"}, 1_000, "1"),  # no tenant label
    ]
    coll = ContainerCollector(resolution_seconds=1, label_name="team", label_value="x")
    coll.ingest(ignored + [cpu_sample(1_000, "1")])  # the last one lacks team="x"
    coll.ingest([s._replace(ts_ms=2_000, value=Decimal(5)) for s in ignored])
    assert coll.drain(10_000) == []


# ---- exposition parsing, simulator, command line -------------------------------------------


def test_simulator_is_deterministic_and_its_records_are_valid() -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        sim = ContainerSimulator(seed=seed, reset_probability=0.05, restart_probability=0.05,
                                 miss_probability=0.05)
        return [r for batch in sim.run(1_700_000_000_000, 200) for r in batch]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert {r["metric"] for r in a} == {"cpu_seconds", "memory_byte_seconds", "network_rx_bytes",
                                       "network_tx_bytes", "disk_read_bytes", "disk_write_bytes", GAP_METRIC}
    assert len({r["event_id"] for r in a}) == len(a)
    assert all(invalid_reason(r, r["event_time_ms"]) is None for r in a)
    # the text the simulator renders parses back to the same samples (timestamps and all)
    scraped = ContainerSimulator(seed=5).scrape(1_700_000_000_000)
    text = render_exposition(scraped, with_timestamps=True)
    assert sorted(parse_exposition(text, 0)) == sorted(scraped)
    shuffled = scraped[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(parse_exposition(render_exposition(shuffled, with_timestamps=True), 0)) == sorted(scraped)


def test_run_from_args_once_scrapes_and_publishes(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = Exporter().start()
    try:
        ex.update({key(CPU, {"namespace": "ns", "name": "x", "cpu": "total"}): "1.5"})
        p = argparse.ArgumentParser()
        build_parser_args(p)
        run_from_args(settings, p.parse_args(["--cadvisor-url", ex.url, "--resolution", "1", "--once"]))
        assert "containers: published 0 records" in capsys.readouterr().out  # a first scrape: baselines
        assert ex.served_ok == 1
    finally:
        ex.stop()


def test_command_line_options() -> None:
    p = argparse.ArgumentParser()
    build_parser_args(p)
    producer, period = producer_from_args(p.parse_args(["--cadvisor-url", "http://node:8080",
                                                        "--resolution", "15", "--interval", "60"]), None)
    assert isinstance(producer.source, CadvisorSource) and period == 15
    assert producer.source.endpoint == "http://node:8080/metrics"
    producer, period = producer_from_args(p.parse_args(["--label-name", "team", "--label-value", "x",
                                                        "--tenant-label", "team"]), None)
    assert isinstance(producer.source, PrometheusSource) and period == 60
    assert producer.source.selector().endswith(',team="x"}')
    assert producer.collector.tenant_label == "team"
    for argv in (["--label-name", "team"], ["--resolution", "0"], ["--resolution", "0.0001"]):
        with pytest.raises(ConfigError):
            producer_from_args(p.parse_args(argv), None)
