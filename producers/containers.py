"""Container usage producer (``metering produce containers``): cAdvisor series to usage records.

Input, one of:

* **Prometheus** (default): one instant query per poll of a *range vector*,
  ``{__name__=~"container_...", <label-name>="<label-value>"}[<window>]`` on
  ``/api/v1/query``. A range vector returns the raw samples with their scrape timestamps.
  (``query_range`` is not used on purpose: it resamples every step with a 5-minute
  look-back, which silently fills missed scrapes and hides a reset between two steps.)
* **a cAdvisor ``/metrics`` endpoint** (``--cadvisor-url``), scraped every
  ``--resolution`` seconds and parsed with ``prometheus_client.parser``.

What is metered, per container and per ``--resolution`` step (event time = step end,
``event_id = containers:<resource>:<metric>:<step_end_ms>``):

====================================== ===================== ==============================
series                                 metric                how
====================================== ===================== ==============================
container_cpu_usage_seconds_total      cpu_seconds           counter deltas
container_memory_usage_bytes           memory_byte_seconds   gauge integrated on the grid
container_network_receive_bytes_total  network_rx_bytes      counter deltas
container_network_transmit_bytes_total network_tx_bytes      counter deltas
container_fs_reads_bytes_total         disk_read_bytes       counter deltas
container_fs_writes_bytes_total        disk_write_bytes      counter deltas
(a missed scrape, see below)           scrape_gap_seconds    the gap's length
====================================== ===================== ==============================

Rules (OpenCost's lesson: resets and gaps are where container billing goes wrong):

* **Exact.** Values and timestamps are read as decimal strings (Prometheus prints the
  shortest decimal that round-trips its float64) into ``Decimal``; never float arithmetic.
  From ``/metrics`` the parser yields floats, which ``Decimal(repr(x))`` turns back into
  that same shortest decimal.
* **Counter deltas, resets like ``increase()``.** A value lower than the previous one is a
  reset: the delta is the new value. A delta belongs to the step holding the later sample.
* **The first sample of a series only sets the baseline**, so a new series (or this
  producer restarting) never produces a spike. Exception: when the container's
  ``container_start_time_seconds`` is known and is not before this collector started,
  the whole container life was observed by us, so its first sample counts from zero
  (a container that starts, or restarts as a new series, after we began is billed fully).
* **Gaps.** Two consecutive samples of a series more than 2 x resolution apart (plus a
  tolerance for scrape jitter: half a resolution, at most 5 s, so that with resolution =
  scrape interval one missed scrape is never a gap and two always are) are a scrape gap:
  one ``scrape_gap_seconds`` record per container and gap (value = the time between the
  two samples, metadata ``gap_start_ms``/``gap_end_ms``) and a logged warning. Counter
  usage across a gap is still exact (the delta spans it); memory in it is not billed.
* **Memory** is integrated on the epoch-aligned grid of ``--resolution``: each grid point
  ``g`` adds ``value(g) x resolution`` byte-seconds to the step ending at ``g``, where
  ``value(g)`` is the latest sample at or before ``g``. Grid points inside a gap add
  nothing: a gap is never filled.
* **Which series.** The tenant is the ``--tenant-label`` label (default ``namespace``);
  series without it are skipped. Kubernetes pod-level cgroups (a ``pod`` label but no
  ``container``) and pause containers (``container="POD"``) are skipped (they would count
  their containers twice), as are per-CPU series (``cpu`` label other than ``total``).
  The resource id is ``<namespace>/<pod>/<container>``, else the ``name`` label, else ``id``.
* **Steps close by time.** A step is emitted once the poll time is 2 x resolution past its
  end (every sample for it has been scraped and ingested by then). A sample that would
  still land in a closed step (a very late ingestion) is added to the first open step:
  usage may move one step later, it is never dropped or counted twice.

State (last value and timestamp per series, open steps) lives in the collector; nothing is
persisted. After a restart the first samples are baselines again.
"""

from __future__ import annotations

import argparse
import decimal
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from producers.errors import ProducerError, PublishError
from producers.publisher import EnvelopePublisher, usage_record
from producers.runner import run_until_stopped

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "CONTAINERS_TOPIC",
    "COUNTERS",
    "GAP_METRIC",
    "GAUGES",
    "SOURCE",
    "START_TIME",
    "CadvisorSource",
    "ContainerCollector",
    "ContainerProducer",
    "ContainerSourceError",
    "PrometheusSource",
    "Sample",
    "build_parser_args",
    "parse_exposition",
    "producer_from_args",
    "run_from_args",
    "sample",
]

log = logging.getLogger(__name__)

CONTAINERS_TOPIC = "usage.containers"
SOURCE = "containers"

#: cAdvisor counters -> the metric their deltas are published as
COUNTERS: dict[str, str] = {
    "container_cpu_usage_seconds_total": "cpu_seconds",
    "container_network_receive_bytes_total": "network_rx_bytes",
    "container_network_transmit_bytes_total": "network_tx_bytes",
    "container_fs_reads_bytes_total": "disk_read_bytes",
    "container_fs_writes_bytes_total": "disk_write_bytes",
}
#: cAdvisor gauges -> the metric their time integral is published as
GAUGES: dict[str, str] = {"container_memory_usage_bytes": "memory_byte_seconds"}
#: cAdvisor's container start time (seconds since the epoch), used for new series
START_TIME = "container_start_time_seconds"
GAP_METRIC = "scrape_gap_seconds"
SERIES = (*COUNTERS, *GAUGES, START_TIME)

#: labels that tell apart several series of one container (per CPU, interface, device)
_SUB_LABELS = frozenset({"cpu", "interface", "device"})
#: container labels copied into the records' metadata
_META_LABELS = ("namespace", "pod", "container", "name", "image", "id")
_MAX_UNSENT = 200_000
#: exact arithmetic for sums of decimal(38, 9)-sized values, whatever the caller's context
_CTX = decimal.Context(prec=60)


class Sample(NamedTuple):
    """One raw sample: series name, sorted labels (without ``__name__``), time, exact value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    ts_ms: int
    value: Decimal


def sample(name: str, labels: Mapping[str, str], ts_ms: int, value: Decimal | str | int) -> Sample:
    """A :class:`Sample` from a label dict (``__name__`` dropped)."""
    return Sample(
        name,
        tuple(sorted((k, v) for k, v in labels.items() if k != "__name__")),
        int(ts_ms),
        value if isinstance(value, Decimal) else Decimal(value),
    )


class ContainerSourceError(ProducerError):
    """Reading Prometheus or cAdvisor failed; the message names the endpoint."""


@dataclass
class _SeriesState:
    ts_ms: int
    value: Decimal


class ContainerCollector:
    """Pure state machine: raw samples in, usage records out (see the module docstring)."""

    def __init__(
        self,
        *,
        resolution_seconds: float | Decimal | str = 60,
        tenant_label: str = "namespace",
        label_name: str | None = None,
        label_value: str | None = None,
        started_at_ms: int | None = None,
        settle_ms: int | None = None,
        gap_tolerance_ms: int | None = None,
    ) -> None:
        res = Decimal(str(resolution_seconds))
        self.resolution_ms = int(res * 1000)
        if self.resolution_ms <= 0 or res * 1000 != self.resolution_ms:
            raise ValueError("resolution must be a positive number of whole milliseconds")
        self.resolution_s = Decimal(self.resolution_ms) / 1000
        tolerance = min(self.resolution_ms // 2, 5000) if gap_tolerance_ms is None else gap_tolerance_ms
        #: consecutive samples further apart than this are a scrape gap
        self.gap_ms = 2 * self.resolution_ms + tolerance
        self.settle_ms = 2 * self.resolution_ms if settle_ms is None else settle_ms
        self.tenant_label = tenant_label
        self.label_name = label_name
        self.label_value = label_value
        self.started_at_ms = int(time.time() * 1000) if started_at_ms is None else started_at_ms
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], _SeriesState] = {}
        self._start_ms: dict[tuple[tuple[str, str], ...], int] = {}
        # (tenant, resource, metric, step_end) -> [value, metadata]
        self._open: dict[tuple[str, str, str, int], list[Any]] = {}
        self._gaps: list[dict[str, Any]] = []
        self._gap_ids: dict[str, int] = {}
        self.closed_upto_ms: int | None = None
        self.resets = 0
        self.moved_late = 0

    # -- helpers --

    def _step_end(self, ts_ms: int) -> int:
        r = self.resolution_ms
        return -(-ts_ms // r) * r

    def _wanted(self, labels: Mapping[str, str]) -> bool:
        if self.label_name and labels.get(self.label_name) != (self.label_value or ""):
            return False
        if not labels.get(self.tenant_label):
            return False
        # Kubernetes: a pod-level cgroup has a pod but no container (Prometheus drops the
        # empty label), the pause container is "POD"; both would count containers twice
        container = labels.get("container") or labels.get("container_name")
        if container == "POD" or ((labels.get("pod") or labels.get("pod_name")) and not container):
            return False
        cpu = labels.get("cpu")
        return cpu is None or cpu == "total"

    @staticmethod
    def _resource(labels: Mapping[str, str]) -> str:
        pod = labels.get("pod") or labels.get("pod_name")
        container = labels.get("container") or labels.get("container_name")
        if pod and container:
            return f"{labels.get('namespace', '')}/{pod}/{container}"
        return labels.get("name") or labels.get("id") or ",".join(
            f"{k}={v}" for k, v in sorted(labels.items()) if k not in _SUB_LABELS)

    def _add(self, tenant: str, resource: str, metric: str, step_end: int, value: Decimal,
             meta: Mapping[str, str]) -> None:
        if self.closed_upto_ms is not None and step_end <= self.closed_upto_ms:
            step_end = self.closed_upto_ms + self.resolution_ms
            self.moved_late += 1
            log.debug("containers: late sample of %s/%s moved to the step ending %d",
                      resource, metric, step_end)
        key = (tenant, resource, metric, step_end)
        acc = self._open.get(key)
        if acc is None:
            self._open[key] = [value, dict(meta)]
        else:
            acc[0] = _CTX.add(acc[0], value)

    def _gap(self, tenant: str, resource: str, series: str, start_ms: int, end_ms: int,
             meta: Mapping[str, str]) -> None:
        event_id = f"containers:{resource}:{GAP_METRIC}:{start_ms}:{end_ms}"
        if event_id in self._gap_ids:
            return
        self._gap_ids[event_id] = end_ms
        seconds = _CTX.divide(Decimal(end_ms - start_ms), 1000)
        log.warning(
            "containers: scrape gap of %ss (more than 2 x resolution %ss and jitter) in %s for %s "
            "(tenant %s) between %d and %d ms; not filled, reported as %s",
            seconds, self.resolution_s, series, resource, tenant, start_ms, end_ms, GAP_METRIC)
        self._gaps.append(usage_record(
            event_id=event_id, tenant_id=tenant, source=SOURCE, resource_id=resource,
            metric=GAP_METRIC, value=seconds, event_time_ms=end_ms,
            metadata={**meta, "gap_start_ms": str(start_ms), "gap_end_ms": str(end_ms),
                      "series": series, "resolution_seconds": str(self.resolution_s)},
        ))

    # -- the state machine --

    def ingest(self, samples: Iterable[Sample]) -> None:
        """Fold raw samples in (any order, repeats and already-seen samples are ignored)."""
        todo: list[tuple[int, Sample, dict[str, str]]] = []
        for s in samples:
            if s.name not in SERIES or not s.value.is_finite():
                continue
            labels = dict(s.labels)
            if not self._wanted(labels):
                continue
            if s.name == START_TIME:
                ident = tuple(kv for kv in s.labels if kv[0] not in _SUB_LABELS)
                self._start_ms[ident] = int(_CTX.multiply(s.value, 1000))
                continue
            todo.append((s.ts_ms, s, labels))
        todo.sort(key=lambda t: t[0])
        for ts, s, labels in todo:
            key = (s.name, s.labels)
            st = self._series.get(key)
            if st is not None and ts <= st.ts_ms:
                continue  # seen in an earlier (overlapping) query window
            tenant = labels[self.tenant_label]
            resource = self._resource(labels)
            meta = {k: labels[k] for k in _META_LABELS if labels.get(k)}
            gap = st is not None and ts - st.ts_ms > self.gap_ms
            if st is not None and gap:
                self._gap(tenant, resource, s.name, st.ts_ms, ts, meta)
            if s.name in COUNTERS:
                metric = COUNTERS[s.name]
                if st is None:
                    ident = tuple(kv for kv in s.labels if kv[0] not in _SUB_LABELS)
                    started = self._start_ms.get(ident)
                    if started is not None and started >= self.started_at_ms:
                        self._add(tenant, resource, metric, self._step_end(ts), s.value,
                                  {**meta, "counted_from": "container_start"})
                    # otherwise: the first sample only sets the baseline
                elif s.value >= st.value:
                    self._add(tenant, resource, metric, self._step_end(ts),
                              _CTX.subtract(s.value, st.value), meta)
                else:
                    self.resets += 1
                    log.info("containers: counter reset in %s for %s: %s -> %s",
                             s.name, resource, st.value, s.value)
                    self._add(tenant, resource, metric, self._step_end(ts), s.value, meta)
            elif st is not None and not gap:  # gauge: grid points in [previous sample, this one)
                metric = GAUGES[s.name]
                g = self._step_end(st.ts_ms)
                area = _CTX.multiply(st.value, self.resolution_s)
                while g < ts:
                    self._add(tenant, resource, metric, g, area, meta)
                    g += self.resolution_ms
            self._series[key] = _SeriesState(ts, s.value)

    def drain(self, now_ms: int) -> list[dict[str, Any]]:
        """Records of every step that ended at least ``settle`` before ``now_ms``, and gaps."""
        out, self._gaps = self._gaps, []
        close = (now_ms - self.settle_ms) // self.resolution_ms * self.resolution_ms
        if self.closed_upto_ms is not None and close <= self.closed_upto_ms:
            return out
        self.closed_upto_ms = close
        for key in sorted(k for k in self._open if k[3] <= close):
            tenant, resource, metric, step_end = key
            value, meta = self._open.pop(key)
            out.append(usage_record(
                event_id=f"containers:{resource}:{metric}:{step_end}",
                tenant_id=tenant, source=SOURCE, resource_id=resource, metric=metric,
                value=value, event_time_ms=step_end,
                metadata={**meta, "step_start_ms": str(step_end - self.resolution_ms),
                          "resolution_seconds": str(self.resolution_s)},
            ))
        horizon = close - 3600_000
        self._gap_ids = {k: v for k, v in self._gap_ids.items() if v > horizon}
        return out

    def collect(self, samples: Iterable[Sample], now_ms: int) -> list[dict[str, Any]]:
        """:meth:`ingest` then :meth:`drain`."""
        self.ingest(samples)
        return self.drain(now_ms)

    def forget(self, older_than_ms: int) -> int:
        """Drop the state of series silent since before ``older_than_ms``; returns how many."""
        stale = [k for k, st in self._series.items() if st.ts_ms < older_than_ms]
        for k in stale:
            del self._series[k]
        if stale:  # and the start times of containers none of whose series is left
            live = {tuple(kv for kv in labels if kv[0] not in _SUB_LABELS) for _, labels in self._series}
            self._start_ms = {k: v for k, v in self._start_ms.items() if k in live}
        return len(stale)


# ---- sources -------------------------------------------------------------------------------


def _decimal(text: Any, where: str) -> Decimal:
    try:
        return Decimal(str(text))
    except InvalidOperation:
        raise ValueError(f"{where}: {text!r} is not a number") from None


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class PrometheusSource:
    """Raw cAdvisor samples from the Prometheus HTTP API (a range-vector instant query)."""

    def __init__(
        self,
        url: str,
        *,
        label_name: str | None = None,
        label_value: str | None = None,
        timeout: float = 10.0,
        initial_lookback_seconds: float = 120.0,
        max_lookback_seconds: float = 3600.0,
        overlap_seconds: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.endpoint = self.url + "/api/v1/query"
        self.label_name = label_name
        self.label_value = label_value
        self.timeout = timeout
        self.initial_lookback_ms = int(initial_lookback_seconds * 1000)
        self.max_lookback_ms = int(max_lookback_seconds * 1000)
        self.overlap_ms = int(overlap_seconds * 1000)
        self.last_end_ms: int | None = None
        self._http = httpx.Client(timeout=timeout)

    def selector(self) -> str:
        """The PromQL series selector (without the range)."""
        names = "|".join(SERIES)
        matchers = [f"__name__=~{_promql_string(names)}"]
        if self.label_name:
            matchers.append(f"{self.label_name}={_promql_string(self.label_value or '')}")
        return "{" + ",".join(matchers) + "}"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def fetch(self, now_ms: int) -> list[Sample]:
        """Every sample since the previous fetch (with an overlap), up to ``now_ms``."""
        if self.last_end_ms is None:
            start = now_ms - self.initial_lookback_ms
        else:
            start = self.last_end_ms - self.overlap_ms
        if now_ms - start > self.max_lookback_ms:
            log.warning("containers: %d s since the last successful query; reading only the last "
                        "%d s (older samples are skipped and show as scrape gaps)",
                        (now_ms - start) // 1000, self.max_lookback_ms // 1000)
            start = now_ms - self.max_lookback_ms
        window_s = max(1, math.ceil((now_ms - start) / 1000))
        query = f"{self.selector()}[{window_s}s]"
        params = {"query": query, "time": str(Decimal(now_ms) / 1000)}
        try:
            resp = self._http.get(self.endpoint, params=params)
        except httpx.TimeoutException:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: {type(exc).__name__}: {exc}") from None
        try:
            body = json.loads(resp.content, parse_float=Decimal)
        except ValueError:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: HTTP {resp.status_code}, body is not JSON: "
                f"{resp.content[:120]!r}") from None
        if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error") if isinstance(body, dict) else None
            raise ContainerSourceError(
                f"containers: GET {self.endpoint} ({query}): HTTP {resp.status_code}: {err or body!r}")
        try:
            samples = self._parse(body["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: malformed response body: {exc!r}") from None
        self.last_end_ms = now_ms
        return samples

    @staticmethod
    def _parse(data: Mapping[str, Any]) -> list[Sample]:
        if data["resultType"] != "matrix":
            raise ValueError(f"resultType is {data['resultType']!r}, expected 'matrix'")
        out: list[Sample] = []
        for series in data["result"]:
            metric = series["metric"]
            name = metric["__name__"]
            labels = tuple(sorted((str(k), str(v)) for k, v in metric.items() if k != "__name__"))
            for ts, value in series["values"]:
                ts_ms = int(_CTX.multiply(_decimal(ts, "timestamp"), 1000))
                out.append(Sample(name, labels, ts_ms, _decimal(value, name)))
        return out


def parse_exposition(text: str, default_ts_ms: int) -> list[Sample]:
    """cAdvisor samples from Prometheus text exposition; a sample without its own timestamp
    gets ``default_ts_ms`` (the scrape time). Floats become ``Decimal(repr(x))``."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in SERIES:
                continue
            ts = s.timestamp
            if ts is None:
                ts_ms = default_ts_ms
            else:
                ts_ms = int(_CTX.multiply(_decimal(repr(float(ts)), "timestamp"), 1000))
            value = Decimal(repr(float(s.value)))
            out.append(Sample(s.name, tuple(sorted(s.labels.items())), ts_ms, value))
    return out


class CadvisorSource:
    """Raw samples from scraping a cAdvisor ``/metrics`` endpoint directly."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.endpoint = url if parts.path not in ("", "/") else url.rstrip("/") + "/metrics"
        self.timeout = timeout
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def fetch(self, now_ms: int) -> list[Sample]:
        """One scrape; samples without a timestamp are stamped ``now_ms``."""
        try:
            resp = self._http.get(self.endpoint, headers={"Accept": "text/plain; version=0.0.4"})
        except httpx.TimeoutException:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: HTTP {resp.status_code}: {resp.text[:200]!r}")
        try:
            return parse_exposition(resp.text, now_ms)
        except (ValueError, TypeError, IndexError) as exc:
            raise ContainerSourceError(
                f"containers: GET {self.endpoint}: malformed exposition: {exc}") from None


# ---- the producer --------------------------------------------------------------------------


class ContainerProducer:
    """Each poll: fetch samples, fold them into the collector, publish closed steps, flush."""

    def __init__(
        self,
        source: PrometheusSource | CadvisorSource,
        collector: ContainerCollector,
        publisher: EnvelopePublisher | None,
    ) -> None:
        self.source = source
        self.collector = collector
        self.publisher = publisher
        self._unsent: list[dict[str, Any]] = []

    def poll_once(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        """One poll; returns the records published (empty when the source failed)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        try:
            samples = self.source.fetch(now)
        except ContainerSourceError as exc:
            # steps are not closed either: the samples of this period come with the next poll
            log.error("%s; nothing published this poll", exc)
            return []
        records = self.collector.collect(samples, now)
        self.collector.forget(now - 24 * 3600_000)
        if self.publisher is None:
            return records
        batch = self._unsent + records
        if not batch:
            return []
        try:
            self.publisher.send(batch)
            self.publisher.flush()
        except PublishError as exc:
            self._unsent = batch[-_MAX_UNSENT:]
            log.error("containers: Kafka did not acknowledge %d records (%s); retried next poll",
                      len(batch), exc)
            return []
        self._unsent = []
        log.info("containers: published %d records", len(batch))
        return batch

    def run(self, stop: threading.Event, period_seconds: float) -> None:
        """Poll every ``period_seconds`` until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            self.poll_once()
            stop.wait(max(0.0, period_seconds - (time.monotonic() - started)))


# ---- command line --------------------------------------------------------------------------


def build_parser_args(parser: argparse.ArgumentParser) -> None:
    """Add the producer's options to ``parser`` (``metering produce containers``)."""
    parser.add_argument("--prometheus-url", default="http://localhost:9090",
                        help="Prometheus that scrapes cAdvisor (default http://localhost:9090)")
    parser.add_argument("--cadvisor-url", default=None,
                        help="scrape this cAdvisor /metrics endpoint directly instead of Prometheus")
    parser.add_argument("--label-name", default=None, help="only series with this label ...")
    parser.add_argument("--label-value", default=None, help="... equal to this value")
    parser.add_argument("--tenant-label", default="namespace",
                        help="label whose value is the tenant id (default: namespace)")
    parser.add_argument("--resolution", type=float, default=60.0,
                        help="seconds per step: memory integration grid and record granularity; "
                             "gaps are samples more than 2 x resolution apart (default 60)")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between Prometheus queries (a cAdvisor scrape happens every "
                             "--resolution seconds instead)")
    parser.add_argument("--max-lookback", type=float, default=3600.0,
                        help="longest window read from Prometheus after an outage (seconds)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    parser.add_argument("--once", action="store_true", help="poll once, then exit")


def producer_from_args(
    args: argparse.Namespace, publisher: EnvelopePublisher | None
) -> tuple[ContainerProducer, float]:
    """The producer and its poll period from parsed options; ConfigError for bad values."""
    from metering.errors import ConfigError

    if bool(args.label_name) != (args.label_value is not None):
        raise ConfigError("--label-name and --label-value go together")
    if args.resolution <= 0 or args.interval <= 0:
        raise ConfigError("--resolution and --interval must be positive")
    try:
        collector = ContainerCollector(
            resolution_seconds=Decimal(str(args.resolution)), tenant_label=args.tenant_label,
            label_name=args.label_name, label_value=args.label_value)
    except ValueError as exc:
        raise ConfigError(f"--resolution: {exc}") from exc
    source: PrometheusSource | CadvisorSource
    if args.cadvisor_url:
        source = CadvisorSource(args.cadvisor_url, timeout=args.timeout)
        period = args.resolution
    else:
        source = PrometheusSource(
            args.prometheus_url, label_name=args.label_name, label_value=args.label_value,
            timeout=args.timeout,
            initial_lookback_seconds=max(args.interval, 2 * args.resolution) + 2 * args.resolution,
            max_lookback_seconds=args.max_lookback,
            overlap_seconds=2 * args.resolution)
        period = args.interval
    return ContainerProducer(source, collector, publisher), period


def run_from_args(settings: Settings, args: argparse.Namespace) -> None:
    """Run the producer in the foreground until SIGINT/SIGTERM (or one poll with ``--once``)."""
    from metering.errors import ConfigError
    from metering.topics import ensure_topics

    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: the container producer publishes to Kafka")
    ensure_topics(settings, bootstrap)
    publisher = EnvelopePublisher(bootstrap, settings.topic(CONTAINERS_TOPIC), source=SOURCE,
                                  producer_name="containers-producer")
    producer, period = producer_from_args(args, publisher)
    try:
        if args.once:
            records = producer.poll_once()
            print(f"containers: published {len(records)} records", flush=True)
            return
        what = args.cadvisor_url or args.prometheus_url
        print(f"containers: reading {what} every {period:g}s, publishing to {publisher.topic}",
              flush=True)
        run_until_stopped(lambda stop: producer.run(stop, period))
    finally:
        producer.source.close()
