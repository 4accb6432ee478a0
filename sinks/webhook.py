"""The webhook sink: closed windows and quota alerts delivered to a billing endpoint, signed
and retried.

Delivery IS the persist step of this sink: :meth:`WebhookSink.write` returns only once every
record of the batch was delivered or dead-lettered, and the batch's dead letters and delivery
records (below) were acknowledged by Kafka; only then does the batching base commit the
offsets. A crash in between re-delivers the batch; that is harmless because every delivery of
a window carries the same ``webhook-id`` (derived from the window's identity, DESIGN rule 3)
and the same body, so a receiver that dedupes on ``webhook-id`` sees each window exactly once.

Delivery records: with ``deliveries_topic`` (``webhook.deliveries``, set by
:meth:`WebhookSink.from_settings`) every window or alert of a batch gets one
``metering.v1.WebhookDelivery`` there (key = tenant), whatever its outcome: the
``webhook-id`` actually sent, the attempts, the HTTP status of the last attempt, the status
(``delivered``; ``duplicate``: the receiver answered 409; ``dead_lettered``, then also the
dead letter's reason and the last error) and where the record came from. A record whose
payload could not be built was never attempted (0 attempts, last status 0) and names the id
it would have carried. A dead-lettered record's dead letter still goes to ``usage.dlq``
unchanged (that is the copy to replay); its delivery record is produced right after it. The
records are produced after the batch's deliveries, beside its dead letters, and one flush
waits for all of them: a batch whose records Kafka does not acknowledge is not committed
(SinkUnavailableError) and comes back, so no outcome is committed without its record. These
records are the only source of the ClickHouse sink's ``webhook_deliveries``, so every row
there carries the id the receiver saw (the report format's scoped one included). A crash
after the records are acknowledged but before the commit re-delivers the batch, and so
writes a second record of the same ``webhook-id``: that is truthful, the receiver did get a
second POST (and dedups it by ``webhook-id``). Count unique deliveries as
``uniqExact(webhook_id)``, not rows.

Outcomes of one HTTP attempt:

* 2xx: delivered;
* 409 Conflict: delivered. A receiver that already has this ``webhook-id`` may answer 409;
  retrying would never change that, and dead-lettering a report the receiver has would
  make an operator replay it for nothing;
* 408, 425, 429, every 5xx, timeouts and connection errors: retried with exponential backoff
  and jitter; ``Retry-After`` (seconds or an HTTP date) is honoured on any retried response
  that carries it (429 and 503 in practice): the wait is the longer of it (capped at
  ``retry_after_max_seconds``) and the backoff;
* any other status (other 4xx, and 3xx: redirects are not followed, a signed billing report
  is not re-posted to wherever a redirect points): dead-lettered at once, no retry.

When the attempts run out the record goes to the dead-letter topic (stage ``webhook-sink``,
reason naming the attempts and the last status or error, payload = the WindowResult in Avro
single-object encoding), so nothing is silently dropped and ``usage.dlq`` can be replayed.

Stopping (:meth:`~sinks.base.BatchingSink.stop`) interrupts deliveries waiting to retry: the
batch is then left uncommitted (SinkUnavailableError) and delivered again after restart,
under the same ids, rather than being dead-lettered or holding the shutdown for minutes.

Payload formats (``payload_format``):

* ``"usage.window"`` (default): the whole window, decimals as exact fixed-point strings;
  quota alerts (from ``quota.alerts``, when the sink is given that topic) as the
  ``quota.alert`` document of :func:`alert_payload`;
* ``"report"``: one usage report per window (alerts are not usage: a report-format sink
  delivers windows only), ``{"name", "startTime", "endTime",
  "value": {"int64Value"}, "labels": {"tenant_id"}}``. The value is the window's billing score
  (or the total of ``report_metric`` when one is configured) rounded half-up to an integer
  (ties away from zero: 2.5 -> 3; scores are never negative in practice). A value that does
  not fit in an int64 is dead-lettered ("not attempted"), never clamped.

``webhook-id`` is ``msg_`` + the first 24 hex digits of sha256(window_id) (for the report
format, of ``report:<name>|window_id``, so two report names never collide at a receiver; for
an alert, of ``alert|alert_id``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, Literal

import httpx
import orjson

from metering.config import Settings
from metering.errors import ConfigError
from metering.topics import ALERTS, DELIVERIES, DLQ, WINDOWS
from schemas import encode_dead_letter, quota_alert_codec, webhook_delivery_codec, window_codec
from sinks.base import Batch, BatchingSink, SinkRecord
from sinks.errors import SinkUnavailableError
from sinks.signing import decode_secret, signature_headers

__all__ = [
    "ALERT_FORMAT",
    "ALERT_SCOPE",
    "PAYLOAD_FORMATS",
    "DeliveryOutcome",
    "PayloadFormat",
    "WebhookSink",
    "alert_payload",
    "parse_retry_after",
    "report_payload",
    "webhook_id",
    "window_payload",
]

log = logging.getLogger(__name__)

PayloadFormat = Literal["usage.window", "report"]
PAYLOAD_FORMATS: tuple[str, ...] = ("usage.window", "report")

#: statuses worth another attempt besides 5xx
_RETRY_STATUSES = frozenset({408, 425, 429})
#: the receiver already has this message id
_DUPLICATE_STATUS = 409
#: decimal(38, 9) arithmetic without silent rounding
_CTX = Context(prec=80)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: one delivery may block a batch this long at most; librdkafka's default max.poll.interval.ms
#: (300 s) would evict a consumer whose write() takes longer than that
_MAX_POLL_INTERVAL_MS = 900_000
_USER_AGENT = "kafka-usage-metering-webhook/1"
#: the ``webhook-id`` scope of quota alerts (``webhook_id(alert_id, ALERT_SCOPE)``)
ALERT_SCOPE = "alert"
#: ``payload_format`` of a delivery record of a quota alert (the document posted)
ALERT_FORMAT = "quota.alert"


# ---- payloads ----------------------------------------------------------------------------------


def webhook_id(window_id: str, scope: str = "") -> str:
    """The ``webhook-id`` of a window: ``msg_`` + 24 hex digits of sha256(window identity).

    Deterministic, so every retry and every re-delivery after a crash carries the same id.
    ``scope`` separates deliveries of the same window that are different messages (the report
    format names its metric there), and is empty for the default format.
    """
    ident = f"{scope}|{window_id}" if scope else window_id
    return "msg_" + hashlib.sha256(ident.encode()).hexdigest()[:24]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    """ISO 8601 UTC with a ``Z``; milliseconds only when the instant has them."""
    t = _EPOCH + dt.timedelta(milliseconds=ms)
    return t.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def _dec(value: Decimal) -> str:
    """A decimal as an exact fixed-point string (never exponent notation: 0E-9 is 0.000000000)."""
    return format(value, "f")


def window_payload(window: Mapping[str, Any]) -> dict[str, Any]:
    """The ``usage.window`` JSON document of one WindowResult dict."""
    return {
        "type": "usage.window",
        "id": window["window_id"],
        "tenant_id": window["tenant_id"],
        "window_start": _iso(window["window_start_ms"]),
        "window_end": _iso(window["window_end_ms"]),
        "window_start_ms": window["window_start_ms"],
        "window_end_ms": window["window_end_ms"],
        "totals": {
            t["metric"]: {
                "aggregation": t["aggregation"],
                "value": _dec(t["value"]),
                "samples": t["samples"],
            }
            for t in window["totals"]
        },
        "sample_count": window["sample_count"],
        "score": _dec(window["score"]),
        "late_samples": window.get("late_samples", 0),
        "has_gap": window.get("has_gap", False),
    }


def alert_payload(alert: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quota.alert`` JSON document of one QuotaAlert dict."""
    return {
        "type": "quota.alert",
        "id": alert["alert_id"],
        "tenant_id": alert["tenant_id"],
        "metric": alert["metric"],
        "period": alert["period"],
        "period_start": _iso(alert["period_start_ms"]),
        "period_start_ms": alert["period_start_ms"],
        "threshold_percent": alert["threshold_percent"],
        "limit": _dec(alert["limit"]),
        "used": _dec(alert["used"]),
        "crossed_at_window_end": _iso(alert["crossed_at_window_end_ms"]),
        "crossed_at_window_end_ms": alert["crossed_at_window_end_ms"],
    }


def _round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP, context=_CTX))


_INT64 = range(-(2**63), 2**63)


def report_payload(
    window: Mapping[str, Any], name: str = "score", metric: str | None = None
) -> dict[str, Any]:
    """The ``report`` JSON document of one WindowResult dict.

    The value is the score, or the total of ``metric`` (0 when the window has none of it),
    rounded half-up to an integer. Raises ValueError when that integer does not fit in an
    int64 (the format's type): such a window is dead-lettered, never clamped.
    """
    if metric is None:
        value: Decimal = window["score"]
    else:
        value = next((t["value"] for t in window["totals"] if t["metric"] == metric), Decimal(0))
    rounded = _round_half_up(value)
    if rounded not in _INT64:
        raise ValueError(f"{name} = {_dec(value)} rounds to {rounded}, outside int64Value's range")
    return {
        "name": name,
        "startTime": _iso(window["window_start_ms"]),
        "endTime": _iso(window["window_end_ms"]),
        "value": {"int64Value": rounded},
        "labels": {"tenant_id": window["tenant_id"]},
    }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))  # delta-seconds (fractions tolerated)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=dt.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# ---- delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """How the delivery of one record ended."""

    record: SinkRecord
    delivered: bool
    attempts: int
    status: int | None
    error: str
    duplicate: bool = False
    #: the ``webhook-id`` sent; never attempted: the one it would have carried ("" when none
    #: can be derived)
    webhook_id: str = ""
    #: wall-clock time (ms) the outcome was decided (the last attempt ended, or the payload
    #: could not be built)
    finished_ms: int = 0

    def reason(self) -> str:
        """A dead-letter reason naming the attempts and the last status or error."""
        if self.attempts == 0:
            return f"webhook delivery not attempted: {self.error}"
        last = f"HTTP {self.status}" if self.status is not None else self.error
        if self.error and self.status is not None:
            last = f"{last} ({self.error})"
        return f"webhook delivery failed after {self.attempts} attempt(s); last: {last}"


class _Stopping(Exception):
    """The sink was asked to stop while a delivery was waiting to retry."""


class WebhookSink(BatchingSink):
    """Deliver closed windows from ``usage.windows`` (and quota alerts from ``alerts_topic``,
    when given) to a webhook, signed and retried."""

    name = "webhook-sink"

    def __init__(
        self,
        *,
        url: str,
        bootstrap_servers: str,
        windows_topic: str,
        group_id: str,
        alerts_topic: str | None = None,
        dlq_topic: str,
        deliveries_topic: str | None = None,
        secret: str | None = None,
        payload_format: PayloadFormat = "usage.window",
        report_name: str | None = None,
        report_metric: str | None = None,
        timeout_seconds: float = 10.0,
        max_attempts: int = 8,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        retry_after_max_seconds: float = 60.0,
        max_concurrency: int = 8,
        batch_size: int = 1000,
        flush_seconds: float = 1.0,
        consumer_config: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Build the sink; nothing connects until :meth:`run` (or :meth:`write`).

        ``max_attempts`` counts HTTP attempts per record (1 = no retry). Backoff before retry
        ``n`` is ``min(backoff_max, backoff_base * 2**(n-1))``, of which the upper half is
        random (jitter); a longer ``Retry-After`` wins, up to ``retry_after_max_seconds``.
        ``max_concurrency`` deliveries of a batch run at once (so windows may arrive out of
        order; each is self-contained). The consumer's ``max.poll.interval.ms`` defaults to
        15 minutes because a batch blocks the consume loop while it is delivered.
        ``deliveries_topic``: where the WebhookDelivery record of each outcome (delivered,
        duplicate or dead-lettered) goes (None: no records).
        """
        if payload_format not in PAYLOAD_FORMATS:
            raise ValueError(f"payload_format must be one of {PAYLOAD_FORMATS}, not {payload_format!r}")
        if alerts_topic and payload_format == "report":
            raise ValueError("the report format carries usage only: deliver quota alerts with a "
                             "usage.window-format sink")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        try:
            scheme = httpx.URL(url).scheme
        except httpx.InvalidURL as exc:
            raise ValueError(f"webhook url {url!r} is not a URL: {exc}") from exc
        if scheme not in ("http", "https"):
            raise ValueError(f"webhook url {url!r} must be http:// or https://")
        if secret:
            decode_secret(secret)  # fail at start-up, not at the first delivery
        conf: dict[str, Any] = {"max.poll.interval.ms": _MAX_POLL_INTERVAL_MS}
        conf.update(consumer_config or {})
        topics = {windows_topic: window_codec()}
        if alerts_topic:
            topics[alerts_topic] = quota_alert_codec()
        super().__init__(
            topics=topics,
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            dlq_topic=dlq_topic,
            batch_size=batch_size,
            flush_seconds=flush_seconds,
            consumer_config=conf,
        )
        self.url = url
        self.windows_topic = windows_topic
        self.alerts_topic = alerts_topic or None
        self.deliveries_topic = deliveries_topic or None
        self.secret = secret or None
        self.payload_format: PayloadFormat = payload_format
        self.report_metric = report_metric
        self.report_name = report_name or report_metric or "score"
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.retry_after_max_seconds = retry_after_max_seconds
        self.max_concurrency = max_concurrency
        self.extra_headers = dict(extra_headers or {})
        #: records delivered (2xx, or 409 = the receiver already had it)
        self.delivered = 0
        #: records sent to the dead-letter topic after failed delivery
        self.dead_lettered = 0
        #: HTTP attempts made, first tries and retries
        self.attempts = 0
        #: records the receiver answered with 409 (already had them)
        self.duplicates = 0
        #: delivery records acknowledged by Kafka on ``deliveries_topic``
        self.delivery_records = 0
        #: how long write() waits for Kafka to acknowledge a batch's dead letters and records
        self.persist_timeout_seconds = 30.0
        self._counter_lock = threading.Lock()
        self._random = random.Random()
        self._client = httpx.Client(
            timeout=timeout_seconds,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            follow_redirects=False,
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="webhook")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        bootstrap_servers: str,
        url: str | None = None,
        secret: str | None = None,
        **kwargs: Any,
    ) -> WebhookSink:
        """Build the sink from settings; ``url``/``secret`` default to WEBHOOK_URL/WEBHOOK_SECRET.

        ``kwargs`` override any constructor argument (``payload_format``, ``max_attempts`` ...).
        Quota alerts are delivered too when WEBHOOK_ALERTS is on and the format is the default.
        Every outcome (dead-lettered ones too) is recorded on ``webhook.deliveries``.
        """
        target = url or settings.webhook_url
        if not target:
            raise ConfigError("WEBHOOK_URL is not set: the webhook sink needs a destination")
        params: dict[str, Any] = {
            "windows_topic": settings.topic(WINDOWS),
            "group_id": f"{settings.consumer_group_prefix}.webhook-sink",
            "dlq_topic": settings.topic(DLQ),
            "deliveries_topic": settings.topic(DELIVERIES),
            # a batch blocks the consume loop while it is delivered: keep it moderate
            "batch_size": min(settings.sink_batch_size, 1000),
            "flush_seconds": settings.sink_flush_seconds,
            "timeout_seconds": settings.webhook_timeout_seconds,
        }
        params.update(kwargs)
        if "alerts_topic" not in params and params.get("payload_format", "usage.window") != "report":
            params["alerts_topic"] = settings.topic(ALERTS) if settings.webhook_alerts else None
        return cls(
            url=target,
            secret=secret if secret is not None else settings.webhook_secret,
            bootstrap_servers=bootstrap_servers,
            **params,
        )

    # ---- the persist step --------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Deliver every record of the batch; dead-letter those that cannot be delivered, and
        record every outcome on the deliveries topic.

        Returns once each record is delivered or dead-lettered and Kafka acknowledged the
        batch's dead letters and delivery records. Raises SinkUnavailableError when those
        cannot be stored, or when the sink is stopping mid-batch: then the batch is not
        committed and comes back after restart.
        """
        if not batch.records:
            return
        outcomes = list(self._pool.map(self._deliver_safely, batch.records))
        done = [o for o in outcomes if o is not None]
        if len(done) < len(outcomes):
            raise SinkUnavailableError("webhook sink stopping: batch left uncommitted for re-delivery")
        self._persist_outcomes(done)

    def _deliver_safely(self, record: SinkRecord) -> DeliveryOutcome | None:
        try:
            return self.deliver(record)
        except _Stopping:
            return None

    def _persist_outcomes(self, outcomes: list[DeliveryOutcome]) -> None:
        """Produce the dead letters and delivery records of one batch, in offset order (a
        dead-lettered record's delivery record right after its dead letter), and wait once for
        Kafka to acknowledge all of them."""
        failed = recorded = 0
        for outcome in outcomes:
            rec = outcome.record
            if not outcome.delivered:
                reason = outcome.reason()
                log.error("%s: dead letter %s[%d]@%d: %s", self.name, rec.topic, rec.partition,
                          rec.offset, reason)
                self._dlq_producer.produce(
                    self.dlq_topic,
                    encode_dead_letter(
                        topic=rec.topic,
                        partition=rec.partition,
                        offset=rec.offset,
                        stage=self.name,
                        reason=reason,
                        key=rec.key,
                        payload=self.codecs[rec.topic].encode(rec.value),
                    ),
                    key=rec.key,
                )
                failed += 1
            if self.deliveries_topic is not None:
                record = self.delivery_record(outcome)
                self._dlq_producer.produce(
                    self.deliveries_topic,
                    webhook_delivery_codec().encode(record),
                    key=record["tenant_id"].encode(),
                )
                recorded += 1
        if not failed and not recorded:
            return
        if self._dlq_producer.flush(self.persist_timeout_seconds) > 0:
            raise SinkUnavailableError(
                f"dead-letter or delivery topic did not acknowledge in {self.persist_timeout_seconds:g} s: "
                "batch left uncommitted")
        with self._counter_lock:
            self.dead_lettered += failed
            self.delivery_records += recorded
        self.stats.dead_letters += failed

    def delivery_record(self, outcome: DeliveryOutcome) -> dict[str, Any]:
        """The ``metering.v1.WebhookDelivery`` of one outcome: a delivered (or duplicate)
        window or alert, or a dead-lettered one with its dead letter's reason and last error."""
        rec = outcome.record
        is_alert = rec.topic == self.alerts_topic
        if not outcome.delivered:
            status, reason, last_error = "dead_lettered", outcome.reason(), outcome.error
        else:
            status = "duplicate" if outcome.duplicate else "delivered"
            reason = last_error = ""
        return {
            "webhook_id": outcome.webhook_id,
            "window_id": "" if is_alert else str(rec.value["window_id"]),
            "alert_id": str(rec.value["alert_id"]) if is_alert else "",
            "tenant_id": str(rec.value["tenant_id"]),
            "status": status,
            "attempts": outcome.attempts,
            "last_status": outcome.status or 0,
            "delivered_at_ms": outcome.finished_ms,
            "source_topic": rec.topic,
            "source_partition": rec.partition,
            "source_offset": rec.offset,
            "payload_format": ALERT_FORMAT if is_alert else self.payload_format,
            "last_error": last_error,
            "reason": reason,
        }

    def window_webhook_id(self, window: Mapping[str, Any]) -> str:
        """The ``webhook-id`` of one window in the configured format (scoped by report name
        in the report format). Needs only the window's id, so a window whose payload cannot
        be built still has one."""
        if self.payload_format == "report":
            return webhook_id(window["window_id"], f"report:{self.report_name}")
        return webhook_id(window["window_id"])

    def message(self, window: Mapping[str, Any]) -> tuple[str, bytes]:
        """The ``webhook-id`` and JSON body of one window, in the configured format."""
        if self.payload_format == "report":
            body = report_payload(window, self.report_name, self.report_metric)
        else:
            body = window_payload(window)
        return self.window_webhook_id(window), orjson.dumps(body)

    @staticmethod
    def alert_webhook_id(alert: Mapping[str, Any]) -> str:
        """The ``webhook-id`` of one quota alert (scoped apart from windows' ids)."""
        return webhook_id(alert["alert_id"], ALERT_SCOPE)

    def alert_message(self, alert: Mapping[str, Any]) -> tuple[str, bytes]:
        """The ``webhook-id`` and JSON body of one quota alert."""
        return self.alert_webhook_id(alert), orjson.dumps(alert_payload(alert))

    def deliver(self, record: SinkRecord) -> DeliveryOutcome:
        """POST one window or alert until it is delivered, refused for good, or the attempts
        run out. A window that cannot be expressed in the payload format is refused without an
        attempt.
        """
        try:
            if record.topic == self.alerts_topic:
                msg_id, body = self.alert_message(record.value)
            else:
                msg_id, body = self.message(record.value)
        except (ValueError, TypeError) as exc:
            error = f"cannot build the {self.payload_format} payload: {exc}"
            return DeliveryOutcome(record, False, 0, None, error,
                                   webhook_id=self._intended_id(record), finished_ms=_now_ms())
        status: int | None = None
        error = ""
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            headers = {"content-type": "application/json", "user-agent": _USER_AGENT, **self.extra_headers}
            headers.update(signature_headers(self.secret, msg_id, body))
            with self._counter_lock:
                self.attempts += 1
            try:
                response = self._client.post(self.url, content=body, headers=headers)
            except httpx.RequestError as exc:  # timeouts, refused or reset connections, bad bodies
                status, error = None, f"{type(exc).__name__}: {exc}".rstrip(": ")
                retryable = True
            else:
                status, error = response.status_code, ""
                if 200 <= status < 300 or status == _DUPLICATE_STATUS:
                    duplicate = status == _DUPLICATE_STATUS
                    with self._counter_lock:
                        self.delivered += 1
                        self.duplicates += int(duplicate)
                    return DeliveryOutcome(record, True, attempt, status, "", duplicate,
                                           webhook_id=msg_id, finished_ms=_now_ms())
                retryable = status >= 500 or status in _RETRY_STATUSES
                if retryable:
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                else:
                    error = "not retried: " + response.text[:200].strip()
            if not retryable or attempt >= self.max_attempts:
                return DeliveryOutcome(record, False, attempt, status, error, webhook_id=msg_id,
                                       finished_ms=_now_ms())
            delay = self._backoff(attempt, retry_after)
            log.info("%s: %s attempt %d failed (%s), retrying in %.2fs", self.name, msg_id, attempt,
                     status if status is not None else error, delay)
            if self.stopping.wait(delay):
                raise _Stopping()

    def _intended_id(self, record: SinkRecord) -> str:
        """The ``webhook-id`` a record whose payload could not be built would have carried;
        "" when even that cannot be derived."""
        try:
            if record.topic == self.alerts_topic:
                return self.alert_webhook_id(record.value)
            return self.window_webhook_id(record.value)
        except (KeyError, TypeError, AttributeError):
            return ""

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        delay = ceiling / 2 + self._random.uniform(0, ceiling / 2)
        if retry_after is not None:  # never sooner than the receiver asked
            delay = max(delay, min(retry_after, self.retry_after_max_seconds))
        return delay

    def close(self) -> None:
        """Close the HTTP client and the delivery threads."""
        self._pool.shutdown(wait=True)
        self._client.close()
