"""A private Prometheus server (Debian's ``prometheus``) on a free loopback port.

Used by the container producer's tests and by anyone who wants a real Prometheus scraping
a few local targets without touching /etc/prometheus. Config and TSDB live in ``root``.

Prometheus' discovery manager hands new targets to the scrape manager only every 5 s, so
the first scrape of a freshly started server happens about 5 s after it is ready;
:meth:`PrometheusServer.wait_scraped` waits for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metering.embedded.ports import free_port
from metering.embedded.process import ServerProcess
from metering.errors import EmbeddedServerError

__all__ = ["PrometheusServer", "prometheus_binary"]

INSTALL_HINT = "sudo apt-get install prometheus"


def prometheus_binary() -> str:
    """Path of ``prometheus``; raise with the install command when it is missing."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if not found:
        raise EmbeddedServerError(f"prometheus is not installed: {INSTALL_HINT}")
    return found


def _duration(seconds: float) -> str:
    """A Prometheus duration string (milliseconds precision)."""
    return f"{max(1, round(seconds * 1000))}ms"


class PrometheusServer(ServerProcess):
    """A Prometheus process scraping ``targets`` (``host:port``) with a private config."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        root: str | os.PathLike[str] | None = None,
        scrape_interval: float = 1.0,
        scrape_timeout: float | None = None,
        metrics_path: str = "/metrics",
        job: str = "cadvisor",
        port: int | None = None,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="metering-prom-"))
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.scrape_timeout = scrape_timeout if scrape_timeout is not None else scrape_interval * 0.8
        self.metrics_path = metrics_path
        self.job = job
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (``/api/v1/...``)."""
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        """The prometheus.yml this server runs with (JSON is valid YAML)."""
        config = {
            "global": {
                "scrape_interval": _duration(self.scrape_interval),
                "scrape_timeout": _duration(self.scrape_timeout),
                "evaluation_interval": "1m",
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        return json.dumps(config, indent=2)

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        """Start the server and wait until ``/-/ready`` answers 200."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(self.config_text())
        self._proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=self.root,
            stdout=open(self.root / "prometheus.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def _log_tail(self) -> str:
        log = self.root / "prometheus.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/-/ready`` answers 200."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"prometheus exited ({self._proc.returncode}): {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.1)
        raise EmbeddedServerError(f"prometheus on port {self.port} not ready: {last}")

    def query(self, promql: str, at: float | None = None) -> dict[str, Any]:
        """Run an instant query; the ``data`` member of the answer."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise EmbeddedServerError(f"prometheus query {promql!r} failed: {body}")
        data: dict[str, Any] = body["data"]
        return data

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Block until every target was scraped successfully at least once (``up == 1``)."""
        deadline = time.monotonic() + timeout
        up: list[Any] = []
        while time.monotonic() < deadline:
            up = self.query(f'up{{job="{self.job}"}} == 1')["result"]
            if len(up) >= len(self.targets):
                return
            time.sleep(0.2)
        raise EmbeddedServerError(
            f"prometheus did not scrape {self.targets} within {timeout}s (up: {up}); "
            f"log: {self._log_tail()}"
        )
