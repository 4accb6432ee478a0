"""A small webhook receiver standing in for a customer's billing endpoint (tests and the demo).

``POST /webhook`` verifies the Standard Webhooks signature when a secret is set (401 with the
reason otherwise), dedupes on ``webhook-id`` (a repeat answers 200 and is counted, never
stored twice) and stores the parsed JSON body with its id. ``GET /reports``, ``GET /stats``
and ``GET /health`` show what arrived.

With ``store_path`` every stored report is appended to a JSONL file, and the file is read back
on start, so deduplication survives a restart of the receiver.

``failure_plan(n)`` injects failures; ``n`` is the 1-based number of the POST /webhook
request. It returns ``None`` (normal), a status code as a string (``"500"``, ``"503"``,
``"400"`` ...; ``"429"`` and ``"503"`` carry ``Retry-After: 0``, ``"429:1"`` sets the header
to 1), or ``"timeout"``. A timeout is the nasty realistic case: the receiver DID act (it
verifies and stores the report) and then stalls for ``stall_seconds`` before answering, so
the client times out and retries; deduplication on ``webhook-id`` makes the retry harmless.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from sinks.signing import HEADER_ID, SignatureError, verify

__all__ = ["FailurePlan", "ReceiverServer", "serve"]

log = logging.getLogger(__name__)

#: request number (1-based) -> None, "timeout", "<status>" or "<status>:<retry-after>"
FailurePlan = Callable[[int], str | None]

_RETRY_AFTER_STATUSES = {429, 503}


class ReceiverServer:
    """An aiohttp webhook receiver running in a background thread with its own event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | None = None,
        tolerance_seconds: int = 300,
        store_path: str | None = None,
        failure_plan: FailurePlan | None = None,
        stall_seconds: float = 5.0,
    ) -> None:
        """Configure the receiver; nothing listens until :meth:`start`. Port 0 picks a free port."""
        self.host = host
        self.port = port
        self.secret = secret or None
        self.tolerance_seconds = tolerance_seconds
        self.store_path = Path(store_path) if store_path else None
        self.failure_plan = failure_plan
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._reports: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._counts = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0, "injected": 0}
        self._injected: dict[str, int] = {}
        self._posts_by_id: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        if self.store_path is not None and self.store_path.exists():
            self._load(self.store_path)

    # ---- what arrived ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The POST endpoint, e.g. ``http://127.0.0.1:8088/webhook``."""
        return f"http://{self.host}:{self.port}/webhook"

    @property
    def reports(self) -> list[dict[str, Any]]:
        """A snapshot of the stored reports: ``{"webhook_id", "received_at_ms", "payload"}``."""
        with self._lock:
            return list(self._reports)

    def stats(self) -> dict[str, Any]:
        """Counts: received, stored, duplicates, rejected, injected (and injected per kind)."""
        with self._lock:
            return {**self._counts, "injected_by_kind": dict(self._injected)}

    def posts_by_id(self) -> dict[str, int]:
        """How many POST /webhook requests arrived per ``webhook-id`` header, failures that
        were injected, rejected and duplicate requests included (a client's attempts)."""
        with self._lock:
            return dict(self._posts_by_id)

    def _load(self, path: Path) -> None:
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            entry = orjson.loads(line)
            if entry["webhook_id"] not in self._seen:
                self._seen.add(entry["webhook_id"])
                self._reports.append(entry)

    def _count(self, name: str) -> int:
        with self._lock:
            self._counts[name] += 1
            return self._counts[name]

    def _store(self, msg_id: str, payload: Any) -> bool:
        """Store a report unless its id was seen; False for a duplicate."""
        with self._lock:
            if msg_id in self._seen:
                self._counts["duplicates"] += 1
                return False
            entry = {"webhook_id": msg_id, "received_at_ms": int(time.time() * 1000), "payload": payload}
            if self.store_path is not None:
                with self.store_path.open("ab") as f:
                    f.write(orjson.dumps(entry) + b"\n")
            self._seen.add(msg_id)
            self._reports.append(entry)
            self._counts["stored"] += 1
            return True

    # ---- the app -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (routes bound to this receiver's state)."""
        app = web.Application()
        app.router.add_post("/webhook", self._handle_webhook)
        app.router.add_get("/reports", self._handle_reports)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        return app

    def _reject(self, status: int, reason: str) -> web.Response:
        self._count("rejected")
        log.warning("receiver: rejected (%d): %s", status, reason)
        return web.json_response({"error": reason}, status=status)

    async def _handle_webhook(self, request: web.Request) -> web.StreamResponse:
        n = self._count("received")
        header_id = request.headers.get(HEADER_ID, "").strip()
        with self._lock:
            self._posts_by_id[header_id] = self._posts_by_id.get(header_id, 0) + 1
        plan = self.failure_plan(n) if self.failure_plan is not None else None
        body = await request.read()
        if plan is not None and plan != "timeout":
            status_text, _, retry_after = plan.partition(":")
            status = int(status_text)
            with self._lock:
                self._counts["injected"] += 1
                self._injected[status_text] = self._injected.get(status_text, 0) + 1
            headers = {}
            if status in _RETRY_AFTER_STATUSES or retry_after:
                headers["Retry-After"] = retry_after or "0"
            return web.json_response({"error": f"injected {status}"}, status=status, headers=headers)
        if self.secret is not None:
            try:
                verify(self.secret, request.headers, body, self.tolerance_seconds)
            except SignatureError as exc:
                return self._reject(401, str(exc))
        msg_id = request.headers.get(HEADER_ID, "").strip()
        if not msg_id:
            return self._reject(400, "missing webhook-id header")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._reject(400, f"body is not JSON: {exc}")
        stored = self._store(msg_id, payload)
        if plan == "timeout":
            with self._lock:
                self._counts["injected"] += 1
                self._injected["timeout"] = self._injected.get("timeout", 0) + 1
            # acted on it, then too slow to say so: the client gives up and retries
            stopping = self._stopping
            if stopping is not None:
                try:
                    await asyncio.wait_for(stopping.wait(), self.stall_seconds)
                except TimeoutError:
                    pass
        return web.json_response({"status": "stored" if stored else "duplicate", "webhook_id": msg_id})

    async def _handle_reports(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.reports), content_type="application/json")

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # ---- lifecycle -----------------------------------------------------------------------------

    async def _start_site(self) -> None:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for addr in self._runner.addresses:
            if isinstance(addr, tuple):
                self.port = int(addr[1])
                break

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

    def start(self) -> ReceiverServer:
        """Start listening in a background thread; returns once ``port`` and ``url`` are set."""
        if self._thread is not None:
            raise RuntimeError("receiver already started")
        self._thread = threading.Thread(target=self._serve_in_thread, name="webhook-receiver", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._start_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"webhook receiver cannot listen on {self.host}:{self.port}") from (
                self._start_error
            )
        if not self._ready.is_set():
            raise RuntimeError("webhook receiver did not start in 30 s")
        return self

    def stop(self) -> None:
        """Stop listening (stalled requests are cut short) and wait for the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        stopping = self._stopping
        if stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._thread = None
        self._loop = None

    def __enter__(self) -> ReceiverServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    host: str = "127.0.0.1",
    port: int = 8088,
    secret: str | None = None,
    store_path: str | None = None,
    tolerance_seconds: int = 300,
) -> None:
    """Run the receiver in the foreground until interrupted (``metering serve receiver``)."""
    receiver = ReceiverServer(host, port, secret, tolerance_seconds, store_path)
    receiver.start()
    checked = "signatures checked" if secret else "signatures NOT checked (no WEBHOOK_SECRET)"
    print(f"webhook receiver on {receiver.url} ({checked}); reports at "
          f"http://{host}:{receiver.port}/reports", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
