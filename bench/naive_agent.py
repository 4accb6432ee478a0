"""The baseline the stream stage is compared with: a naive per-event Faust agent.

One usage sample per Kafka message (an Avro ``UsageRecord``), an agent iterating
``async for value in stream`` and updating a Faust windowed table (tumbling 60 s, event time
taken from the message timestamp) once per event: the textbook Faust program, and what
DESIGN rule 1 measured at about 2.6k messages/s.

Run by ``bench/stream_throughput.py`` as a subprocess (a Faust worker owns its process)::

    python -m bench.naive_agent --bootstrap HOST:PORT --topic T --partitions 4 \\
        --events 20000 --out result.json --datadir DIR --app-id bench-naive-x

When the agent has seen ``--events`` events it writes ``--out`` (JSON: wall-clock times of
the first and the last event, as seen inside the agent) and keeps running until stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import faust

from schemas import record_codec
from streams.transport import SCHEME

__all__ = ["build_app", "main"]


def build_app(args: argparse.Namespace) -> faust.App:
    """The naive app: one agent, one windowed table, a per-event update."""
    app = faust.App(
        args.app_id,
        broker=f"{SCHEME}://{args.bootstrap}",  # the worker's transport (streams/transport.py)
        store="memory://",
        datadir=args.datadir,
        topic_partitions=args.partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # the same broker settings as the stream stage (streams/app.py), so group joins
        # on Tansu take the same time
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        web_enabled=False,
    )
    topic = app.topic(args.topic, key_serializer="raw", value_serializer="raw",
                      partitions=args.partitions)
    totals = app.Table(
        "naive-totals", default=int, partitions=args.partitions,
    ).tumbling(60.0, expires=timedelta(hours=2)).relative_to_stream()
    codec = record_codec()
    seen = {"n": 0, "first": 0.0}

    @app.agent(topic, name="naive")
    async def naive(stream: Any) -> None:
        async for value in stream:
            rec = codec.decode(value)
            key = f"{rec['tenant_id']}|{rec['metric']}"
            totals[key] += int(rec["value"])  # one windowed-table write (and changelog) per event
            n = seen["n"] = seen["n"] + 1
            if n == 1:
                seen["first"] = time.time()
            if n == args.events:
                last = time.time()
                tmp = f"{args.out}.tmp"
                with open(tmp, "w") as f:
                    json.dump({"events": n, "first_event_wall": seen["first"],
                               "last_event_wall": last}, f)
                os.replace(tmp, args.out)

    del naive
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Run the naive worker in the foreground until SIGTERM."""
    p = argparse.ArgumentParser(prog="naive_agent")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--datadir", required=True)
    p.add_argument("--app-id", required=True)
    p.add_argument("--loglevel", default="warning")
    args = p.parse_args(argv)
    app = build_app(args)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
