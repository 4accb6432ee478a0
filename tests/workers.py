"""Processes tests start: the real stream worker (``python -m metering worker``) and a base for others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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


def get_json(port: int, path: str, timeout: float = 45) -> dict[str, Any]:
    """GET ``path`` from a worker's web port as JSON, retrying while the worker is not up yet
    or answers an error (503 until its partitions are assigned)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return dict(json.loads(r.read()))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class ChildProcess:
    """A process a test starts and ends: SIGKILL (no shutdown, no final commit) or SIGTERM."""

    stop_timeout = 30.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after ``stop_timeout``); the exit status, None if never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


class WorkerProcess(ChildProcess):
    """One stream worker process with its own data directory and log file."""

    stop_timeout = 20.0

    def __init__(self, settings: Settings, workdir: Path, name: str = "worker", **extra: str) -> None:
        super().__init__()
        self.settings = settings
        self.log_path = workdir / f"{name}.log"
        self.datadir = workdir / f"{name}-data"
        self.extra = extra
        self.web_port = 0

    def start(self) -> WorkerProcess:
        """Start the worker (again, after a kill: same data directory)."""
        env = worker_env(self.settings, WORKER_DATADIR=str(self.datadir), **self.extra)
        self.web_port = int(env["WORKER_WEB_PORT"])
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metering", "worker", "--loglevel", "info"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def dump_stacks(self, wait_s: float = 2.0, most: int = 600) -> str:
        """What the worker waits on: its threads' stacks and its tasks' await chains, which
        it prints to its log on SIGUSR1 (``streams/stacks.py``); for a test that finds the
        worker stuck, in the failure CI prints."""
        if self.proc is None or self.proc.poll() is not None:
            return "(the worker is not running)"
        start = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(wait_s)
        with self.log_path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        keep = [line for line in text.splitlines()
                if line.lstrip().startswith(("THREAD ", "TASK ", 'File "', "awaiting "))]
        return "\n".join(keep[:most]) or "(no stacks in the log)"
