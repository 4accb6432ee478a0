"""The ``metering`` command: a thin layer that wires settings to each part."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from metering.config import Settings, load_settings
from metering.errors import ConfigError, MeteringError

__all__ = ["main"]


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise ConfigError(
            "KAFKA_BOOTSTRAP_SERVERS is not set: point it at Kafka, or start the embedded "
            "broker with `metering broker` (or run everything with `metering demo`)"
        )
    return settings.kafka_bootstrap_servers


def _cmd_broker(settings: Settings, args: argparse.Namespace) -> None:
    from metering.embedded import TansuBroker
    from metering.topics import ensure_topics

    broker = TansuBroker(port=args.port).start()
    ensure_topics(settings, broker.bootstrap_servers)
    print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


def _cmd_topics(settings: Settings, args: argparse.Namespace) -> None:
    from metering.topics import ensure_topics

    ensure_topics(settings, _bootstrap(settings))
    print("topics ready")


def _cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    from streams import run_worker

    run_worker(settings, _bootstrap(settings), loglevel=args.loglevel)


def _run_sink(sink: object) -> None:
    from sinks.base import BatchingSink

    assert isinstance(sink, BatchingSink)
    signal.signal(signal.SIGTERM, lambda *_: sink.stop())
    try:
        sink.run()
    except KeyboardInterrupt:
        sink.stop()


def _cmd_sink(settings: Settings, args: argparse.Namespace) -> None:
    bootstrap = _bootstrap(settings)
    if args.kind == "clickhouse":
        from sinks.clickhouse import ClickHouseSink

        _run_sink(ClickHouseSink.from_settings(settings, bootstrap))
    else:
        from sinks.webhook import WebhookSink

        if not settings.webhook_url:
            raise ConfigError("WEBHOOK_URL is not set: the webhook sink needs a destination")
        _run_sink(WebhookSink.from_settings(settings, bootstrap))


def _cmd_receiver(settings: Settings, args: argparse.Namespace) -> None:
    from sinks.receiver import serve

    serve(args.host, args.port, settings.webhook_secret, args.store)


def _cmd_simulate(settings: Settings, args: argparse.Namespace) -> None:
    from metering import topics
    from producers import EnvelopePublisher
    from producers.simulators import ContainerSimulator, RedisEnterpriseSimulator, VmSimulator

    batches: Iterable[list[dict[str, Any]]]
    if args.source == "vm":
        vm = VmSimulator(tenants=args.tenants, vms_per_tenant=args.vms, seed=args.seed)
        start = _aligned_start(args.ticks, vm.interval_ms)
        batches, source = vm.run(start, args.ticks, disorder=args.disorder), "vm"
    elif args.source == "redis-enterprise":
        re_ = RedisEnterpriseSimulator(clusters=args.tenants, seed=args.seed)
        batches = re_.run(_aligned_start(args.ticks, re_.interval_ms), args.ticks)
        source = "redis-enterprise"
    else:
        ct = ContainerSimulator(tenants=args.tenants, containers_per_tenant=args.vms, seed=args.seed)
        batches = ct.run(_aligned_start(args.ticks, ct.interval_ms), args.ticks)
        source = "containers"
    pub = EnvelopePublisher(
        _bootstrap(settings), settings.topic(topics.SOURCE_TOPICS[source]), source=source,
        producer_name=f"{args.source}-simulator",
    )
    n = 0
    for batch in batches:
        if batch:
            pub.send(batch)
            n += len(batch)
    pub.flush()
    print(f"published {n} samples")


def _aligned_start(ticks: int, interval_ms: int) -> int:
    # the run ends now, so its windows close by wall clock in a live pipeline
    start = int(time.time() * 1000) - ticks * interval_ms
    return start - start % interval_ms


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from metering.demo import run_demo

    run_demo(settings, tenants=args.tenants, vms=args.vms, minutes=args.minutes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metering", description=__doc__)
    p.add_argument("--config", help="TOML settings file (also METERING_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Tansu Kafka broker in the foreground")
    b.add_argument("--port", type=int, default=None)
    b.set_defaults(fn=_cmd_broker)

    sub.add_parser("topics", help="create the pipeline's topics").set_defaults(fn=_cmd_topics)

    from metering.quota_cli import add_quota_parser

    add_quota_parser(sub)

    w = sub.add_parser("worker", help="run the Faust stream worker")
    w.add_argument("--loglevel", default="warning")
    w.set_defaults(fn=_cmd_worker)

    s = sub.add_parser("sink", help="run a sink worker")
    s.add_argument("kind", choices=["clickhouse", "webhook"])
    s.set_defaults(fn=_cmd_sink)

    srv = sub.add_parser("serve", help="run an HTTP service")
    services = srv.add_subparsers(dest="service", required=True)
    rcv = services.add_parser("receiver", help="webhook receiver (a billing endpoint for demos)")
    rcv.add_argument("--host", default="127.0.0.1")
    rcv.add_argument("--port", type=int, default=8088)
    rcv.add_argument("--store", default=None, help="append received reports to this JSONL file")
    rcv.set_defaults(fn=_cmd_receiver)
    from producers import track_server, vm_gateway

    vm = services.add_parser("vm-ingest", help="billaged-compatible VM usage ingest API")
    vm_gateway.build_parser_args(vm)
    vm.set_defaults(fn=vm_gateway.run_from_args)
    tr = services.add_parser("track", help="HTTP POST /track for the metering client")
    track_server.build_parser_args(tr)
    tr.set_defaults(fn=track_server.run_from_args)

    from producers import containers, redis_enterprise

    prod = sub.add_parser("produce", help="run a usage producer")
    producers_sub = prod.add_subparsers(dest="producer", required=True)
    re_ = producers_sub.add_parser(
        "redis-enterprise", help="poll a Redis Enterprise cluster's REST API")
    redis_enterprise.build_parser_args(re_)
    re_.set_defaults(fn=redis_enterprise.run_from_args)
    ct = producers_sub.add_parser(
        "containers", help="cAdvisor usage from Prometheus or a /metrics endpoint")
    containers.build_parser_args(ct)
    ct.set_defaults(fn=containers.run_from_args)

    sim = sub.add_parser("simulate", help="publish simulated usage")
    sim.add_argument("source", choices=["vm", "redis-enterprise", "containers"])
    sim.add_argument("--tenants", type=int, default=3, help="tenants (clusters for Redis)")
    sim.add_argument("--vms", type=int, default=2, help="VMs (containers) per tenant")
    sim.add_argument("--ticks", type=int, default=30)
    sim.add_argument("--disorder", type=float, default=0.1)
    sim.add_argument("--seed", type=int, default=42)
    sim.set_defaults(fn=_cmd_simulate)

    d = sub.add_parser("demo", help="run the whole pipeline on embedded parts and print results")
    d.add_argument("--tenants", type=int, default=4)
    d.add_argument("--vms", type=int, default=3)
    d.add_argument("--minutes", type=int, default=5, help="minutes of simulated event time")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metering`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings(args.config)
        args.fn(settings, args)
    except ConfigError as exc:
        print(f"metering: configuration error: {exc}", file=sys.stderr)
        return 2
    except MeteringError as exc:
        print(f"metering: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
