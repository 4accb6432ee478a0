"""Redis Enterprise Software usage producer (``metering produce redis-enterprise``).

Every ``--interval`` seconds it reads the cluster REST API with basic auth::

    GET /v1/nodes     [{"uid": 1, "status": "active", "total_memory": 6260334592, "cores": 4, ...}]
    GET /v1/bdbs      [{"uid": 1, "name": "db1", "memory_size": 1073741824, "shards_count": 1,
                        "replication": false, ...}]
    GET /v1/shards    [{"uid": "1", "bdb_uid": 1, "node_uid": "1", "role": "master", ...}]
    GET /v1/license   {"cluster_name": "c.example.com", "shards_limit": 300,
                       "ram_shards_limit": 300, "flash_shards_limit": 0, "expired": false, ...}

and publishes, for the interval that just ended (intervals are aligned to the epoch, so a
re-poll of the same interval yields the same event ids and never double-bills):

================== =============================== ==========================================
metric             resource_id                     value
================== =============================== ==========================================
node_memory_bytes  ``<cluster>/node:<uid>``        the node's RAM (``total_memory``)
node_cpu_cores     ``<cluster>/node:<uid>``        the node's CPU cores (``cores``)
shards_used        ``<cluster>``                   shards deployed (``/v1/shards``)
shards_max         ``<cluster>``                   shards the licence allows (or ``--shards``)
db_memory_bytes    ``<cluster>/db:<uid>``          the database's memory limit (``memory_size``)
db_shards          ``<cluster>/db:<uid>``          the database's shards, replicas included
================== =============================== ==========================================

All values are gauges sampled once per interval (event time = interval end); the stream
side should aggregate them with ``max``/``resource_mean``, not ``sum``.

Only the fields above are relied on; others are ignored, and numbers may arrive as JSON
integers, floats or numeric strings. A poll whose four answers are not all good (HTTP 401,
a timeout, a body that is not JSON or lacks a needed field) logs one error naming the
endpoint and publishes nothing: a billing producer never guesses.

With ``--send-to URL`` every poll also POSTs one report to a billing endpoint, in the shape
of Google's ubbagent / the original meter sidecar::

    {"name": "<metric name>", "startTime": "2024-05-01T10:00:00Z",
     "endTime": "2024-05-01T10:01:00Z", "value": {"int64Value": 60}}

The value is ``--report-value`` (default ``elapsed_seconds``: seconds since the end of the
last report the endpoint accepted, so a failed report is covered by the next one); the name
is ``--metric-name`` (default: the report value's name) or, with ``--infer-metric-name``,
what the user's ``infer_metric_name(values: dict) -> str`` in ``--infer-metric-module``
returns for the poll's values (e.g. a pricing tier). With ``--send-to``, ``--metric-name``
or the hook, that name is also attached to the published records as
``metadata["billing_metric"]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from producers.errors import ProducerError, PublishError
from producers.publisher import EnvelopePublisher, usage_record
from producers.runner import run_until_stopped

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = [
    "ENDPOINTS",
    "REDIS_TOPIC",
    "REPORT_VALUES",
    "SOURCE",
    "ClusterSnapshot",
    "Database",
    "License",
    "MalformedResponse",
    "Node",
    "PollResult",
    "RedisEnterpriseClient",
    "RedisEnterpriseError",
    "RedisEnterpriseProducer",
    "Shard",
    "build_parser_args",
    "build_records",
    "cluster_values",
    "iso_utc",
    "load_infer_function",
    "parse_snapshot",
    "producer_from_args",
    "run_from_args",
]

log = logging.getLogger(__name__)

REDIS_TOPIC = "usage.redis"
SOURCE = "redis-enterprise"
ENDPOINTS = ("/v1/nodes", "/v1/bdbs", "/v1/shards", "/v1/license")

#: values a report can carry (``--report-value``); all are whole numbers
REPORT_VALUES = (
    "elapsed_seconds",
    "shards_used",
    "shards_max",
    "node_memory_bytes",
    "node_cpu_cores",
    "db_memory_bytes",
    "nodes",
    "databases",
)

#: unsent records kept for the next poll when Kafka is unreachable
_MAX_UNSENT = 100_000


class RedisEnterpriseError(ProducerError):
    """One poll of the REST API failed; ``endpoint`` names the URL that failed."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"redis-enterprise: GET {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class MalformedResponse(ValueError):
    """A REST answer lacks a field the producer needs, or has the wrong type."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(reason)
        self.endpoint = endpoint


# ---- documented JSON shapes, minimal and tolerant ------------------------------------------


@dataclass(frozen=True)
class Node:
    """A cluster node: ``uid``, ``total_memory`` (bytes), ``cores``, ``status``."""

    uid: str
    total_memory: Decimal
    cores: Decimal
    status: str


@dataclass(frozen=True)
class Database:
    """A database (bdb): ``uid``, ``name``, ``memory_size`` (bytes), ``shards_count``."""

    uid: str
    name: str
    memory_size: Decimal | None
    shards_count: int | None
    replication: bool


@dataclass(frozen=True)
class Shard:
    """A shard: ``uid``, ``bdb_uid``, ``node_uid``, ``role`` (master/slave)."""

    uid: str
    bdb_uid: str | None
    node_uid: str | None
    role: str


@dataclass(frozen=True)
class License:
    """The licence (cluster key): the cluster's name and the shards it allows."""

    cluster_name: str | None
    shards_max: int | None
    ram_shards_limit: int | None
    flash_shards_limit: int | None
    expired: bool | None


@dataclass(frozen=True)
class ClusterSnapshot:
    """The four REST answers of one poll, validated."""

    nodes: tuple[Node, ...]
    databases: tuple[Database, ...]
    shards: tuple[Shard, ...]
    license: License


def _number(value: Any, endpoint: str, where: str) -> Decimal:
    """A non-negative finite number from a JSON int, float or numeric string."""
    if isinstance(value, bool) or value is None:
        raise MalformedResponse(endpoint, f"{where} is {value!r}, expected a number")
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        d = Decimal(repr(value))  # the shortest decimal that round-trips, never binary noise
    elif isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise MalformedResponse(endpoint, f"{where} is {value!r}, expected a number") from None
    else:
        raise MalformedResponse(endpoint, f"{where} is {type(value).__name__}, expected a number")
    if not d.is_finite() or d < 0:
        raise MalformedResponse(endpoint, f"{where} is {value!r}, expected a non-negative number")
    return d


def _optional_int(obj: Mapping[str, Any], key: str, endpoint: str, where: str) -> int | None:
    if obj.get(key) is None:
        return None
    d = _number(obj[key], endpoint, f"{where}.{key}")
    if d != d.to_integral_value():
        raise MalformedResponse(endpoint, f"{where}.{key} is {obj[key]!r}, expected an integer")
    return int(d)


def _uid(obj: Mapping[str, Any], endpoint: str, where: str, key: str = "uid") -> str:
    uid = obj.get(key)
    if isinstance(uid, bool) or not isinstance(uid, int | str) or str(uid).strip() == "":
        raise MalformedResponse(endpoint, f"{where}.{key} is {uid!r}, expected an id")
    return str(uid).strip()


def _objects(raw: Any, endpoint: str) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list):
        raise MalformedResponse(endpoint, f"expected a JSON array, got {type(raw).__name__}")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise MalformedResponse(endpoint, f"item {i} is {type(item).__name__}, expected an object")
    return raw


def parse_snapshot(raw: Mapping[str, Any]) -> ClusterSnapshot:
    """Validate the decoded JSON of the four endpoints (keyed by path, e.g. ``/v1/nodes``).

    Raises :class:`MalformedResponse` naming the endpoint and the field at fault.
    """
    ep = "/v1/nodes"
    nodes = []
    for i, n in enumerate(_objects(raw.get(ep), ep)):
        where = f"nodes[{i}]"
        nodes.append(Node(
            uid=_uid(n, ep, where),
            total_memory=_number(n.get("total_memory"), ep, f"{where}.total_memory"),
            cores=_number(n.get("cores"), ep, f"{where}.cores"),
            status=str(n.get("status") or "unknown"),
        ))
    ep = "/v1/bdbs"
    dbs = []
    for i, b in enumerate(_objects(raw.get(ep), ep)):
        where = f"bdbs[{i}]"
        mem = b.get("memory_size")
        dbs.append(Database(
            uid=_uid(b, ep, where),
            name=str(b.get("name") or ""),
            memory_size=None if mem is None else _number(mem, ep, f"{where}.memory_size"),
            shards_count=_optional_int(b, "shards_count", ep, where),
            replication=bool(b.get("replication") or False),
        ))
    ep = "/v1/shards"
    shards = []
    for i, s in enumerate(_objects(raw.get(ep), ep)):
        where = f"shards[{i}]"
        shards.append(Shard(
            uid=_uid(s, ep, where),
            bdb_uid=None if s.get("bdb_uid") is None else _uid(s, ep, where, "bdb_uid"),
            node_uid=None if s.get("node_uid") is None else _uid(s, ep, where, "node_uid"),
            role=str(s.get("role") or ""),
        ))
    ep = "/v1/license"
    lic = raw.get(ep)
    if not isinstance(lic, dict):
        raise MalformedResponse(ep, f"expected a JSON object, got {type(lic).__name__}")
    ram = _optional_int(lic, "ram_shards_limit", ep, "license")
    flash = _optional_int(lic, "flash_shards_limit", ep, "license")
    # "shards_max" is accepted too; "shards_limit" is the documented total; since 7.2 the
    # limits are per shard type (RAM, flash) and their sum is the total
    total = _optional_int(lic, "shards_max", ep, "license")
    if total is None:
        total = _optional_int(lic, "shards_limit", ep, "license")
    if total is None and (ram is not None or flash is not None):
        total = (ram or 0) + (flash or 0)
    expired = lic.get("expired")
    return ClusterSnapshot(
        nodes=tuple(nodes),
        databases=tuple(dbs),
        shards=tuple(shards),
        license=License(
            cluster_name=str(lic["cluster_name"]) if lic.get("cluster_name") else None,
            shards_max=total,
            ram_shards_limit=ram,
            flash_shards_limit=flash,
            expired=expired if isinstance(expired, bool) else None,
        ),
    )


# ---- pure: snapshot -> records and values --------------------------------------------------


def _db_shards(snap: ClusterSnapshot) -> dict[str, int]:
    """Shards per database: counted in /v1/shards, else ``shards_count`` x (1 + replica)."""
    counted: dict[str, int] = {}
    for s in snap.shards:
        if s.bdb_uid is not None:
            counted[s.bdb_uid] = counted.get(s.bdb_uid, 0) + 1
    out: dict[str, int] = {}
    for db in snap.databases:
        if db.uid in counted:
            out[db.uid] = counted[db.uid]
        elif db.shards_count is not None:
            out[db.uid] = db.shards_count * (2 if db.replication else 1)
    return out


def cluster_values(snap: ClusterSnapshot, *, shards_max: int | None = None) -> dict[str, int]:
    """The cluster's totals for a report or the infer hook (whole numbers).

    ``shards_max`` (``--shards``) overrides the licence's limit. ``shards_max`` is absent
    from the result when neither says.
    """
    values = {
        "nodes": len(snap.nodes),
        "databases": len(snap.databases),
        "node_memory_bytes": int(sum((n.total_memory for n in snap.nodes), Decimal(0))),
        "node_cpu_cores": int(sum((n.cores for n in snap.nodes), Decimal(0))),
        "shards_used": len(snap.shards),
        "db_memory_bytes": int(sum((d.memory_size or Decimal(0) for d in snap.databases), Decimal(0))),
    }
    limit = shards_max if shards_max is not None else snap.license.shards_max
    if limit is not None:
        values["shards_max"] = limit
    return values


def build_records(
    snap: ClusterSnapshot,
    *,
    cluster: str,
    tenant: str,
    start_ms: int,
    end_ms: int,
    shards_max: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The usage records of one interval ``(start_ms, end_ms]``; event time = ``end_ms``.

    Event ids are ``redis:<cluster>:<kind>:<uid>:<metric>:<end_ms>``: the same interval
    polled twice gives identical records.
    """
    base = {"cluster": cluster, "interval_start_ms": str(start_ms), **(metadata or {})}
    out: list[dict[str, Any]] = []

    def add(kind: str, uid: str | None, metric: str, value: Decimal | int, extra: Mapping[str, str]) -> None:
        resource = cluster if uid is None else f"{cluster}/{kind}:{uid}"
        key = f"{kind}:{uid}" if uid is not None else kind
        out.append(usage_record(
            event_id=f"redis:{cluster}:{key}:{metric}:{end_ms}",
            tenant_id=tenant,
            source=SOURCE,
            resource_id=resource,
            metric=metric,
            value=value,
            event_time_ms=end_ms,
            metadata={**base, **extra},
        ))

    for n in snap.nodes:
        meta = {"node_uid": n.uid, "status": n.status}
        add("node", n.uid, "node_memory_bytes", n.total_memory, meta)
        add("node", n.uid, "node_cpu_cores", n.cores, meta)
    lic = snap.license
    cmeta: dict[str, str] = {}
    if lic.ram_shards_limit is not None:
        cmeta["ram_shards_limit"] = str(lic.ram_shards_limit)
    if lic.flash_shards_limit is not None:
        cmeta["flash_shards_limit"] = str(lic.flash_shards_limit)
    if lic.expired is not None:
        cmeta["license_expired"] = str(lic.expired).lower()
    add("cluster", None, "shards_used", len(snap.shards), cmeta)
    limit = shards_max if shards_max is not None else lic.shards_max
    if limit is not None:
        src = "--shards" if shards_max is not None else "license"
        add("cluster", None, "shards_max", limit, {**cmeta, "shards_max_source": src})
    per_db = _db_shards(snap)
    for db in snap.databases:
        meta = {"db_uid": db.uid, "db_name": db.name}
        if db.memory_size is not None:
            add("db", db.uid, "db_memory_bytes", db.memory_size, meta)
        if db.uid in per_db:
            add("db", db.uid, "db_shards", per_db[db.uid], meta)
    return out


def iso_utc(ms: int) -> str:
    """ISO 8601 UTC with a ``Z``: ``2024-05-01T10:00:00Z`` (milliseconds only when nonzero)."""
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"


def load_infer_function(spec: str) -> Callable[[dict[str, int]], str]:
    """``infer_metric_name`` from a module path (``pkg.tiers``) or a file (``/etc/tiers.py``)."""
    from metering.errors import ConfigError

    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise ConfigError(f"--infer-metric-module {spec}: no such file")
            mod_spec = importlib.util.spec_from_file_location(f"_metering_infer_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise ConfigError(f"--infer-metric-module {spec}: cannot load it as Python")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--infer-metric-module {spec}: cannot import: {exc!r}") from exc
    fn = getattr(module, "infer_metric_name", None)
    if not callable(fn):
        raise ConfigError(
            f"--infer-metric-module {spec}: defines no function infer_metric_name(values: dict) -> str"
        )
    return fn  # type: ignore[no-any-return]


# ---- I/O: the REST client ------------------------------------------------------------------


class RedisEnterpriseClient:
    """Reads the four endpoints with basic auth; every failure is a RedisEnterpriseError."""

    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        verify: ssl.SSLContext | bool
        if insecure:
            verify = False
        elif ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        else:
            verify = True
        self._http = httpx.Client(
            base_url=self.url,
            auth=httpx.BasicAuth(username, password),
            verify=verify,
            timeout=timeout,
            headers={"Accept": "application/json"},
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _get(self, path: str) -> Any:
        endpoint = self.url + path
        try:
            resp = self._http.get(path)
        except httpx.TimeoutException:
            raise RedisEnterpriseError(endpoint, f"timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise RedisEnterpriseError(
                    endpoint,
                    f"TLS certificate verification failed ({cause}); pass the cluster's CA with "
                    "--ca-file, or --insecure to skip verification",
                ) from None
            raise RedisEnterpriseError(endpoint, f"{type(exc).__name__}: {exc}") from None
        if resp.status_code == 401:
            raise RedisEnterpriseError(
                endpoint,
                "authentication failed (HTTP 401): check --username/--password "
                "(REDIS_ENTERPRISE_USERNAME / REDIS_ENTERPRISE_PASSWORD)",
            )
        if resp.status_code == 403:
            raise RedisEnterpriseError(endpoint, "permission denied (HTTP 403): the user needs a "
                                       "role that may view nodes, databases, shards and the licence")
        if resp.status_code != 200:
            raise RedisEnterpriseError(endpoint, f"HTTP {resp.status_code}: {resp.text[:200]!r}")
        try:
            return json.loads(resp.content)
        except ValueError as exc:
            raise RedisEnterpriseError(
                endpoint, f"malformed response body (not JSON: {exc}); starts {resp.content[:80]!r}"
            ) from None

    def fetch_raw(self) -> dict[str, Any]:
        """The decoded JSON of every endpoint, keyed by path."""
        return {path: self._get(path) for path in ENDPOINTS}

    def fetch(self) -> ClusterSnapshot:
        """All four endpoints, validated; raises RedisEnterpriseError naming the endpoint."""
        raw = self.fetch_raw()
        try:
            return parse_snapshot(raw)
        except MalformedResponse as exc:
            raise RedisEnterpriseError(
                self.url + exc.endpoint, f"malformed response body: {exc}"
            ) from None


# ---- the producer --------------------------------------------------------------------------


@dataclass
class PollResult:
    """What one poll did."""

    end_ms: int
    records: list[dict[str, Any]] = field(default_factory=list)
    published: bool = False
    report: dict[str, Any] | None = None
    report_sent: bool = False
    error: str | None = None


class RedisEnterpriseProducer:
    """Polls one cluster per interval, publishes its records, optionally reports to ``send_to``."""

    def __init__(
        self,
        client: RedisEnterpriseClient,
        publisher: EnvelopePublisher | None,
        *,
        tenant: str,
        interval_seconds: int = 60,
        cluster_name: str | None = None,
        shards: int | None = None,
        send_to: str | None = None,
        metric_name: str | None = None,
        report_value: str = "elapsed_seconds",
        infer_metric_name: Callable[[dict[str, int]], str] | None = None,
        report_timeout: float = 10.0,
    ) -> None:
        if interval_seconds < 1:
            raise ValueError("interval_seconds must be at least 1")
        if report_value not in REPORT_VALUES:
            raise ValueError(f"report_value must be one of {', '.join(REPORT_VALUES)}")
        self.client = client
        self.publisher = publisher
        self.tenant = tenant
        self.interval_ms = interval_seconds * 1000
        self.cluster_name = cluster_name
        self.shards = shards
        self.send_to = send_to
        self.metric_name = metric_name
        self.report_value = report_value
        self.infer_metric_name = infer_metric_name
        self.report_timeout = report_timeout
        self.last_report_end_ms: int | None = None
        self._unsent: list[dict[str, Any]] = []

    def _cluster(self, snap: ClusterSnapshot) -> str:
        return (
            self.cluster_name
            or snap.license.cluster_name
            or urlsplit(self.client.url).hostname
            or "redis-enterprise"
        )

    def _name(self, values: dict[str, int]) -> str | None:
        if self.infer_metric_name is None:
            return self.metric_name or self.report_value
        try:
            name = self.infer_metric_name(dict(values))
        except Exception as exc:
            log.error("redis-enterprise: infer_metric_name(%s) raised %r: no report this poll",
                      values, exc)
            return None
        if not isinstance(name, str) or not name.strip():
            log.error("redis-enterprise: infer_metric_name(%s) returned %r, not a metric name: "
                      "no report this poll", values, name)
            return None
        return name.strip()

    def poll_once(self, now_ms: int | None = None) -> PollResult:
        """Poll the interval ending at the last boundary before ``now_ms`` and publish it."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        end_ms = now - now % self.interval_ms
        start_ms = end_ms - self.interval_ms
        result = PollResult(end_ms=end_ms)
        try:
            snap = self.client.fetch()
        except RedisEnterpriseError as exc:
            log.error("%s; nothing published for the interval ending %s", exc, iso_utc(end_ms))
            result.error = str(exc)
            return result
        cluster = self._cluster(snap)
        values = cluster_values(snap, shards_max=self.shards)
        report_start = self.last_report_end_ms if self.last_report_end_ms is not None else start_ms
        values["elapsed_seconds"] = max(0, end_ms - report_start) // 1000
        name = self._name(values)
        # the records carry the report's name when one is sent, chosen or inferred
        tag = name and (self.send_to or self.metric_name or self.infer_metric_name)
        result.records = build_records(
            snap, cluster=cluster, tenant=self.tenant, start_ms=start_ms, end_ms=end_ms,
            shards_max=self.shards, metadata={"billing_metric": name} if tag and name else None,
        )
        if self.publisher is not None:
            self._publish(result)
        if self.send_to and name:
            self._report(result, name, values, report_start)
        return result

    def _publish(self, result: PollResult) -> None:
        assert self.publisher is not None
        batch = self._unsent + result.records
        try:
            self.publisher.send(batch)
            self.publisher.flush()
        except PublishError as exc:
            self._unsent = batch[-_MAX_UNSENT:]
            log.error("redis-enterprise: Kafka did not acknowledge %d records (%s); "
                      "they are retried with the next poll", len(batch), exc)
            result.error = str(exc)
            return
        self._unsent = []
        result.published = True
        log.info("redis-enterprise: published %d records for the interval ending %s",
                 len(batch), iso_utc(result.end_ms))

    def _report(self, result: PollResult, name: str, values: Mapping[str, int], start_ms: int) -> None:
        assert self.send_to
        if self.last_report_end_ms is not None and result.end_ms <= self.last_report_end_ms:
            log.info("redis-enterprise: interval ending %s already reported", iso_utc(result.end_ms))
            return
        if self.report_value not in values:
            log.error("redis-enterprise: --report-value %s is unknown for this cluster (no licence "
                      "limit and no --shards): no report sent", self.report_value)
            return
        report = {
            "name": name,
            "startTime": iso_utc(start_ms),
            "endTime": iso_utc(result.end_ms),
            "value": {"int64Value": int(values[self.report_value])},
        }
        result.report = report
        try:
            resp = httpx.post(self.send_to, json=report, timeout=self.report_timeout)
        except httpx.HTTPError as exc:
            log.error("redis-enterprise: report to %s failed (%s: %s); the next report covers "
                      "this interval too", self.send_to, type(exc).__name__, exc)
            return
        if not 200 <= resp.status_code < 300:
            log.error("redis-enterprise: report to %s answered HTTP %d (%r); the next report "
                      "covers this interval too", self.send_to, resp.status_code, resp.text[:200])
            return
        self.last_report_end_ms = result.end_ms
        result.report_sent = True

    def run(self, stop: threading.Event) -> None:
        """Poll now, then at every interval boundary, until ``stop`` is set."""
        while not stop.is_set():
            self.poll_once()
            now = time.time() * 1000
            next_boundary = (math.floor(now / self.interval_ms) + 1) * self.interval_ms
            stop.wait((next_boundary - now) / 1000 + 0.05)


# ---- command line --------------------------------------------------------------------------


def build_parser_args(parser: argparse.ArgumentParser) -> None:
    """Add the producer's options to ``parser`` (``metering produce redis-enterprise``)."""
    parser.add_argument("--url", default=None,
                        help="cluster REST API, e.g. https://cluster.example.com:9443 "
                             "(env REDIS_ENTERPRISE_URL; default https://localhost:9443)")
    parser.add_argument("--username", default=None, help="env REDIS_ENTERPRISE_USERNAME")
    parser.add_argument("--password", default=None, help="env REDIS_ENTERPRISE_PASSWORD")
    parser.add_argument("--ca-file", default=None, help="PEM CA bundle to verify the cluster's certificate")
    parser.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per REST request")
    parser.add_argument("--interval", type=int, default=60, help="seconds between polls (aligned)")
    parser.add_argument("--namespace", default=None,
                        help="the tenant when --tenant is not given (env POD_NAMESPACE; default 'default')")
    parser.add_argument("--tenant", default=None, help="tenant id of the records (overrides --namespace)")
    parser.add_argument("--cluster-name", default=None,
                        help="cluster id in records (default: the licence's cluster_name, else the URL host)")
    parser.add_argument("--shards", type=int, default=None,
                        help="shards allowed (shards_max) when the licence does not say, or to override it")
    parser.add_argument("--send-to", default=None, metavar="URL",
                        help="also POST a report per poll to this billing endpoint (ubbagent shape)")
    parser.add_argument("--metric-name", default=None,
                        help="name of the reports (default: the --report-value name)")
    parser.add_argument("--report-value", default="elapsed_seconds", choices=REPORT_VALUES,
                        help="what a report carries (default: seconds since the last accepted report)")
    parser.add_argument("--infer-metric-name", action="store_true",
                        help="name reports with infer_metric_name(values) from --infer-metric-module")
    parser.add_argument("--infer-metric-module", default=None, metavar="MODULE_OR_FILE",
                        help="Python module path or .py file defining infer_metric_name(values: dict) -> str")
    parser.add_argument("--once", action="store_true", help="poll one interval, then exit")


def producer_from_args(
    args: argparse.Namespace, publisher: EnvelopePublisher | None
) -> RedisEnterpriseProducer:
    """Build the producer from parsed options; raises ConfigError for bad combinations."""
    from metering.errors import ConfigError

    url = args.url or os.environ.get("REDIS_ENTERPRISE_URL") or "https://localhost:9443"
    username = args.username or os.environ.get("REDIS_ENTERPRISE_USERNAME")
    password = args.password or os.environ.get("REDIS_ENTERPRISE_PASSWORD")
    if not username or password is None:
        raise ConfigError("redis-enterprise needs --username and --password "
                          "(or REDIS_ENTERPRISE_USERNAME / REDIS_ENTERPRISE_PASSWORD)")
    if args.interval < 1:
        raise ConfigError("--interval must be at least 1 second")
    if args.infer_metric_name and not args.infer_metric_module:
        raise ConfigError("--infer-metric-name needs --infer-metric-module")
    if args.infer_metric_module and not args.infer_metric_name:
        raise ConfigError("--infer-metric-module is only used with --infer-metric-name")
    if args.shards is not None and args.shards < 0:
        raise ConfigError("--shards must not be negative")
    infer = load_infer_function(args.infer_metric_module) if args.infer_metric_name else None
    try:
        client = RedisEnterpriseClient(url, username, password, ca_file=args.ca_file,
                                       insecure=args.insecure, timeout=args.timeout)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file {args.ca_file}: {exc}") from exc
    tenant = args.tenant or args.namespace or os.environ.get("POD_NAMESPACE") or "default"
    return RedisEnterpriseProducer(
        client, publisher, tenant=tenant, interval_seconds=args.interval,
        cluster_name=args.cluster_name, shards=args.shards, send_to=args.send_to,
        metric_name=args.metric_name, report_value=args.report_value, infer_metric_name=infer,
    )


def run_from_args(settings: Settings, args: argparse.Namespace) -> None:
    """Run the producer in the foreground until SIGINT/SIGTERM (or one poll with ``--once``)."""
    from metering.errors import ConfigError, MeteringError
    from metering.topics import ensure_topics

    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: the Redis Enterprise producer "
                          "publishes to Kafka")
    ensure_topics(settings, bootstrap)
    publisher = EnvelopePublisher(bootstrap, settings.topic(REDIS_TOPIC), source=SOURCE,
                                  producer_name="redis-enterprise-producer")
    producer = producer_from_args(args, publisher)
    try:
        if args.once:
            result = producer.poll_once()
            if result.error:
                raise MeteringError(result.error)
            print(f"redis-enterprise: published {len(result.records)} records", flush=True)
            return
        print(f"redis-enterprise: polling {producer.client.url} every {args.interval}s, "
              f"publishing to {publisher.topic}", flush=True)
        run_until_stopped(producer.run)
    finally:
        producer.client.close()

