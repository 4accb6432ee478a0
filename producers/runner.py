"""Running a polling producer in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["run_until_stopped"]


def run_until_stopped(run: Callable[[threading.Event], None]) -> None:
    """Call ``run(stop)``; SIGTERM sets ``stop`` (the current poll finishes), Ctrl-C returns."""
    stop = threading.Event()
    try:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    except ValueError:  # not the main thread: the caller stops it through other means
        pass
    try:
        run(stop)
    except KeyboardInterrupt:
        pass
