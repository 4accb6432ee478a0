"""The stream worker's Kafka transport: Faust's aiokafka transport with a short fetch wait.

Faust builds its consumer with ``fetch_max_wait_ms=1500`` and offers no setting for it. A
broker that answers a fetch only once that wait is half over (Tansu, the embedded broker,
does: measured 0.75 s from a message's arrival to the fetch answering, with the wait at
1500 ms) then stalls the window stage between the normalizer producing ``usage.records`` and
the window stage seeing it: the worker sat idle a third of the time (``python -m bench
stream_throughput``: worker CPU 0.71 of a core; 0.98 with 100 ms, and 1.3 times the
samples/s). Apache Kafka answers as soon as data arrives, so there the shorter wait only
bounds how often an idle consumer asks again (ten fetches a second).

The app selects this transport through its broker URL's scheme (:data:`SCHEME`), which this
module registers with Faust's transport registry when imported.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["FETCH_MAX_WAIT_MS", "SCHEME", "Transport"]

#: how long a fetch may wait at the broker for data (Faust's own is 1500)
FETCH_MAX_WAIT_MS = 100
#: the broker URL scheme of this transport (``metering-kafka://host:port``)
SCHEME = "metering-kafka"


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it builds its fetcher, which comes later
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport whose worker consumer waits at most
    :data:`FETCH_MAX_WAIT_MS` for a fetch."""

    Consumer = _Consumer


TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
