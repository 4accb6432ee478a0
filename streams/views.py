"""Live views of the stream worker (Faust web, on when ``WORKER_WEB_PORT`` is not 0).

``GET /tenants/{tenant}/usage``
    The tenant's open (not yet closed) windows: per window size and start, each metric's
    current aggregate and the provisional billing score. Served by the owner of the tenant's
    ``usage.records`` partition (the windows agent's state lives there).
``GET /tenants/{tenant}/quota``
    Per metric and period: the limit in force, the usage of the current period (up to the
    last closed window counted), the percentage and the thresholds fired. Served by the
    owner of the tenant's ``quota-state`` table partition.

A request that reaches another worker is forwarded once to the owner (Faust's
``table_route``/``topic_route`` do the same, but need producer metadata of the topic, which a
worker that has not produced to it yet lacks; the partition is computed here instead, with
the murmur2 partitioner every client of the pipeline uses). Decimals are JSON strings. Each
answer names the worker that computed it (``served_by``, its canonical URL): peers reach each
other there, so ``WORKER_WEB_BIND``/``WORKER_WEB_HOST`` must make it reachable.
"""

from __future__ import annotations

import decimal
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import faust
from aiokafka.partitioner import murmur2
from faust.web import Request, Response, View

from metering.config import Settings
from schemas import DECIMAL_QUANTUM
from streams.quota_agent import QuotaRuntime
from streams.quotas import PERIODS, LimitBook, TenantQuota, period_end
from streams.scoring import score
from streams.topics import StreamTopics

__all__ = ["install_views", "partition_of", "quota_payload", "usage_payload"]

log = logging.getLogger(__name__)

_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
_ROUTED = "X-Metering-Routed"


def _s(d: Decimal) -> str:
    return format(d.quantize(DECIMAL_QUANTUM, context=_CTX), "f")


def partition_of(key: str, partitions: int) -> int:
    """The partition of a string key (murmur2, as the Java client, aiokafka and our producers)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def usage_payload(window_state: Any, tenant: str, weights: Mapping[str, Decimal]) -> dict[str, Any]:
    """The open windows of ``tenant`` held by this worker (``window_state`` is the
    ``streams.agents.WindowState`` returned by ``install_agents``)."""
    windows = []
    watermark = None
    for pw in list(getattr(window_state, "partitions", {}).values()):
        for (size_ms, t, start), win in list(pw.open.items()):
            if t != tenant:
                continue
            watermark = pw.watermark_ms
            totals = {m: st.result(start + size_ms) for m, st in win.metrics.items()}
            windows.append({
                "window_size_seconds": size_ms // 1000,
                "window_start_ms": start,
                "window_end_ms": start + size_ms,
                "samples": win.samples,
                "late_samples": win.late,
                "metrics": _metrics(win, totals, start, start + size_ms),
                "score": _s(score(totals, weights)),
            })
    windows.sort(key=lambda w: (w["window_size_seconds"], w["window_start_ms"]))
    return {"tenant_id": tenant, "open_windows": windows, "watermark_ms": watermark}


def _metrics(win: Any, totals: Mapping[str, Decimal], start: int, end: int) -> dict[str, Any]:
    out = {m: {"aggregation": win.metrics[m].kind, "value": _s(v), "samples": win.metrics[m].samples}
           for m, v in totals.items()}
    running = win.vm_running(start, end)  # as the window would close now (streams/lifecycle.py)
    if running is not None:
        out[running["metric"]] = {"aggregation": running["aggregation"],
                                  "value": _s(running["value"]), "samples": running["samples"]}
    return dict(sorted(out.items()))


def quota_payload(
    tenant: str,
    saved: Mapping[str, Any] | None,
    limits: LimitBook,
    default_thresholds: tuple[int, ...],
) -> dict[str, Any]:
    """Limits, usage and fired thresholds of ``tenant``, per metric and period.

    ``saved`` is the tenant's ``quota-state`` table value. Rows cover every metric with a
    limit or with usage in the current period.
    """
    tq = TenantQuota.from_json(tenant, saved)
    in_force = limits.for_tenant(tenant)
    rows = []
    for metric, period in sorted(set(in_force) | set(tq.usage)):
        lim = in_force.get((metric, period))
        u = tq.usage.get((metric, period))
        used = u.used if u is not None else Decimal(0)
        limit = lim.limit if lim is not None else None
        rows.append({
            "metric": metric,
            "period": period,
            "period_start_ms": u.start_ms if u is not None else None,
            "period_end_ms": period_end(period, u.start_ms) if u is not None else None,
            "limit": _s(limit) if limit is not None else None,
            "limit_source": f"{lim.source}{' (*)' if lim.tenant != tenant else ''}" if lim else None,
            "used": _s(used),
            "percent_used": (_s(_CTX.divide(_CTX.multiply(used, Decimal(100)), limit))
                             if limit else None),
            "thresholds_percent": list(lim.thresholds or default_thresholds) if lim else None,
            "fired_thresholds": tq.fired_in(metric, period),
            "quotable": metric not in tq.not_quotable,
        })
    return {
        "tenant_id": tenant,
        "periods": list(PERIODS),
        "last_window_end_ms": max(tq.high_water.values(), default=None),
        "quotas": rows,
        "not_quotable_metrics": dict(tq.not_quotable),
    }


def install_views(
    app: faust.App,
    topics: StreamTopics,
    settings: Settings,
    window_state: Any | None,
    quota: QuotaRuntime | None,
) -> None:
    """Register ``/tenants/{tenant}/usage`` and ``/tenants/{tenant}/quota`` on the app's web
    server (nothing when the web server is off)."""
    if not app.conf.web_enabled:
        return
    partitions = settings.topic_partitions
    records_name = topics.records.get_topic_name()

    def owner(distribution: Mapping[str, Mapping[str, Any]], topic: str, partition: int) -> str | None:
        for url, tps in distribution.items():
            if partition in tps.get(topic, ()):
                return url
        return None

    async def routed(view: View, request: Request, url: str | None) -> Response | None:
        """The owner's answer, or None when this worker is the owner (or the request was
        forwarded here already)."""
        if url is None:
            if request.headers.get(_ROUTED):
                return None
            return view.json({"error": "partition not assigned yet; retry"}, status=503)
        if url.rstrip("/") == str(app.conf.canonical_url).rstrip("/") or request.headers.get(_ROUTED):
            return None
        target = f"{url.rstrip('/')}{request.path_qs}"  # type: ignore[attr-defined]
        try:
            async with app.http_client.get(target, headers={_ROUTED: "1"}) as resp:
                return view.text(await resp.text(), content_type=resp.content_type, status=resp.status)
        except Exception as exc:
            log.warning("views: forwarding to %s failed: %s", target, exc)
            return view.json({"error": f"owner {url} unreachable: {exc}"}, status=502)

    @app.page("/tenants/{tenant}/usage")
    async def tenant_usage(view: View, request: Request, tenant: str) -> Response:
        dist = app.router.external_topics_metadata()
        answer = await routed(view, request, owner(dist, records_name, partition_of(tenant, partitions)))
        if answer is not None:
            return answer
        payload = usage_payload(window_state, tenant, settings.score_weights)
        payload["served_by"] = str(app.conf.canonical_url)
        return view.json(payload)

    @app.page("/tenants/{tenant}/quota")
    async def tenant_quota(view: View, request: Request, tenant: str) -> Response:
        if quota is None:
            return view.json({"error": "quotas are not enabled in this worker"}, status=404)
        table = quota.table
        dist = app.router.table_metadata(table.name)
        changelog = table.changelog_topic.get_topic_name()
        answer = await routed(view, request, owner(dist, changelog, partition_of(tenant, partitions)))
        if answer is not None:
            return answer
        payload = quota_payload(tenant, table.data.get(tenant.encode()), quota.limits, quota.thresholds)
        payload["limits_loaded"] = quota.limits_ready.is_set()
        payload["served_by"] = str(app.conf.canonical_url)
        return view.json(payload)

    del tenant_usage, tenant_quota  # registered on the app
