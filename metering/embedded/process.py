"""What every server the project starts by itself shares: stop, clean up, context manager."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server subprocess with a data directory ``root`` (removed by :meth:`cleanup` when
    this object created it). Subclasses set ``root``, ``_own_root`` and ``_proc`` and
    implement :meth:`start`."""

    root: Path
    _own_root: bool
    _proc: subprocess.Popen[bytes] | None

    def start(self) -> Self:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 30 s); data stays in ``root`` so
        :meth:`start` can bring it back."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        """Stop and remove the data directory when this object created it."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
