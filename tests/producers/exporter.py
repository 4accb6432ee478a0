"""A Prometheus exporter for tests: an HTTP server in a thread whose series the test controls.

Values are kept as the exact text the test gives (``"100.125"``), so the test knows the
decimal Prometheus parsed. The exporter counts what it served, and can fail (HTTP 500)
to make Prometheus miss scrapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from metering.embedded.ports import free_port

__all__ = ["Exporter", "SeriesKey"]

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]

_TYPES = {
    "container_cpu_usage_seconds_total": "counter",
    "container_network_receive_bytes_total": "counter",
    "container_network_transmit_bytes_total": "counter",
    "container_fs_reads_bytes_total": "counter",
    "container_fs_writes_bytes_total": "counter",
}


def key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    """The exporter's key of one series."""
    return name, tuple(sorted(labels.items()))


class Exporter:
    """Serves ``/metrics`` in the Prometheus text format from a dict the test updates."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.target = f"127.0.0.1:{self.port}"
        self._lock = threading.Condition()
        self._series: dict[SeriesKey, str] = {}
        self.status = 200
        self.timestamp_ms: int | None = None  # when set, every sample carries it (like cAdvisor)
        self.served_ok = 0
        self.served_failed = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with exporter._lock:
                    status = exporter.status
                    body = exporter.render().encode() if status == 200 else b"exporter failing\n"
                    if status == 200:
                        exporter.served_ok += 1
                    else:
                        exporter.served_failed += 1
                    exporter._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Exporter:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def render(self) -> str:
        """The current exposition text (call with the lock held or accept a racy read)."""
        by_name: dict[str, list[str]] = {}
        suffix = f" {self.timestamp_ms}" if self.timestamp_ms is not None else ""
        for (name, labels), value in sorted(self._series.items()):
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            by_name.setdefault(name, []).append(f"{name}{{{text}}} {value}{suffix}")
        lines: list[str] = []
        for name, samples in by_name.items():
            lines.append(f"# TYPE {name} {_TYPES.get(name, 'gauge')}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"

    def update(self, values: Mapping[SeriesKey, str | None]) -> None:
        """Set (or, with None, remove) several series at once: one scrape sees all or none."""
        with self._lock:
            for k, v in values.items():
                if v is None:
                    self._series.pop(k, None)
                else:
                    self._series[k] = v

    def set_status(self, status: int) -> None:
        """Answer every scrape with ``status`` from now on (500 makes Prometheus miss scrapes)."""
        with self._lock:
            self.status = status

    def wait_failed(self, count: int, timeout: float = 20.0) -> None:
        """Block until ``count`` more scrapes were answered with an error."""
        with self._lock:
            target = self.served_failed + count
            deadline = time.monotonic() + timeout
            while self.served_failed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {self.served_failed} failed scrapes, wanted {target}")
                self._lock.wait(left)
