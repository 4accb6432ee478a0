"""Build and run the stream worker: app, topics, agents."""

from __future__ import annotations

import atexit
import gc
import sys

import faust

from metering.config import Settings
from streams.agents import WindowState, install_agents
from streams.app import create_app
from streams.quota_agent import install_quota_agent
from streams.stacks import render_stacks
from streams.tables import declare_tables
from streams.topics import declare_topics
from streams.views import install_views

__all__ = ["build_worker", "run_worker", "tune_gc"]

#: allocations between young-generation collections (CPython's default is 700)
GC_YOUNG_THRESHOLD = 100_000


class _Worker(faust.Worker):
    """Faust's worker, with a SIGUSR1 dump that says what each task waits on."""

    def _on_sigusr1(self) -> None:
        # Faust's own prints each task's outermost frame and every frame's locals: too little
        # to tell an agent waiting for input from one waiting for acknowledgements, and too
        # much to read. Runs on the event loop (mode installs it with add_signal_handler).
        sys.stderr.write(render_stacks(self.loop))
        sys.stderr.flush()


def build_worker(settings: Settings, bootstrap_servers: str) -> tuple[faust.App, WindowState]:
    """The configured Faust app with every agent installed."""
    app = create_app(settings, bootstrap_servers)
    topics = declare_topics(app, settings)
    tables = declare_tables(app, settings)
    state = install_agents(app, topics, tables, settings, bootstrap_servers)
    quota = install_quota_agent(app, topics, settings)
    install_views(app, topics, settings, state, quota)
    return app, state


def run_worker(settings: Settings, bootstrap_servers: str, loglevel: str = "info") -> None:
    """Run the stream worker in the foreground until it is stopped (SIGTERM/SIGINT)."""
    app, _ = build_worker(settings, bootstrap_servers)
    tune_gc()
    worker = _Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


def tune_gc() -> None:
    """Collect the young generation less often, and never scan start-up objects again.

    The worker decodes hundreds of records per message into dicts that live for a while (the
    cache of what the normalizer just published); with CPython's default threshold the
    collector scans them again and again (``python -m bench gc_decode``: decoding x1.27
    faster tuned). Reference counting frees almost everything here: cycles are rare, so
    fewer collections do not grow memory.
    """
    gc.collect()
    gc.freeze()  # the modules, app and tables built so far are permanent
    # ... until exit: frozen objects are never collected at shutdown, and extension objects
    # destroyed that late can crash (see sinks/clickhouse/sink.py, _GcPause)
    atexit.register(gc.unfreeze)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
