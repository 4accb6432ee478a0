"""Starting the real stream worker (``python -m metering worker``) as a subprocess in tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from metering.config import Settings
from metering.embedded import free_port


def worker_env(s: Settings, **extra: str) -> dict[str, str]:
    """Environment that configures a worker like ``s``."""
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=str(s.kafka_bootstrap_servers),
        TOPIC_PREFIX=s.topic_prefix,
        TOPIC_PARTITIONS=str(s.topic_partitions),
        WINDOW_SIZES_SECONDS=json.dumps(s.window_sizes_seconds),
        ALLOWED_LATENESS_SECONDS=str(s.allowed_lateness_seconds),
        IDLE_CLOSE_SECONDS=str(s.idle_close_seconds),
        WORKER_WEB_PORT=str(free_port()),
    )
    env.update(extra)
    return env


class WorkerProcess:
    """One stream worker process with its own data directory and log file."""

    def __init__(self, settings: Settings, workdir: Path, name: str = "worker", **extra: str) -> None:
        self.settings = settings
        self.log_path = workdir / f"{name}.log"
        self.datadir = workdir / f"{name}-data"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker (again, after a kill: same data directory)."""
        env = worker_env(self.settings, WORKER_DATADIR=str(self.datadir), **self.extra)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metering", "worker", "--loglevel", "info"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Graceful stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
