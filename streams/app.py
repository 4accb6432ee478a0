"""Creates the Faust App; nothing else lives here."""

from __future__ import annotations

import socket

import faust

from metering.config import Settings
from streams.transport import SCHEME

__all__ = ["create_app"]


def create_app(settings: Settings, bootstrap_servers: str) -> faust.App:
    """A Faust app for the stream stage, configured from the validated settings."""
    return faust.App(
        f"{settings.consumer_group_prefix}.{settings.topic_prefix}streams",
        broker=f"{SCHEME}://{bootstrap_servers}",  # Faust's Kafka transport, see streams/transport.py
        store="memory://",
        datadir=settings.worker_datadir,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=max(settings.topic_replication_factor, 1),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Faust's producer writes the tables' changelogs (the agents' outputs go through
        # streams/output.py). Snappy, not lz4: aiokafka compresses lz4 at level 9 (LZ4HC,
        # 110 MB/s on our envelopes); snappy runs at 1.1 GB/s
        producer_compression_type="snappy",
        # Tansu completes a group join after about half the session timeout
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        # the windows agent holds acks on purpose; rebalances must not wait for them
        stream_wait_empty=False,
        web_enabled=settings.worker_web_port != 0,
        web_port=settings.worker_web_port or 6066,
        web_bind=settings.worker_web_bind,
        # the URL peers forward live-view requests to: it must reach the bound interface
        web_host=settings.worker_web_host or _default_web_host(settings.worker_web_bind),
    )


def _default_web_host(bind: str) -> str:
    # bound to loopback, only local peers can reach this worker, and Faust's default (the
    # host name) may resolve to another interface
    return bind if bind in ("127.0.0.1", "localhost") else socket.gethostname()
