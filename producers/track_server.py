"""``POST /track``: the metering client library over HTTP, for callers not written in Python.

::

    curl -X POST http://127.0.0.1:8090/track -H 'Content-Type: application/json' -d '{
      "unique_key": "order-123", "instance_id": "api-gateway-7",
      "timestamp": "2024-01-31T12:00:00Z",
      "amounts": {"api_calls": 1, "gpu_seconds": "0.25"},
      "metadata": {"tenant_id": "acme", "region": "eu-west-1"}}'

The body is one JSON object: ``unique_key`` and ``instance_id`` (strings), ``timestamp``
(RFC 3339 or milliseconds since the epoch), ``amounts`` (amount type -> an integer or a
decimal *string*: JSON fractions are refused, since many senders produce them from binary
floats), ``metadata`` (string -> string; ``tenant_id`` names the tenant, otherwise the
server's ``--tenant``). Other fields are ignored. Semantics are
:class:`producers.client.MeteringClient`'s: one record per amount type, ``event_id =
unique_key:amount_type``, so a retried request never double-bills.

Answers: ``202`` once the usage is in the client's buffer (``{"status": "buffered",
"records": n, "event_ids": [...]}``; Kafka acknowledges asynchronously, as for a library
caller), ``400`` naming every bad field (``{"error": "invalid_argument", "message",
"fields": [{"field", "description"}]}``), ``503`` with ``Retry-After`` when the buffer is
full (the request was not buffered: retry it, with the same ``unique_key``). The handler
never blocks the event loop: a full buffer is answered at once. ``GET /health``,
``GET /stats`` and ``GET /metrics`` (Prometheus text) show the client's state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from producers.client import BufferFullError, ClientClosedError, InvalidUsageError, MeteringClient

if TYPE_CHECKING:
    from metering.config import Settings

__all__ = ["TrackServer", "build_parser_args", "run_from_args"]

log = logging.getLogger(__name__)

def _bad_request(fields: list[tuple[str, str]]) -> web.Response:
    return web.json_response({
        "error": "invalid_argument",
        "message": "; ".join(f"{f}: {d}" for f, d in fields),
        "fields": [{"field": f, "description": d} for f, d in fields],
    }, status=400)


class TrackServer:
    """An aiohttp server that feeds ``POST /track`` bodies into a :class:`MeteringClient`."""

    def __init__(
        self,
        client: MeteringClient,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        retry_after_seconds: int = 1,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Serve ``client``; ``registry`` is what ``/metrics`` exposes (default: global)."""
        self.client = client
        self.host = host
        self.port = port
        self.retry_after_seconds = retry_after_seconds
        self.registry = registry or REGISTRY
        self.counts = {"requests": 0, "accepted": 0, "invalid": 0, "full": 0}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        """The ``POST`` endpoint, e.g. ``http://127.0.0.1:8090/track``."""
        return f"http://{self.host}:{self.port}/track"

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=1 * 2**20)
        app.router.add_post("/track", self._handle_track)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/metrics", self._handle_metrics)
        return app

    async def _handle_track(self, request: web.Request) -> web.Response:
        self.counts["requests"] += 1
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            self.counts["invalid"] += 1
            return _bad_request([("body", f"not valid JSON: {exc}")])
        if not isinstance(body, dict):
            self.counts["invalid"] += 1
            return _bad_request([("body", "must be a JSON object")])
        amounts: Any = body.get("amounts")
        key: Any = body.get("unique_key")
        instance: Any = body.get("instance_id")
        timestamp: Any = body.get("timestamp")
        try:
            # the client validates every field (and names each bad one); JSON fractions
            # arrive as floats, which it refuses as inexact
            n = self.client.try_add_amounts(key, instance, timestamp, amounts, body.get("metadata"))
        except InvalidUsageError as exc:
            self.counts["invalid"] += 1
            return _bad_request([(f.field, f.description) for f in exc.fields])
        except (BufferFullError, ClientClosedError) as exc:
            self.counts["full"] += 1
            return web.json_response(
                {"error": "unavailable", "message": f"{exc}; retry later with the same unique_key"},
                status=503, headers={"Retry-After": str(self.retry_after_seconds)})
        self.counts["accepted"] += 1
        return web.json_response(
            {"status": "buffered", "records": n, "event_ids": [f"{key}:{k}" for k in amounts]},
            status=202)

    async def _handle_health(self, request: web.Request) -> web.Response:
        closed = self.client.closed
        status = 503 if closed else 200
        return web.json_response({"status": "closed" if closed else "ok", "pending": self.client.pending,
                                  "max_buffer": self.client.max_buffer}, status=status)

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"server": dict(self.counts), "client": self.client.stats()})

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- running --------------------------------------------------------------------------

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for addr in self._runner.addresses:
            if isinstance(addr, tuple):
                self.port = int(addr[1])
                break

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or SIGINT/SIGTERM when it is None)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self._start_site()
        log.info("track server listening on %s", self.url)
        try:
            await stop.wait()
        finally:
            if self._runner is not None:
                await self._runner.cleanup()

    def _serve_in_thread(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._start_site())
        except BaseException as exc:  # surfaced by start()
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    def start(self) -> TrackServer:
        """Listen in a background thread; returns once ``port`` is known."""
        if self._thread is not None:
            raise RuntimeError("track server already started")
        self._thread = threading.Thread(target=self._serve_in_thread, name="track-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._start_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(
                f"track server cannot listen on {self.host}:{self.port}") from self._start_error
        return self

    def stop(self) -> None:
        """Stop listening (the client stays open: its owner closes it)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._thread = None
        self._loop = None

    def __enter__(self) -> TrackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- command line ---------------------------------------------------------------------------


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def build_parser_args(parser: argparse.ArgumentParser) -> None:
    """Add the track server's options to ``parser`` (``metering serve track``)."""
    _add(parser, "--host", default="127.0.0.1", help="address to listen on")
    _add(parser, "--port", type=int, default=8090, help="port")
    _add(parser, "--tenant", default=None, help="tenant of requests whose metadata names none")
    _add(parser, "--max-buffer", type=int, default=100_000, help="records held until Kafka acknowledges")


def run_from_args(settings: Settings, args: argparse.Namespace) -> None:
    """Run the track server in the foreground until SIGINT/SIGTERM, then flush the client."""
    from metering.errors import ConfigError

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: the track server publishes to Kafka")
    client = MeteringClient(settings=settings, tenant_id=getattr(args, "tenant", None),
                            max_buffer=int(getattr(args, "max_buffer", 100_000)), full_policy="raise")
    server = TrackServer(client, getattr(args, "host", "127.0.0.1"), int(getattr(args, "port", 8090)))
    print(f"track: POST http://{server.host}:{server.port}/track -> {client.topic}", flush=True)
    try:
        asyncio.run(server.serve())
    finally:
        client.close()
