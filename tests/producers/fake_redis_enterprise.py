"""Local HTTP servers for the Redis Enterprise producer's tests.

:class:`FakeRedisEnterprise` emulates Redis Enterprise Software's cluster REST API
(``/v1/nodes``, ``/v1/bdbs``, ``/v1/shards``, ``/v1/license``) with HTTP basic auth, serving
the documented JSON shapes. A Redis Enterprise cluster cannot run on a build machine
(it is a licensed multi-process product shipped as OS packages / container images), so the
tests run the producer against this real aiohttp server instead. Each endpoint can be told
to stall, answer a raw body or a status code, to produce the failures a real cluster has.

:class:`ReportReceiver` is a billing endpoint that records the JSON reports POSTed to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
from typing import Any

from aiohttp import web

from metering.embedded.ports import free_port

__all__ = ["FakeRedisEnterprise", "ReportReceiver", "documented_cluster"]


def documented_cluster() -> dict[str, Any]:
    """A small cluster in the shapes of the REST API reference (2 nodes, 2 databases, 3 shards)."""
    return {
        "/v1/nodes": [
            {"uid": 1, "status": "active", "uptime": 262735, "total_memory": 6260334592,
             "software_version": "7.4.6-22", "ephemeral_storage_size": 20639797248,
             "persistent_storage_path": "/var/opt/redislabs/persist", "os_version": "Ubuntu 22.04",
             "architecture": "x86_64", "shard_count": 2, "public_addr": "", "cores": 4,
             "rack_id": "", "shard_list": [1, 3], "addr": "10.0.3.61"},
            # numbers as strings and floats are tolerated
            {"uid": 2, "status": "active", "total_memory": 8589934592.0, "cores": "8",
             "shard_count": 1, "shard_list": [2], "addr": "10.0.3.62"},
        ],
        "/v1/bdbs": [
            {"uid": 1, "name": "sessions", "type": "redis", "memory_size": 1073741824,
             "shards_count": 1, "replication": True, "sharding": False, "status": "active",
             "port": 12000},
            {"uid": 2, "name": "cache", "type": "redis", "memory_size": 536870912,
             "shards_count": 1, "replication": False, "status": "active", "port": 12001},
        ],
        "/v1/shards": [
            {"uid": "1", "role": "master", "assigned_slots": "0-16383", "bdb_uid": 1,
             "detailed_status": "ok", "loading": {"status": "idle"}, "node_uid": "1",
             "report_timestamp": "2024-06-28T18:44:01Z", "status": "active"},
            {"uid": "2", "role": "slave", "assigned_slots": "0-16383", "bdb_uid": 1,
             "node_uid": "2", "status": "active"},
            {"uid": "3", "role": "master", "assigned_slots": "0-16383", "bdb_uid": 2,
             "node_uid": "1", "status": "active"},
        ],
        "/v1/license": {
            "license": "----- LICENSE START -----\\ndi+iK...KniI9\\n----- LICENSE END -----\\n",
            "expired": False, "activation_date": "2024-01-01T00:00:00Z",
            "expiration_date": "2030-01-01T00:00:00Z", "key": "...", "features": ["bigstore"],
            "owner": "Example Ltd.", "cluster_name": "cluster.example.com",
            "shards_limit": 12, "ram_shards_limit": 10, "ram_shards_in_use": 3,
            "flash_shards_limit": 2, "flash_shards_in_use": 0,
        },
    }


class _ServerThread:
    """An aiohttp application served from its own event loop in a daemon thread."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        scheme = "https" if ssl_context else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        self._app = app
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self._app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class FakeRedisEnterprise:
    """Redis Enterprise's REST API (read endpoints) with basic auth, on a free loopback port."""

    def __init__(
        self,
        username: str = "admin@example.com",
        password: str = "s3cret",
        documents: dict[str, Any] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.documents = documents if documents is not None else documented_cluster()
        self.stall: dict[str, float] = {}  # path -> seconds to wait before answering
        self.raw_body: dict[str, bytes] = {}  # path -> a body to send instead of the JSON
        self.status: dict[str, int] = {}  # path -> a status to answer instead of 200
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        app = web.Application()
        for path in ("/v1/nodes", "/v1/bdbs", "/v1/shards", "/v1/license"):
            app.router.add_get(path, self._handle)
        self._server = _ServerThread(app, ssl_context)
        self.url = self._server.base_url

    def start(self) -> FakeRedisEnterprise:
        """Start serving."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.username and pw == self.password

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        auth = request.headers.get("Authorization")
        self.requests.append((path, auth))
        if not self._authorized(auth):
            # the cluster answers 401 with a JSON error and a basic-auth challenge
            return web.json_response({"error_code": "unauthorized", "description": "Unauthorized"},
                                     status=401, headers={"WWW-Authenticate": 'Basic realm="rlec"'})
        if path in self.stall:
            await asyncio.sleep(self.stall[path])
        if path in self.status:
            return web.json_response({"error_code": "internal", "description": "failure"},
                                     status=self.status[path])
        if path in self.raw_body:
            return web.Response(body=self.raw_body[path], content_type="application/json")
        return web.Response(text=json.dumps(self.documents[path]), content_type="application/json")


class ReportReceiver:
    """A billing endpoint: records every JSON body POSTed to ``/report``."""

    def __init__(self) -> None:
        self.reports: list[Any] = []
        self.status = 200
        app = web.Application()
        app.router.add_post("/report", self._handle)
        self._server = _ServerThread(app)
        self.url = self._server.base_url + "/report"

    def start(self) -> ReportReceiver:
        """Start serving."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.status != 200:
            return web.json_response({"error": "unavailable"}, status=self.status)
        self.reports.append(body)
        return web.json_response({"ok": True})
