"""A private ClickHouse server (Debian's ``clickhouse-server``) on free loopback ports.

Used by the tests and by anyone who wants the native-protocol backend without a cluster.
Its config lives in its own directory, so it never touches /etc/clickhouse-server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from metering.embedded.ports import free_port
from metering.embedded.process import ServerProcess
from metering.errors import EmbeddedServerError

__all__ = ["ClickHouseServer", "clickhouse_server_binary"]

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{root}/server.log</log>
    <errorlog>{root}/server.err.log</errorlog><size>100M</size><count>1</count></logger>
  <tcp_port>{tcp_port}</tcp_port>
  <http_port>{http_port}</http_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></default>
  </users>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <quotas><default></default></quotas>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>0</uncompressed_cache_size>
  <timezone>UTC</timezone>
</yandex>
"""


def clickhouse_server_binary() -> str:
    """Path of ``clickhouse-server``; raise with the install command when it is missing."""
    found = shutil.which("clickhouse-server") or (
        "/usr/sbin/clickhouse-server" if os.access("/usr/sbin/clickhouse-server", os.X_OK) else None
    )
    if not found:
        raise EmbeddedServerError(
            "clickhouse-server is not installed: sudo apt-get install clickhouse-server"
        )
    return found


class ClickHouseServer(ServerProcess):
    """A ClickHouse server process with a private config and data directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="metering-ch-"))
        self.tcp_port = free_port()
        self.http_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``CLICKHOUSE_URL`` of this server (native protocol)."""
        return f"clickhouse://default:@127.0.0.1:{self.tcp_port}/default"

    def start(self, timeout: float = 60.0) -> ClickHouseServer:
        """Start (or restart, keeping data) the server and wait until it answers a query."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.xml"
        config.write_text(
            _CONFIG.format(root=self.root, tcp_port=self.tcp_port, http_port=self.http_port)
        )
        self._proc = subprocess.Popen(
            [clickhouse_server_binary(), f"--config-file={config}"],
            cwd=self.root,
            stdout=open(self.root / "stdout.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``SELECT 1`` succeeds over the native protocol."""
        from clickhouse_driver import Client

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = (self.root / "server.err.log")
                tail = err.read_text()[-2000:] if err.exists() else ""
                raise EmbeddedServerError(f"clickhouse-server exited ({self._proc.returncode}): {tail}")
            try:
                Client("127.0.0.1", port=self.tcp_port, connect_timeout=1).execute("SELECT 1")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise EmbeddedServerError(f"clickhouse-server on port {self.tcp_port} not ready: {last}")
