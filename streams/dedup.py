"""Deduplication of usage records by event_id over a horizon (default 24 h).

Producers retry with the same event_id (the client library's unique_key, the VM gateway's
batch identity), so the normalizer drops an event_id it has already passed on. Ids are kept
as 8-byte BLAKE2b digests in hourly buckets of the envelope's ``sent_at_ms`` (deterministic
on replay, unlike the wall clock); a bucket older than the horizon is forgotten whole.

Durability: after the batch's output is acknowledged, the ids it added are written to a
changelog-backed table (one entry per partition, bucket and batch, in chunks), so a restarted
worker forgets nothing it had passed on. A crash before that write re-publishes the batch:
a duplicate downstream, never a loss; the window stage also drops duplicates per window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["EventIdFilter", "digest", "saved_entries"]

_BUCKET_MS = 3_600_000


def digest(event_id: str) -> int:
    """A stable 64-bit digest of an event id (Python's own str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")


class EventIdFilter:
    """Event-id digests of one input partition, bucketed by send time for expiry."""

    def __init__(self, horizon_ms: int, bucket_ms: int = _BUCKET_MS) -> None:
        self.horizon_ms = horizon_ms
        self.bucket_ms = bucket_ms
        self._bucket_of: dict[int, int] = {}
        self._buckets: dict[int, set[int]] = {}
        self._newest_bucket: int | None = None
        self.pending: dict[int, list[int]] = {}  # added since the last drain, per bucket

    def __len__(self) -> int:
        return len(self._bucket_of)

    def check_and_add(self, event_id: str, sent_at_ms: int) -> bool:
        """True when the id is new (and remember it); False for a duplicate."""
        d = digest(event_id)
        if d in self._bucket_of:
            return False
        bucket = sent_at_ms - sent_at_ms % self.bucket_ms
        self._bucket_of[d] = bucket
        self._buckets.setdefault(bucket, set()).add(d)
        self.pending.setdefault(bucket, []).append(d)
        if self._newest_bucket is None or bucket > self._newest_bucket:
            self._newest_bucket = bucket
        return True

    def load(self, bucket: int, digests: Iterable[int]) -> None:
        """Restore ids saved earlier (from the table, on first use of a partition)."""
        ids = self._buckets.setdefault(bucket, set())
        for d in digests:
            self._bucket_of[d] = bucket
            ids.add(d)
        if self._newest_bucket is None or bucket > self._newest_bucket:
            self._newest_bucket = bucket

    def drain(self, chunk: int = 10_000) -> Iterator[tuple[int, list[int]]]:
        """The ids added since the last drain, per bucket, in chunks, to be saved."""
        pending, self.pending = self.pending, {}
        for bucket, ids in pending.items():
            for i in range(0, len(ids), chunk):
                yield bucket, ids[i : i + chunk]

    def expire(self) -> list[int]:
        """Forget buckets older than the horizon; returns the buckets dropped."""
        if self._newest_bucket is None:
            return []
        cutoff = self._newest_bucket - self.horizon_ms
        dropped = [b for b in self._buckets if b + self.bucket_ms <= cutoff]
        for b in dropped:
            for d in self._buckets.pop(b):
                if self._bucket_of.get(d) == b:
                    del self._bucket_of[d]
        return dropped


def saved_entries(data: Mapping[Any, Any], partition: int) -> Iterator[tuple[str, int, list[int]]]:
    """Table entries of one partition: (key, bucket, digests)."""
    prefix = f"p{partition}:"
    for key, value in list(data.items()):
        if isinstance(key, str) and key.startswith(prefix) and value:
            yield key, int(value["bucket"]), [int(x, 16) for x in value["ids"]]
