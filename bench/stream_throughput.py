"""Benchmark: samples/s of the stream stage, against two baselines measured in the same run.

::

    python -m bench.stream_throughput                      # starts its own Tansu broker
    python -m bench.stream_throughput --samples 2000000 --naive-events 30000 --profile

One broker, one topic of batch envelopes, every figure from the same run:

1. fill ``usage.vm`` with ``--samples`` VM samples (``VmSimulator``) as batch envelopes of
   about 500 records (``EnvelopePublisher``): one envelope per tenant and 10 s tick, so the
   event time of each partition only moves forward and 60 s windows close all along the
   run; a final producer watermark closes the last ones. Not timed as part of any figure.
2. **raw aiokafka**: consume ``usage.vm`` from the beginning and decode every envelope
   (``envelope_codec().decode``), nothing else. Timed from the first fetched batch to the
   last decoded envelope. Measured before *and* after the stream stage (the machine is
   shared: the two runs bracket the stage); the ratio uses their mean.
3. **raw confluent-kafka**: the same with librdkafka (``Consumer.consume`` + decode).
4. **stream stage**: the real worker (``python -m metering worker``, a subprocess, as in
   production) reads ``usage.vm`` from the beginning: normalize (validate, dedup by
   event_id, forward) -> ``usage.records`` -> windows (event-time windows, dedup, close log,
   changelogs) -> ``usage.windows``. Done when the closed windows' ``sample_count`` plus the
   late samples sum to ``--samples``. Timed from the broker timestamp of the first message
   the worker wrote to ``usage.records`` (after start-up, table recovery and the group join)
   to the timestamp of the last window result; start-up (process start -> first output) is
   reported separately and is *not* in the samples/s figure.
5. **naive per-event Faust agent** (``bench/naive_agent.py``): ``--naive-events`` samples,
   one per message, ``async for value in stream`` with a windowed-table update per event.
   Timed inside the agent from its first to its last event (start-up excluded the same way).

``--rounds N`` (default 3) repeats every step but the confluent-kafka run N times (each round
on topics of its own) and reports the round whose stage / raw ratio is the median, and the
median of the rounds' stage / naive ratios (each round's stage against the naive agent run
right after it): on a shared machine one round's ratio can be off by a fifth either way.

Goals (issue "Stream processing"): the stream stage at least half the raw aiokafka figure
and at least 30 times the naive agent. Absolute numbers depend on the machine and its load;
quote the ratios.

``--profile`` samples the worker with py-spy during step 4 and prints where it spends time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import publish_report

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

WINDOW_S = 60
LATENESS_S = 10
TICK_MS = 10_000
GOAL_RAW_FRACTION = 0.5
GOAL_NAIVE_FACTOR = 30.0

__all__ = ["main", "run_benchmark"]


# ---------------------------------------------------------------------------------------
# the data


def _simulator(tenants: int, vms: int) -> Any:
    from producers.simulators import VmSimulator

    return VmSimulator(tenants=tenants, vms_per_tenant=vms, interval_ms=TICK_MS, seed=7)


def fill_envelopes(bootstrap: str, topic: str, samples: int, tenants: int, vms: int,
                   per_envelope: int) -> dict[str, Any]:
    """Publish ``samples`` VM samples to ``topic`` in batch envelopes; closes with a watermark."""
    from producers import EnvelopePublisher

    sim = _simulator(tenants, vms)
    per_tick = len(sim.vms) * 6
    ticks = -(-samples // per_tick)
    now = int(time.time() * 1000)
    start = now - now % (WINDOW_S * 1000) - (ticks + 2) * TICK_MS
    pub = EnvelopePublisher(bootstrap, topic, source="vm", producer_name="bench",
                            max_records_per_envelope=per_envelope,
                            config={"log.connection.close": False})
    t0 = time.perf_counter()
    sent = envelopes = 0
    windows: set[tuple[str, int]] = set()
    last_ms = start
    for i in range(ticks):
        end_ms = start + (i + 1) * TICK_MS
        recs = sim.tick(end_ms)[: samples - sent]
        envelopes += pub.send(recs)
        sent += len(recs)
        last_ms = end_ms
        for r in recs:
            ts = r["event_time_ms"]
            windows.add((r["tenant_id"], ts - ts % (WINDOW_S * 1000)))
    # the producer's promise: nothing earlier will come, so every window closes now
    final_wm = last_ms - last_ms % (WINDOW_S * 1000) + 2 * WINDOW_S * 1000
    pub.send_watermark(final_wm, pub.partitions())
    pub.flush(120)
    return {
        "samples": sent, "envelopes": envelopes, "samples_per_envelope": sent / max(envelopes, 1),
        "ticks": ticks, "event_time_span_s": (last_ms - start) / 1000,
        "windows": len(windows), "seconds": time.perf_counter() - t0,
    }


def fill_single(bootstrap: str, topic: str, events: int, tenants: int, vms: int) -> dict[str, Any]:
    """Publish ``events`` samples one per message (Avro UsageRecord), timestamp = event time."""
    from confluent_kafka import Producer

    from schemas import record_codec

    codec = record_codec()
    sim = _simulator(tenants, vms)
    per_tick = len(sim.vms) * 6
    ticks = -(-events // per_tick)
    now = int(time.time() * 1000)
    start = now - (ticks + 1) * TICK_MS  # recent: the windowed table must not expire them
    prod = Producer({"bootstrap.servers": bootstrap, "log_level": 4, "acks": "all",
                     "linger.ms": 5, "compression.type": "lz4", "partitioner": "murmur2_random",
                     "log.connection.close": False})
    sent = 0
    t0 = time.perf_counter()
    for i in range(ticks):
        for r in sim.tick(start + (i + 1) * TICK_MS)[: events - sent]:
            payload = codec.encode(r)
            while True:
                try:
                    prod.produce(topic, payload, key=r["tenant_id"].encode(),
                                 timestamp=r["event_time_ms"])
                    break
                except BufferError:
                    prod.poll(0.05)
            sent += 1
        prod.poll(0)
    left = prod.flush(120)
    if left:
        raise RuntimeError(f"{left} naive-agent messages not acknowledged")
    return {"events": sent, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------
# raw consumers


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "log_level": 3})
    try:
        md = c.list_topics(topic, timeout=10)
        out = {}
        for p in md.topics[topic].partitions:
            _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = hi
        return out
    finally:
        c.close()


def raw_aiokafka(bootstrap: str, topic: str) -> dict[str, Any]:
    """Consume and decode every envelope of ``topic`` with aiokafka; samples/s."""
    return asyncio.run(_raw_aiokafka(bootstrap, topic))


async def _raw_aiokafka(bootstrap: str, topic: str) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas import envelope_codec

    decode = envelope_codec().decode
    ends = _end_offsets(bootstrap, topic)
    tps = [TopicPartition(topic, p) for p in sorted(ends)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        todo = {tp for tp in tps if ends[tp.partition] > 0}
        samples = messages = 0
        t0: float | None = None
        while todo:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if t0 is None and batches:
                t0 = time.perf_counter()
            for tp, msgs in batches.items():
                for m in msgs:
                    samples += len(decode(m.value)["records"])
                messages += len(msgs)
                if msgs and msgs[-1].offset >= ends[tp.partition] - 1:
                    todo.discard(tp)
        seconds = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        await consumer.stop()
    return {"samples": samples, "messages": messages, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds else 0.0}


def raw_confluent(bootstrap: str, topic: str) -> dict[str, Any]:
    """Consume and decode every envelope of ``topic`` with confluent-kafka; samples/s."""
    from confluent_kafka import Consumer, TopicPartition

    from schemas import envelope_codec

    decode = envelope_codec().decode
    ends = _end_offsets(bootstrap, topic)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "log_level": 3})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in sorted(ends)])
        todo = {p for p, hi in ends.items() if hi > 0}
        samples = messages = 0
        t0: float | None = None
        while todo:
            msgs = c.consume(num_messages=1000, timeout=1.0)
            if t0 is None and msgs:
                t0 = time.perf_counter()
            for m in msgs:
                if m.error():
                    continue
                samples += len(decode(m.value() or b"")["records"])
                messages += 1
                part, offset = m.partition() or 0, m.offset() or 0
                if offset >= ends[part] - 1:
                    todo.discard(part)
        seconds = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        c.close()
    return {"samples": samples, "messages": messages, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds else 0.0}


# ---------------------------------------------------------------------------------------
# the stream stage


class _OutputWatcher(threading.Thread):
    """Reads usage.windows, usage.late and usage.dlq from the beginning while the worker runs:
    sums sample_count and late samples, keeps the newest broker timestamp of each."""

    def __init__(self, bootstrap: str, topics: dict[str, str]) -> None:
        super().__init__(daemon=True, name="output-watcher")
        from confluent_kafka import Consumer

        self.topics = topics  # role -> topic name
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                            "enable.auto.commit": False, "log_level": 3,
                            "fetch.wait.max.ms": 100})
        self.window_samples = 0
        self.window_late = 0  # late counts carried by windows
        self.windows = 0
        self.repeated_windows = 0  # the same window emitted again (a replay after a rebalance)
        self._seen: dict[str, int] = {}
        self.late_samples = 0  # records on usage.late
        self.dead_letters = 0
        self.last_ts: dict[str, int] = {}
        self.changed = threading.Event()
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from confluent_kafka import TopicPartition

        from schemas import envelope_codec, window_codec

        wdec, edec = window_codec().decode, envelope_codec().decode
        role_of = {name: role for role, name in self.topics.items()}
        try:
            assign = []
            for name in self.topics.values():
                md = self._c.list_topics(name, timeout=10)
                assign += [TopicPartition(name, p, 0) for p in md.topics[name].partitions]
            self._c.assign(assign)
            while not self._halt.is_set():
                for m in self._c.consume(num_messages=500, timeout=0.2):
                    if m.error():
                        continue
                    role = role_of[m.topic() or ""]
                    self.last_ts[role] = max(self.last_ts.get(role, 0), m.timestamp()[1])
                    if role == "windows":
                        w = wdec(m.value() or b"")
                        if w["window_id"] in self._seen:
                            # deterministic re-emission: count it once
                            self.repeated_windows += 1
                            continue
                        self._seen[w["window_id"]] = w["sample_count"]
                        self.windows += 1
                        self.window_samples += w["sample_count"]
                        self.window_late += w["late_samples"]
                    elif role == "late":
                        self.late_samples += len(edec(m.value() or b"")["records"])
                    else:
                        self.dead_letters += 1
                    self.changed.set()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self._c.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _first_timestamp(bootstrap: str, topic: str) -> int | None:
    """The broker timestamp of the earliest message at offset 0 of any partition of ``topic``."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "log_level": 3})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        out: int | None = None
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi <= lo:
                continue
            c.assign([TopicPartition(topic, p, lo)])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is not None and not m.error():
                    ts = m.timestamp()[1]
                    out = ts if out is None else min(out, ts)
                    break
        return out
    finally:
        c.close()


def _worker_env(settings: Any, datadir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "METERING_CONFIG"}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=str(settings.kafka_bootstrap_servers),
        TOPIC_PREFIX=settings.topic_prefix,
        TOPIC_PARTITIONS=str(settings.topic_partitions),
        CONSUMER_GROUP_PREFIX=settings.consumer_group_prefix,
        WINDOW_SIZES_SECONDS=json.dumps(settings.window_sizes_seconds),
        ALLOWED_LATENESS_SECONDS=str(settings.allowed_lateness_seconds),
        IDLE_CLOSE_SECONDS=str(settings.idle_close_seconds),
        WORKER_WEB_PORT="0",
        WORKER_DATADIR=str(datadir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0.0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a running process (VmHWM), in MB; 0.0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _utilisation(samples: list[tuple[float, float, float]], t0: float, t1: float) -> tuple[float, float]:
    """CPU use (1.0 = one core) of the worker and the broker between wall times t0 and t1,
    from (wall, worker_cpu, broker_cpu) samples taken about every half second."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return 0.0, 0.0
    (w0, a0, b0), (w1, a1, b1) = inside[0], inside[-1]
    return (a1 - a0) / (w1 - w0), (b1 - b0) / (w1 - w0)


def _py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    from shutil import which

    return which("py-spy")


def stream_stage(settings: Any, workdir: Path, samples: int, timeout: float,
                 profile_out: Path | None = None, broker_pid: int | None = None,
                 workers: int = 1) -> dict[str, Any]:
    """Run the real worker (``workers`` processes in one group) over the filled source topic
    until every sample is in a closed window."""
    from metering import topics as names

    bootstrap = settings.kafka_bootstrap_servers
    watcher = _OutputWatcher(bootstrap, {
        "windows": settings.topic(names.WINDOWS), "late": settings.topic(names.LATE),
        "dlq": settings.topic(names.DLQ)})
    watcher.start()
    log_path = workdir / "worker.log"
    t_spawn = time.time()
    procs = []
    for i in range(workers):
        with open(workdir / (f"worker-{i}.log" if i else "worker.log"), "ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "metering", "worker", "--loglevel", "info"],
                env=_worker_env(settings, workdir / f"worker-data-{i}"), cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    proc = procs[0]
    spy: subprocess.Popen[bytes] | None = None
    if profile_out is not None:
        exe = _py_spy()
        if exe is None:
            print("stream_throughput: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        else:
            spy = subprocess.Popen(
                [exe, "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "200",
                 "--nonblocking", "--output", str(profile_out)],
                stdout=subprocess.DEVNULL, stderr=open(workdir / "py-spy.log", "ab"),  # noqa: SIM115
                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        cpu: list[tuple[float, float, float]] = []
        while watcher.window_samples + watcher.late_samples < samples:
            cpu.append((time.time(), sum(_cpu_seconds(p.pid) for p in procs), _cpu_seconds(broker_pid)))
            if watcher.error is not None:
                raise RuntimeError(f"output watcher failed: {watcher.error!r}")
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited; see {workdir}/worker*.log")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timeout: {watcher.window_samples} + {watcher.late_samples} late of {samples} "
                    f"samples in closed windows after {timeout:.0f}s; see {log_path}")
            watcher.changed.wait(0.5)
            watcher.changed.clear()
        t_done = time.time()
        peak_rss = max(_peak_rss_mb(p.pid) for p in procs)
    finally:
        if spy is not None:
            _stop_process(spy, signal.SIGINT, 30)  # py-spy writes its file on SIGINT
        for p in procs:
            _stop_process(p)
        watcher.stop()
    first_out = _first_timestamp(bootstrap, settings.topic(names.RECORDS))
    last_out = max(watcher.last_ts.get("windows", 0), watcher.last_ts.get("late", 0))
    if first_out is None or not last_out:
        raise RuntimeError("no output timestamps on usage.records / usage.windows")
    seconds = (last_out - first_out) / 1000
    worker_cpu, broker_cpu = _utilisation(cpu, first_out / 1000, last_out / 1000)
    return {
        "samples": samples,
        "workers": workers,
        "windows": watcher.windows,
        "repeated_windows": watcher.repeated_windows,
        "window_samples": watcher.window_samples,
        "late_samples": watcher.late_samples,
        "dead_letters": watcher.dead_letters,
        "startup_s": first_out / 1000 - t_spawn,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "seconds_incl_startup": t_done - t_spawn,
        "samples_per_s_incl_startup": samples / (t_done - t_spawn),
        # CPU use while processing, 1.0 = one core busy (sampled every ~0.5 s)
        "worker_cpu_cores": worker_cpu,
        "broker_cpu_cores": broker_cpu,
        "worker_peak_rss_mb": peak_rss,
        "worker_log": str(log_path),
    }


# ---------------------------------------------------------------------------------------
# the naive agent


def _naive_round(bootstrap: str, partitions: int, events: int, tenants: int, vms: int,
                 workdir: Path) -> dict[str, Any]:
    """Fill a topic of its own with ``events`` single-sample messages and run the naive agent."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench{uuid.uuid4().hex[:6]}.bench.naive"
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                             replication_factor=1)]).values():
        fut.result(30)
    del admin
    nfill = fill_single(bootstrap, topic, events, tenants, vms)
    return naive_agent(bootstrap, topic, partitions, nfill["events"], workdir,
                       timeout=max(180.0, events / 200))


def naive_agent(bootstrap: str, topic: str, partitions: int, events: int, workdir: Path,
                timeout: float) -> dict[str, Any]:
    """Run bench/naive_agent.py over ``topic`` (``events`` single-sample messages); events/s."""
    out = workdir / "naive.json"
    log_path = workdir / "naive.log"
    env = {k: v for k, v in os.environ.items() if k != "METERING_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    t_spawn = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.naive_agent", "--bootstrap", bootstrap, "--topic", topic,
             "--partitions", str(partitions), "--events", str(events), "--out", str(out),
             "--datadir", str(workdir / "naive-data"), "--app-id", f"bench-naive-{uuid.uuid4().hex[:6]}"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not out.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the naive agent exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive agent: timeout after {timeout:.0f}s; see {log_path}")
            time.sleep(0.2)
    finally:
        _stop_process(proc)
    r = json.loads(out.read_text())
    seconds = r["last_event_wall"] - r["first_event_wall"]
    return {
        "events": r["events"], "seconds": seconds,
        "events_per_s": (r["events"] - 1) / seconds if seconds > 0 else 0.0,
        "startup_s": r["first_event_wall"] - t_spawn,
    }


# ---------------------------------------------------------------------------------------
# profile summary


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Where the worker's time goes, from py-spy's raw (collapsed-stack) output: self time per
    function, self time per package, inclusive time of the project's own functions, and who
    calls the hottest ones (e.g. which agent decodes)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    pkg_c: collections.Counter[str] = collections.Counter()
    callers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f.strip()) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        pkg_c[_package(frames[-1])] += n
        for i, f in enumerate(frames):
            if _package(f) in ("streams", "schemas") and f not in frames[:i]:
                incl_c[f] += n
                if i:
                    callers[f][frames[i - 1].split(" (")[0]] += n

    def pct(c: collections.Counter[str], k: int = top) -> list[tuple[str, float]]:
        return [(f, 100.0 * v / total) for f, v in c.most_common(k)] if total else []

    hot = [f for f, _ in incl_c.most_common(6)]
    return {"samples": total, "self_pct": pct(self_c), "package_self_pct": pct(pkg_c),
            "project_inclusive_pct": pct(incl_c),
            "callers_pct": {f: pct(callers[f], 4) for f in hot if len(callers[f]) > 1}}


def _package(frame: str) -> str:
    file = frame.rpartition(" (")[2].rstrip(")")
    head = file.split("/", 1)[0] if "/" in file else file
    return head if head in ("streams", "schemas", "faust", "aiokafka", "mode", "asyncio") else "other"


def _short(frame: str) -> str:
    # "func (/path/to/site-packages/pkg/mod.py:123)" -> "func (pkg/mod.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})"


# ---------------------------------------------------------------------------------------
# the run


def _code_version() -> dict[str, Any]:
    """The commit measured, and whether the stage's code differed from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "streams", "schemas", "producers",
                               "metering").splitlines()}


def _settings(bootstrap: str, partitions: int, workdir: Path) -> Any:
    """A run's settings: topics and consumer groups of its own, windows closed by event time."""
    from metering.config import load_settings

    return load_settings(
        kafka_bootstrap_servers=bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
        topic_partitions=partitions, consumer_group_prefix=f"bench{uuid.uuid4().hex[:6]}",
        window_sizes_seconds=[WINDOW_S], allowed_lateness_seconds=LATENESS_S,
        # idle closes follow the wall clock; the run closes windows by event time only
        idle_close_seconds=3600.0,
        worker_web_port=0, worker_datadir=str(workdir / "worker-data"),
    )


def run_benchmark(
    bootstrap: str | None = None,
    *,
    samples: int = 1_000_000,
    naive_events: int = 20_000,
    partitions: int = 4,
    tenants: int = 8,
    vms: int = 83,
    per_envelope: int = 500,
    profile: bool = False,
    workdir: Path | None = None,
    workers: int = 1,
    rounds: int = 1,
) -> dict[str, Any]:
    """Fill, then measure raw aiokafka, confluent-kafka, the stream stage, raw again, naive;
    with ``rounds`` > 1, fill, raw, stage and raw again that many times, and report the round
    whose stage / raw ratio is the median."""
    from metering import topics as names
    from metering.embedded import TansuBroker
    from metering.topics import ensure_topics

    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    wd.mkdir(parents=True, exist_ok=True)
    ok = False
    broker = None
    if bootstrap is None:
        broker = TansuBroker(log_path=wd / "tansu.log").start()
        bootstrap = broker.bootstrap_servers
    try:
        rounds_out: list[dict[str, Any]] = []
        conf: dict[str, Any] = {}
        profile_out = wd / "worker.pyspy.txt"  # the first round's, when profiling
        for i in range(rounds):
            # each round fills topics of its own: the worker reads its source from the start and
            # the output watcher sums everything on its output topics
            round_dir = wd / f"round-{i + 1}" if i else wd
            round_dir.mkdir(parents=True, exist_ok=True)
            settings = _settings(bootstrap, partitions, round_dir)
            ensure_topics(settings, bootstrap)
            source = settings.topic(names.SOURCE_TOPICS["vm"])
            if rounds > 1:
                print(f"round {i + 1} of {rounds}", flush=True)
            print(f"filling {source} with {samples} samples ...", flush=True)
            fill = fill_envelopes(bootstrap, source, samples, tenants, vms, per_envelope)
            print(f"  {fill['envelopes']} envelopes, {fill['samples_per_envelope']:.0f} samples each, "
                  f"{fill['windows']} tenant-windows, {fill['seconds']:.1f}s", flush=True)

            raw_before = raw_aiokafka(bootstrap, source)
            print(f"raw aiokafka (before): {raw_before['samples_per_s']:,.0f} samples/s", flush=True)
            if i == 0:
                conf = raw_confluent(bootstrap, source)
                print(f"raw confluent-kafka:   {conf['samples_per_s']:,.0f} samples/s", flush=True)

            stage_timeout = max(180.0, samples / 2_000)
            broker_proc = getattr(broker, "_proc", None)
            stage = stream_stage(settings, round_dir, fill["samples"], stage_timeout,
                                 profile_out if profile and i == 0 else None,
                                 broker_pid=broker_proc.pid if broker_proc is not None else None,
                                 workers=workers)
            print(f"stream stage:          {stage['samples_per_s']:,.0f} samples/s "
                  f"(start-up {stage['startup_s']:.1f}s excluded)", flush=True)
            if stage["window_samples"] + stage["late_samples"] != fill["samples"]:
                print("  warning: window totals overshoot the samples published", file=sys.stderr)

            raw_after = raw_aiokafka(bootstrap, source)
            print(f"raw aiokafka (after):  {raw_after['samples_per_s']:,.0f} samples/s", flush=True)
            naive = _naive_round(bootstrap, partitions, naive_events, tenants, vms, round_dir)
            print(f"naive per-event agent: {naive['events_per_s']:,.0f} events/s", flush=True)
            mean = (raw_before["samples_per_s"] + raw_after["samples_per_s"]) / 2
            rounds_out.append({
                "fill": fill, "raw_aiokafka_before": raw_before, "raw_aiokafka_after": raw_after,
                "raw_aiokafka_mean_samples_per_s": mean, "stream_stage": stage,
                "stage_over_raw_aiokafka": stage["samples_per_s"] / mean if mean else 0.0,
                "naive_agent": naive,
                "stage_over_naive": (stage["samples_per_s"] / naive["events_per_s"]
                                     if naive["events_per_s"] else 0.0),
            })

        # the round with the median ratio speaks for the run: the host's other tenants swing
        # every figure by up to half within a minute, one round can be lucky or unlucky
        middle = _median_round(rounds_out, "stage_over_raw_aiokafka")
        fill, stage = middle["fill"], middle["stream_stage"]
        raw_before, raw_after = middle["raw_aiokafka_before"], middle["raw_aiokafka_after"]
        # the same for the naive factor, each round's stage against the naive run after it
        naive_middle = _median_round(rounds_out, "stage_over_naive")
        naive = naive_middle["naive_agent"]

        raw_mean = middle["raw_aiokafka_mean_samples_per_s"]
        ratios = {
            "stage_over_raw_aiokafka": middle["stage_over_raw_aiokafka"],
            "stage_over_raw_aiokafka_each_round": [r["stage_over_raw_aiokafka"] for r in rounds_out],
            "stage_over_raw_confluent": (stage["samples_per_s"] / conf["samples_per_s"]
                                         if conf["samples_per_s"] else 0.0),
            "stage_over_naive": naive_middle["stage_over_naive"],
            "stage_over_naive_each_round": [r["stage_over_naive"] for r in rounds_out],
        }
        report: dict[str, Any] = {
            "benchmark": "stream_throughput",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
            "code": _code_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_avg_at_end": os.getloadavg(),
            "broker": "embedded tansu" if broker else bootstrap,
            "config": {"samples": samples, "naive_events": naive_events, "partitions": partitions,
                       "tenants": tenants, "vms_per_tenant": vms, "records_per_envelope": per_envelope,
                       "workers": workers, "rounds": rounds,
                       "window_s": WINDOW_S, "lateness_s": LATENESS_S, "tick_ms": TICK_MS},
            "fill": fill,
            "raw_aiokafka_before": raw_before,
            "raw_aiokafka_after": raw_after,
            "raw_aiokafka_mean_samples_per_s": raw_mean,
            "rounds": rounds_out,
            "raw_confluent": conf,
            "stream_stage": stage,
            "naive_agent": naive,
            "ratios": ratios,
            "goals": {
                "stage_at_least_half_raw": ratios["stage_over_raw_aiokafka"] >= GOAL_RAW_FRACTION,
                "stage_at_least_30x_naive": ratios["stage_over_naive"] >= GOAL_NAIVE_FACTOR,
            },
        }
        if profile and profile_out.exists():
            report["profile"] = summarize_profile(profile_out)
            report["profile"]["raw_file"] = str(profile_out)
        ok = True
        return report
    finally:
        if broker is not None:
            broker.stop()
        if workdir is None and ok and not profile:
            shutil.rmtree(wd, ignore_errors=True)
        elif not ok:
            print(f"stream_throughput: logs kept in {wd}", file=sys.stderr)


def _median_round(rounds: list[dict[str, Any]], ratio: str) -> dict[str, Any]:
    """The round whose ``ratio`` is the median (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda r: float(r[ratio]))[(len(rounds) - 1) // 2]


def _print(report: dict[str, Any]) -> None:
    c, st = report["config"], report["stream_stage"]
    print()
    print(f"stream_throughput: python {report['python']}, {report['machine']}, "
          f"broker {report['broker']}, {c['partitions']} partitions, "
          f"{report['fill']['samples_per_envelope']:.0f} samples/envelope, "
          f"load avg {report['load_avg_at_end'][0]:.1f}")
    rows = [
        ("raw aiokafka consume+decode (before)", report["raw_aiokafka_before"]["samples"],
         report["raw_aiokafka_before"]["seconds"], report["raw_aiokafka_before"]["samples_per_s"]),
        ("raw aiokafka consume+decode (after)", report["raw_aiokafka_after"]["samples"],
         report["raw_aiokafka_after"]["seconds"], report["raw_aiokafka_after"]["samples_per_s"]),
        ("raw confluent-kafka consume+decode", report["raw_confluent"]["samples"],
         report["raw_confluent"]["seconds"], report["raw_confluent"]["samples_per_s"]),
        (f"stream stage (normalize + windows){' x' + str(st['workers']) if st['workers'] > 1 else ''}",
         st["samples"], st["seconds"], st["samples_per_s"]),
        ("naive per-event Faust agent", report["naive_agent"]["events"],
         report["naive_agent"]["seconds"], report["naive_agent"]["events_per_s"]),
    ]
    print(f"{'':40} {'samples':>10} {'seconds':>8} {'samples/s':>11}")
    for name, n, s, rate in rows:
        print(f"{name:40} {n:10d} {s:8.2f} {rate:11,.0f}")
    print(f"stream stage start-up (excluded above): {st['startup_s']:.1f}s; including it: "
          f"{st['samples_per_s_incl_startup']:,.0f} samples/s; {st['windows']} windows, "
          f"{st['late_samples']} late, {st['dead_letters']} dead letters, "
          f"{st['repeated_windows']} windows emitted again")
    print(f"CPU while processing (1.0 = one core): worker {st['worker_cpu_cores']:.2f}, "
          f"broker {st['broker_cpu_cores']:.2f}; worker peak RSS {st['worker_peak_rss_mb']:.0f} MB")
    r, g = report["ratios"], report["goals"]
    each = r.get("stage_over_raw_aiokafka_each_round", [])
    if len(each) > 1:
        print(f"stream stage / raw aiokafka, each round: {', '.join(f'{x:.2f}' for x in each)}; "
              "the rows above are the median round's (the naive agent's row: the median "
              "stage / naive round's)")
    print(f"stream stage / raw aiokafka (mean): {r['stage_over_raw_aiokafka']:.2f}  "
          f"(goal >= {GOAL_RAW_FRACTION}: {'met' if g['stage_at_least_half_raw'] else 'NOT met'}"
          f"{f', median of {len(each)} rounds' if len(each) > 1 else ''})")
    print(f"stream stage / raw confluent-kafka: {r['stage_over_raw_confluent']:.2f}")
    naive_each = r.get("stage_over_naive_each_round", [])
    if len(naive_each) > 1:
        print(f"stream stage / naive agent, each round: {', '.join(f'{x:.1f}' for x in naive_each)}")
    print(f"stream stage / naive agent:         {r['stage_over_naive']:.1f}  "
          f"(goal >= {GOAL_NAIVE_FACTOR:.0f}: {'met' if g['stage_at_least_30x_naive'] else 'NOT met'}"
          f"{f', median of {len(naive_each)} rounds' if len(naive_each) > 1 else ''})")
    prof = report.get("profile")
    if prof:
        print(f"\nworker profile (py-spy, {prof['samples']} samples; {prof['raw_file']})")
        print("  self time by package: " + ", ".join(
            f"{name} {pct:.1f}%" for name, pct in prof["package_self_pct"]))
        print("  self time:")
        for f, pct in prof["self_pct"][:15]:
            print(f"    {pct:5.1f}%  {f}")
        print("  inclusive time of the project's functions:")
        for f, pct in prof["project_inclusive_pct"][:15]:
            print(f"    {pct:5.1f}%  {f}")
        for f, split in prof["callers_pct"].items():
            print(f"  {f} called from: " + ", ".join(f"{c} {pct:.1f}%" for c, pct in split))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (also used by ``python -m bench``)."""
    p = argparse.ArgumentParser(prog="stream_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=None, help="Kafka to use (default: start Tansu)")
    p.add_argument("--samples", type=int, default=1_000_000,
                   help="samples on the envelope topic (default 1,000,000)")
    p.add_argument("--naive-events", type=int, default=20_000,
                   help="single-sample messages for the naive agent (default 20,000)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--vms", type=int, default=83,
                   help="VMs per tenant; 83 x 6 metrics = 498 samples per tenant per tick, "
                        "so one envelope per tenant and tick")
    p.add_argument("--per-envelope", type=int, default=500, help="max records per envelope")
    p.add_argument("--workers", type=int, default=1,
                   help="stream worker processes in the group (default 1: one process, like "
                        "the raw consumers it is compared with)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat fill, raw, stage, raw this many times and report the round with "
                        "the median stage / raw ratio (the host is noisy: one round's ratio can "
                        "be off by a fifth either way; default 3)")
    p.add_argument("--profile", action="store_true",
                   help="sample the worker with py-spy and print where it spends time")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep logs and the profile here (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result file (default bench/results/stream_throughput-<time>.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.profile and _py_spy() is None:
        p.error("--profile needs py-spy (pip install py-spy), before anything is measured")
    report = run_benchmark(args.bootstrap, samples=args.samples, naive_events=args.naive_events,
                           partitions=args.partitions, tenants=args.tenants, vms=args.vms,
                           per_envelope=args.per_envelope, profile=args.profile,
                           workdir=args.workdir, workers=args.workers, rounds=args.rounds)
    return publish_report("stream_throughput", report, args.out, args.json, _print)


if __name__ == "__main__":
    raise SystemExit(main())
