"""The quota agent on the real broker, in a real worker process: limits from the quota file and
``quota.limits``, alerts on ``quota.alerts`` fired once across a crash between an acknowledged
alert and its table write, a SIGKILL and restarts, repeated and other-size windows, a lowered
limit, dead letters, and the live views.

Run as ``python -m tests.streams.test_quota_agent`` this module is the worker itself: the
stream worker of ``streams.worker.build_worker`` plus the quota agent and the views when
``build_worker`` does not install them (yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from metering import topics
from metering.config import Settings
from metering.quota_cli import ensure_quota_topics, list_limits, remove_limit, set_limit
from producers import EnvelopePublisher, usage_record
from schemas import dead_letter_codec, window_codec
from tests.topic_reader import alerts, read_all
from tests.workers import ChildProcess, get_json, worker_env

pytestmark = pytest.mark.integration

MIN = 60_000
T0 = 1_715_328_000_000  # 2024-05-10 08:00 UTC
DAY0 = 1_715_299_200_000  # 2024-05-10 00:00 UTC
MONTH0 = 1_714_521_600_000  # 2024-05-01 00:00 UTC


def window(i: int, cpu: str, score: str, size: int = MIN, tenant: str = "acme") -> bytes:
    start = T0 + i * size
    return window_codec().encode({
        "window_id": f"{tenant}|{start}|{size}", "tenant_id": tenant, "window_start_ms": start,
        "window_end_ms": start + size,
        "totals": [{"metric": "cpu_time_nanos", "aggregation": "sum", "value": Decimal(cpu), "samples": 3},
                   {"metric": "memory_usage_bytes", "aggregation": "resource_mean",
                    "value": Decimal("1000"), "samples": 3}],
        "sample_count": 6, "score": Decimal(score), "late_samples": 0, "has_gap": False,
    })


def produce(s: Settings, *values: bytes, tenant: str = "acme") -> None:
    p = Producer({"bootstrap.servers": s.kafka_bootstrap_servers, "partitioner": "murmur2_random",
                  "acks": "all", "log_level": 4})
    for v in values:
        p.produce(s.topic(topics.WINDOWS), key=tenant.encode(), value=v)
    assert p.flush(30) == 0


def wait_alerts(s: Settings, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    got = alerts(s)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        got = alerts(s)
    return got


class Worker(ChildProcess):
    """This module run as a worker process (same data directory on every start)."""

    def __init__(self, s: Settings, workdir: Path, quota_file: Path) -> None:
        super().__init__()
        self.s, self.workdir, self.quota_file = s, workdir, quota_file
        self.log = workdir / "worker.log"
        self.port = 0

    def start(self, **extra: str) -> Worker:
        env = worker_env(self.s, WORKER_DATADIR=str(self.workdir / "data"), QUOTA_FILE=str(self.quota_file),
                         **extra)
        self.port = int(env["WORKER_WEB_PORT"])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.streams.test_quota_agent"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def get(self, path: str, timeout: float = 45) -> dict[str, Any]:
        return get_json(self.port, path, timeout)

    def wait_quota(self, tenant: str, check: Any, timeout: float = 45) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.get(f"/tenants/{tenant}/quota")
            if check(got):
                return got
            assert time.monotonic() < deadline, f"quota view never matched: {got}"
            time.sleep(0.5)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)



def rows(view: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["metric"], r["period"]): r for r in view["quotas"]}


def test_alerts_fire_once_across_a_crash_restarts_and_repeated_windows(
        settings: Settings, tmp_path: Path) -> None:
    s = settings
    ensure_quota_topics(s)  # quota.limits (compacted) is not in metering.topics.ALL_TOPICS yet
    quota_file = tmp_path / "quotas.toml"
    quota_file.write_text('[[limits]]\ntenant = "acme"\nmetric = "cpu_time_nanos"\nperiod = "day"\n'
                          'limit = "1000"\n')
    set_limit(s, "acme", "score", "month", "10", [50])
    assert [(x.metric, x.source) for x in list_limits(s, quota_file=str(quota_file))] == [
        ("cpu_time_nanos", "file"), ("score", "topic")]
    w = Worker(s, tmp_path, quota_file)
    try:
        # 1. windows 0..3 (cpu 300 and score 2 each), an hour window (not counted), window 1
        #    again (a re-emission), and garbage; the worker dies right after the alerts are
        #    acknowledged, before the table records them
        produce(s, window(0, "300", "2"), window(0, "99999", "99", size=60 * MIN), window(1, "300", "2"),
                window(2, "300", "2"), window(1, "300", "2"), window(3, "300", "2"), b"not avro")
        w.start(QUOTA_TEST_CRASH_AFTER_ALERTS="1")
        assert w.wait_exit() == 9, "the worker did not crash where the test wanted it to"
        before = alerts(s)
        assert before, "no alert was acknowledged before the crash"

        # 2. restart: the alerts are read back, the windows processed again, nothing re-sent
        w.start()
        view = w.wait_quota("acme", lambda v: rows(v).get(("cpu_time_nanos", "day"), {}).get("used")
                            == "1200.000000000")
        got = alerts(s)
        assert sorted(a["alert_id"] for a in got) == sorted([
            f"acme|cpu_time_nanos|day|{DAY0}|80", f"acme|cpu_time_nanos|day|{DAY0}|100",
            f"acme|score|month|{MONTH0}|50"])
        by_id = {a["alert_id"]: a for a in got}
        a80 = by_id[f"acme|cpu_time_nanos|day|{DAY0}|80"]
        assert (a80["used"], a80["limit"], a80["crossed_at_window_end_ms"]) == (
            Decimal("900"), Decimal("1000"), T0 + 3 * MIN)
        assert by_id[f"acme|cpu_time_nanos|day|{DAY0}|100"]["crossed_at_window_end_ms"] == T0 + 4 * MIN
        assert by_id[f"acme|score|month|{MONTH0}|50"]["used"] == Decimal("6")
        cpu = rows(view)[("cpu_time_nanos", "day")]
        assert (cpu["limit"], cpu["limit_source"], cpu["fired_thresholds"]) == (
            "1000.000000000", "file", [80, 100])
        assert view["not_quotable_metrics"] == {"memory_usage_bytes": "resource_mean"}

        # 3. a lowered limit with a new threshold fires on the next window; 80 and 100 do not again
        set_limit(s, "acme", "cpu_time_nanos", "day", "500", [80, 100, 300])
        w.wait_quota("acme", lambda v: rows(v)[("cpu_time_nanos", "day")]["limit"] == "500.000000000")
        produce(s, window(4, "300", "2"))
        got = wait_alerts(s, 4)
        a300 = [a for a in got if a["threshold_percent"] == 300]
        assert [(a["used"], a["crossed_at_window_end_ms"]) for a in a300] == [(Decimal("1500"), T0 + 5 * MIN)]

        # 4. the live usage of open windows, from the windows agent's state
        pub = EnvelopePublisher(str(s.kafka_bootstrap_servers), s.topic(topics.SOURCE_TOPICS["vm"]),
                                source="vm")
        now = int(time.time() * 1000)
        pub.send([usage_record(event_id="u1", tenant_id="viewer", source="vm", resource_id="vm-1",
                               metric="cpu_time_nanos", value="2500000000.5", event_time_ms=now)])
        pub.flush()
        del pub  # releases the librdkafka client before the session's broker stops
        deadline = time.monotonic() + 30
        while not (usage := w.get("/tenants/viewer/usage"))["open_windows"]:
            assert time.monotonic() < deadline, usage
            time.sleep(0.5)
        assert {x["metrics"]["cpu_time_nanos"]["value"] for x in usage["open_windows"]} == {
            "2500000000.500000000"}

        # 5. SIGKILL and restart, then a repeated and a new window: no alert again
        w.kill()
        w.start()
        produce(s, window(3, "300", "2"), window(5, "300", "2"))
        w.wait_quota("acme", lambda v: rows(v).get(("cpu_time_nanos", "day"), {}).get("used")
                     == "1800.000000000")
        time.sleep(1.0)
        counts = Counter(a["alert_id"] for a in alerts(s))
        assert len(counts) == 4 and set(counts.values()) == {1}, counts
        # dead letters are at-least-once (the batch before the crash is processed again), and
        # carry the source coordinates that identify them
        dead = [dead_letter_codec().decode(m.value()) for m in read_all(s, topics.DLQ, idle=0.5)]
        assert {(d["stage"], d["payload"], d["source_topic"], d["source_offset"]) for d in dead} == {
            ("quota", b"not avro", s.topic(topics.WINDOWS), 6)}
    finally:
        w.stop()
    log = w.log.read_text()
    assert "read back" in log and "failed; dead-lettering" not in log


def test_cli_set_remove_and_list_limits(settings: Settings, tmp_path: Path) -> None:
    s = settings
    ensure_quota_topics(s)
    quota_file = tmp_path / "quotas.toml"
    quota_file.write_text('[[limits]]\ntenant = "*"\nmetric = "score"\nperiod = "day"\nlimit = 5\n')

    def listed() -> list[tuple[str, str, str, str, str]]:
        return [(x.tenant, x.metric, x.period, str(x.limit), x.source)
                for x in list_limits(s, quota_file=str(quota_file))]

    set_limit(s, "acme", "cpu_time_nanos", "month", "1e6")
    set_limit(s, "*", "score", "day", "7.5", [90])  # overrides the file's default
    assert listed() == [("*", "score", "day", "7.500000000", "topic"),
                        ("acme", "cpu_time_nanos", "month", "1000000.000000000", "topic")]
    remove_limit(s, "*", "score", "day", fallback=True)  # tombstone: the file's limit again
    remove_limit(s, "acme", "cpu_time_nanos", "month")  # a record without limit
    assert listed() == [("*", "score", "day", "5.000000000", "file")]
    remove_limit(s, "*", "score", "day")  # hides the file's limit too
    assert listed() == []


def _run_worker() -> None:  # pragma: no cover - runs in the worker process
    """The stream worker with the quota agent and the views, as the patched worker will be."""
    import faust

    from metering.config import load_settings
    from streams.quota_agent import QUOTA_TABLE, install_quota_agent
    from streams.topics import declare_topics
    from streams.views import install_views
    from streams.worker import build_worker

    settings = load_settings()
    app, state = build_worker(settings, str(settings.kafka_bootstrap_servers))
    if "quota" not in app.agents:  # streams/worker.py does not install it (yet)
        topics_ = declare_topics(app, settings)
        rt = install_quota_agent(app, topics_, settings, quota_file=os.environ.get("QUOTA_FILE"))
        install_views(app, topics_, settings, state, rt)
    if os.environ.get("QUOTA_TEST_CRASH_AFTER_ALERTS"):
        table = app.tables[QUOTA_TABLE]
        send = table.send_changelog

        def crash_before_recording_a_fired_alert(partition: Any, key: Any, value: Any, *a: Any,
                                                 **kw: Any) -> Any:
            if isinstance(value, dict) and value.get("fired"):
                os._exit(9)  # the alerts are acknowledged; their table record is not written
            return send(partition, key, value, *a, **kw)

        table.send_changelog = crash_before_recording_a_fired_alert  # type: ignore[method-assign]
    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    _run_worker()
