"""Building dead-letter records: one shape for every stage that rejects input."""

from __future__ import annotations

import time

from schemas.codec import dead_letter_codec

__all__ = ["encode_dead_letter"]


def encode_dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    reason: str,
    key: bytes | None,
    payload: bytes | None,
) -> bytes:
    """Encode a DeadLetter keeping the rejected message whole, with where it came from and why."""
    return dead_letter_codec().encode(
        {
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "stage": stage,
            "reason": reason,
            "key": key,
            "payload": payload or b"",
            "failed_at_ms": int(time.time() * 1000),
        }
    )
