"""The librdkafka settings every producer of the project starts from.

Each of them writes something that is billed or replayed, so each waits for every in-sync
replica, is idempotent (a retry neither duplicates nor reorders within a partition: message
order in ``usage.records`` decides lateness) and places keys with the Java client's
partitioner, aiokafka's default too, so Faust and every other client agree on tenant ->
partition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["producer_config"]

_RELIABLE: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "partitioner": "murmur2_random",
    # librdkafka logs disconnects at info level; warnings and errors still show
    "log_level": 4,
}


def producer_config(bootstrap_servers: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A confluent-kafka ``Producer`` configuration: the shared settings above, then
    ``extra`` (librdkafka's names, e.g. ``{"linger.ms": 5}``) over them."""
    return {"bootstrap.servers": bootstrap_servers, **_RELIABLE, **(extra or {})}
