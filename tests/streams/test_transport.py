"""The worker's Faust app fetches with a short wait (streams/transport.py)."""

from __future__ import annotations

import asyncio

from metering.config import load_settings
from streams.app import create_app
from streams.transport import FETCH_MAX_WAIT_MS, Transport


def test_the_app_uses_the_transport_whose_consumer_fetches_with_the_short_wait() -> None:
    app = create_app(load_settings(kafka_bootstrap_servers="127.0.0.1:9"), "127.0.0.1:9")
    assert isinstance(app.transport, Transport)

    async def build() -> int:
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
        try:
            # the attribute aiokafka hands to its fetcher on start(): a rename upstream fails here
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()  # never started: releases the client it made

    assert FETCH_MAX_WAIT_MS < 1500  # Faust's own wait, which the broker may hold in full
    assert asyncio.run(build()) == FETCH_MAX_WAIT_MS
