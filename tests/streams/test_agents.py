"""Unit tests of streams/agents.py's in-process pieces (the agents themselves run against the
real broker in test_worker_recovery.py and tests/test_end_to_end.py)."""

from __future__ import annotations

import asyncio

from streams.agents import Published, RecentlyEncoded


def _published(envelope_id: str, samples: int) -> Published:
    return Published(envelope_id, None, samples, [], None, None)


def test_a_payload_is_taken_once_and_only_by_equal_bytes() -> None:
    recent = RecentlyEncoded()
    payload = b"H" * 100 + b"middle" + b"T" * 100
    pub = _published("e1", 3)
    recent.put(payload, pub)
    # same length, head and tail, different middle: not the same message
    assert recent.take(b"H" * 100 + b"MIDDLE" + b"T" * 100) is None
    assert recent.take(bytes(bytearray(payload))) is pub  # equal bytes, another object
    assert recent.take(payload) is None  # once
    assert recent.take(None) is None and recent.take(b"") is None


def test_a_colliding_payload_misses_instead_of_taking_the_other() -> None:
    recent = RecentlyEncoded()
    first = b"H" * 100 + b"one" + b"T" * 100
    second = b"H" * 100 + b"two" + b"T" * 100
    recent.put(first, _published("e1", 1))
    recent.put(second, _published("e2", 1))
    assert recent.take(second) is None  # a decode, never the wrong message
    taken = recent.take(first)
    assert taken is not None and taken.envelope_id == "e1"


def test_the_oldest_payloads_are_evicted_beyond_the_bound() -> None:
    recent = RecentlyEncoded(max_records=10)
    payloads = [bytes([i]) * 200 for i in range(4)]
    for i, p in enumerate(payloads):
        recent.put(p, _published(f"e{i}", 4))
    assert recent.take(payloads[0]) is None and recent.take(payloads[1]) is None
    assert [recent.take(p).envelope_id for p in payloads[2:]] == ["e2", "e3"]  # type: ignore[union-attr]


def test_room_waits_for_takes_once_half_full() -> None:
    async def run() -> bool:
        recent = RecentlyEncoded(max_records=10)
        recent.put(b"a" * 200, _published("e1", 6))
        waiter = asyncio.create_task(recent.room(timeout=5.0))
        await asyncio.sleep(0.01)
        blocked = not waiter.done()
        recent.take(b"a" * 200)
        await asyncio.wait_for(waiter, 1.0)
        return blocked

    assert asyncio.run(run())
