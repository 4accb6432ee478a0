"""producer_config: the settings every producer shares, and a caller's own over them."""

from __future__ import annotations

from confluent_kafka import Producer

from metering.kafka import producer_config


def test_a_callers_settings_go_over_the_shared_ones_and_librdkafka_accepts_them() -> None:
    conf = producer_config("127.0.0.1:9", {"linger.ms": 0, "acks": "1"})
    assert conf["bootstrap.servers"] == "127.0.0.1:9"
    assert conf["acks"] == "1" and conf["linger.ms"] == 0
    # the shared ones the caller left alone stay: the key partitioner every client agrees on
    assert conf["partitioner"] == "murmur2_random" and conf["enable.idempotence"] is True
    Producer(producer_config("127.0.0.1:9")).close()  # every shared name is one librdkafka knows
