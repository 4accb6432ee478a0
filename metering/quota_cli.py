"""``metering quota ...``: set, remove and list quota limits at run time.

A limit set here is a ``QuotaLimit`` record on the compacted topic ``quota.limits`` (key
``tenant|metric|period``); every stream worker follows that topic and applies it to the
next window it processes. ``remove`` publishes a record with no limit (it also hides a
limit of the quota file); ``remove --fallback`` publishes a tombstone instead, so the quota
file's limit for that key, if any, applies again.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from metering import topics as names
from metering.config import Settings
from metering.errors import ConfigError, MeteringError
from metering.kafka import producer_config
from metering.topics import ensure_topics
from streams.aggregations import DEFAULT_METRIC_AGGREGATIONS
from streams.quotas import (
    ADDITIVE_AGGREGATIONS,
    LIMITS_TOPIC,
    SCORE_METRIC,
    LimitBook,
    QuotaError,
    QuotaLimit,
    limit_codec,
    limit_from_record,
    limit_key,
    limit_to_record,
    load_quota_file,
    make_limit,
    parse_limit_key,
)

__all__ = [
    "LIMITS_TOPIC",
    "add_quota_parser",
    "ensure_quota_topics",
    "format_limits",
    "list_limits",
    "read_limit_book",
    "remove_limit",
    "set_limit",
]



def _bootstrap(settings: Settings, bootstrap: str | None) -> str:
    servers = bootstrap or settings.kafka_bootstrap_servers
    if not servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: point it at Kafka, or start the embedded "
                          "broker with `metering broker`")
    return servers


def ensure_quota_topics(settings: Settings, bootstrap: str | None = None, timeout: float = 30.0) -> None:
    """Create ``quota.limits`` (compacted) and ``quota.alerts`` when missing; idempotent."""
    ensure_topics(settings, _bootstrap(settings, bootstrap), timeout, only=[LIMITS_TOPIC, names.ALERTS])


def _check_quotable(metric: str, settings: Settings | None = None) -> None:
    # the worker aggregates with the configured table, so judge with it too
    table = (settings.metric_aggregations if settings is not None else None) or DEFAULT_METRIC_AGGREGATIONS
    agg = table.get(metric, "sum")
    if metric != SCORE_METRIC and agg not in ADDITIVE_AGGREGATIONS:
        raise QuotaError(
            f"metric {metric!r} is aggregated with {agg!r}, which does not add up across windows; "
            f"quotas count sum and count metrics, and {SCORE_METRIC!r} (the billing score)")


def _publish(settings: Settings, bootstrap: str | None, key: str, value: bytes | None,
             timeout: float) -> None:
    servers = _bootstrap(settings, bootstrap)
    producer = Producer(producer_config(servers))
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    topic = settings.topic(LIMITS_TOPIC)
    try:
        producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
    except KafkaException as exc:
        raise MeteringError(f"cannot publish to {topic}: {exc}") from exc
    left = producer.flush(timeout)
    if left:
        raise MeteringError(f"{topic}: not acknowledged within {timeout:.0f} s (is Kafka at {servers} up?)")
    if errors:
        raise MeteringError(f"{topic}: {errors[0]} (create the topics with `metering topics`)")


def set_limit(
    settings: Settings,
    tenant: str,
    metric: str,
    period: str,
    limit: Any,
    thresholds: Iterable[int] | None = None,
    *,
    bootstrap: str | None = None,
    timeout: float = 30.0,
) -> QuotaLimit:
    """Publish a limit (validated; ``tenant`` ``*`` sets the default of every tenant) and wait
    until Kafka acknowledged it. Raises QuotaError for an invalid limit, MeteringError when
    Kafka does not take it."""
    _check_quotable(metric, settings)
    lim = make_limit(tenant, metric, period, limit, thresholds, set_at_ms=int(time.time() * 1000))
    if lim.limit is None:
        raise QuotaError("a limit is needed; use remove_limit to remove one")
    _publish(settings, bootstrap, lim.key, limit_codec().encode(limit_to_record(lim)), timeout)
    return lim


def remove_limit(
    settings: Settings,
    tenant: str,
    metric: str,
    period: str,
    *,
    fallback: bool = False,
    bootstrap: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Remove a limit: a record without limit (hides the quota file's too), or with
    ``fallback`` a tombstone (the quota file's limit for the key applies again)."""
    lim = make_limit(tenant, metric, period, None, set_at_ms=int(time.time() * 1000))
    value = None if fallback else limit_codec().encode(limit_to_record(lim))
    _publish(settings, bootstrap, lim.key, value, timeout)


def read_limit_book(
    settings: Settings,
    *,
    quota_file: str | None = None,
    bootstrap: str | None = None,
    timeout: float = 30.0,
) -> LimitBook:
    """The limits a worker would apply now: the quota file overlaid by all of ``quota.limits``."""
    path = quota_file if quota_file is not None else getattr(settings, "quota_file", None)
    book = LimitBook(load_quota_file(path).limits if path else ())
    servers = _bootstrap(settings, bootstrap)
    topic = settings.topic(LIMITS_TOPIC)
    consumer = Consumer({"bootstrap.servers": servers, "group.id": "metering-quota-cli",
                         "enable.auto.commit": False, "log_level": 4})
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return book  # no run-time limits yet
        tps = [TopicPartition(topic, p, 0) for p in sorted(meta.partitions)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout)[1] for tp in tps}
        consumer.assign(tps)
        positions = {p: 0 for p in ends}
        deadline = time.monotonic() + timeout
        while True:
            msgs = consumer.consume(1000, timeout=0.3)
            for m in msgs:
                if m.error():
                    continue
                positions[int(m.partition() or 0)] = int(m.offset() or 0) + 1
                key = (m.key() or b"").decode("utf-8", "replace")
                try:
                    parse_limit_key(key)
                    val = m.value()
                    lim = None if val is None else limit_from_record(limit_codec().decode(val), key)
                    book.apply(key, lim)
                except (QuotaError, ValueError):
                    continue  # the workers ignore it too
            # Tansu reports the last batch's base offset + 1 as the end: finish the batch
            if not msgs and all(positions[p] >= ends[p] for p in ends):
                return book
            if time.monotonic() > deadline:
                raise MeteringError(f"{topic}: could not read to the end within {timeout:.0f} s")
    except KafkaException as exc:
        raise MeteringError(f"cannot read {topic}: {exc}") from exc
    finally:
        consumer.close()


def list_limits(
    settings: Settings,
    *,
    quota_file: str | None = None,
    bootstrap: str | None = None,
    timeout: float = 30.0,
) -> list[QuotaLimit]:
    """Every limit in force (file and run-time), sorted by tenant, metric and period."""
    return read_limit_book(settings, quota_file=quota_file, bootstrap=bootstrap, timeout=timeout).effective()


def format_limits(limits: Iterable[QuotaLimit], default_thresholds: Iterable[int] = (80, 100)) -> str:
    """A plain-text table of limits (for ``metering quota list``)."""
    rows = [("TENANT", "METRIC", "PERIOD", "LIMIT", "THRESHOLDS %", "SOURCE")]
    for lim in limits:
        th = lim.thresholds or tuple(default_thresholds)
        limit = format(lim.limit.normalize(), "f") if lim.limit is not None else "none"
        rows.append((lim.tenant, lim.metric, lim.period, limit, ",".join(map(str, th)), lim.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _thresholds_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole percentages") from exc


def _cmd_set(settings: Settings, args: argparse.Namespace) -> None:
    lim = set_limit(settings, args.tenant, args.metric, args.period, args.limit, args.thresholds)
    print(f"set {limit_key(lim.tenant, lim.metric, lim.period)} = {lim.limit}"
          + (f" (thresholds {','.join(map(str, lim.thresholds))} %)" if lim.thresholds else ""))


def _cmd_remove(settings: Settings, args: argparse.Namespace) -> None:
    remove_limit(settings, args.tenant, args.metric, args.period, fallback=args.fallback)
    what = "run-time setting forgotten" if args.fallback else "removed"
    print(f"{limit_key(args.tenant, args.metric, args.period)}: {what}")


def _cmd_list(settings: Settings, args: argparse.Namespace) -> None:
    defaults = getattr(settings, "quota_thresholds_percent", None) or (80, 100)
    print(format_limits(list_limits(settings), defaults))


def add_quota_parser(sub: Any) -> None:
    """Add ``quota set|remove|list`` to the ``metering`` command's subparsers; each sets
    ``fn(settings, args)`` like the other commands."""
    q = sub.add_parser("quota", help="set, remove and list quota limits at run time")
    qs = q.add_subparsers(dest="quota_command", required=True)
    s = qs.add_parser("set", help="set a limit: TENANT METRIC PERIOD LIMIT (tenant * = default)")
    s.add_argument("tenant")
    s.add_argument("metric", help="a sum/count metric, or 'score' (the billing score)")
    s.add_argument("period", choices=["day", "month"])
    s.add_argument("limit", help="exact decimal, at most 9 decimal places")
    s.add_argument("--thresholds", type=_thresholds_arg, default=None,
                   help="alert thresholds in percent, e.g. 50,80,100 (default: the workers')")
    s.set_defaults(fn=_cmd_set)
    r = qs.add_parser("remove", help="remove a limit (also one from the quota file)")
    r.add_argument("tenant")
    r.add_argument("metric")
    r.add_argument("period", choices=["day", "month"])
    r.add_argument("--fallback", action="store_true",
                   help="only forget the run-time setting: the quota file's limit applies again")
    r.set_defaults(fn=_cmd_remove)
    ls = qs.add_parser("list", help="the limits in force (quota file and run-time)")
    ls.set_defaults(fn=_cmd_list)
