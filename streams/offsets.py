"""Each input partition's offsets, seen once, in order, without holes — whatever Faust does.

Faust can hand an agent an offset twice (it seeks to the committed offset right after
recovery; a fetch can be repeated), and in the SIGKILL test it handed the normalizer a
partition with ten offsets missing, which its take buffer had acked without processing: the
commit then passed records that were never published. An agent asks the guard about every
message before it processes it:

* ``PROCESS``: the next offset (or the first one after an assignment);
* ``REDELIVERED``: processed already while this worker kept the partition: skip it;
* ``SEEK``: a hole: seek the partition back to the expected offset, skip this message;
* ``SKIP``: still a message from before that seek: skip it.

If the re-read after a seek hands over the first skipped offset again without the hole
filled, the hole is real (never the case on our topics, but a compacted or transactional
topic has such gaps) and processing goes on from there, with a warning.

A seek can be lost. Faust's fetch loop drops every message at or below the last offset it
delivered, and a fetch that was already under way when the seek ran goes on delivering (and
raising that offset) after it: the re-read is then dropped whole and the partition is
skipped for good (the one way found in the code for what CI once showed, a partition's last
windows never closing after a SIGKILL; see docs/ARCHITECTURE.md). So a seek whose re-read
has not begun within ``RESEEK_AFTER_S`` is sent again:
by the next message that is skipped, or, when nothing more comes, by the agent's timer
(:meth:`OffsetGuard.overdue`). Seeking again is harmless: what was processed meanwhile is
``REDELIVERED``.

Skipped messages must never be acked by Faust's automatic ack (that would let the commit
pass what was not processed): the agents hold a reference on every message of a batch and
release only what they processed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable

__all__ = ["RESEEK_AFTER_S", "Key", "OffsetGuard", "Verdict"]

#: seconds after which a seek whose re-read has not begun is sent again
RESEEK_AFTER_S = 2.0

#: an input partition: (topic, partition number)
Key = tuple[str, int]

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    """What an agent does with a message."""

    PROCESS = "process"
    REDELIVERED = "redelivered"
    SEEK = "seek"
    SKIP = "skip"


class OffsetGuard:
    """The next expected offset of each input partition of one agent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._expected: dict[Key, int] = {}
        # partition -> (offset sought, first offset skipped, monotonic time of the last seek)
        self._sought: dict[Key, tuple[int, int, float]] = {}
        self._last_redelivered: dict[Key, int] = {}
        self.redelivered = 0
        self.holes = 0
        self.reseeks = 0

    def expected(self, partition: Key) -> int | None:
        """The next offset this agent must process in ``partition`` (None: not known yet)."""
        return self._expected.get(partition)

    def check(self, partition: Key, offset: int, now: float | None = None) -> Verdict:
        """The verdict for the message at ``offset`` of ``partition`` (``now``: monotonic
        seconds, for tests)."""
        exp = self._expected.get(partition)
        if exp is None or offset == exp:
            self._sought.pop(partition, None)
            return Verdict.PROCESS
        if offset < exp:
            self.redelivered += 1
            if self._last_redelivered.get(partition) != offset - 1:
                log.info("%s: %s@%d delivered again; processed already, skipped",
                         self.name, partition, offset)
            self._last_redelivered[partition] = offset
            return Verdict.REDELIVERED
        now = time.monotonic() if now is None else now
        sought = self._sought.get(partition)
        if sought is None or sought[0] != exp:
            self._sought[partition] = (exp, offset, now)
            self.holes += 1
            log.warning("%s: %s jumped from %d to %d; seeking back to %d",
                        self.name, partition, exp - 1, offset, exp)
            return Verdict.SEEK
        if offset == sought[1]:
            log.warning("%s: %s has no offsets %d..%d; going on from %d",
                        self.name, partition, exp, offset - 1, offset)
            self._sought.pop(partition, None)
            return Verdict.PROCESS
        if now - sought[2] >= RESEEK_AFTER_S:
            self._reseek(partition, sought, now)
            return Verdict.SEEK
        return Verdict.SKIP

    def overdue(self, now: float | None = None) -> list[tuple[Key, int]]:
        """Partitions whose seek's re-read has not begun within ``RESEEK_AFTER_S``, with the
        offset to seek them to again; the caller seeks each (their clocks restart now)."""
        now = time.monotonic() if now is None else now
        out = []
        for partition, sought in list(self._sought.items()):
            if now - sought[2] >= RESEEK_AFTER_S:
                self._reseek(partition, sought, now)
                out.append((partition, sought[0]))
        return out

    def _reseek(self, partition: Key, sought: tuple[int, int, float], now: float) -> None:
        self.reseeks += 1
        log.warning("%s: %s: no re-read from %d %.1f s after seeking there; seeking again",
                    self.name, partition, sought[0], now - sought[2])
        self._sought[partition] = (sought[0], sought[1], now)

    def processed(self, partition: Key, offset: int) -> None:
        """Record that ``offset`` was processed: the next one is expected."""
        self._expected[partition] = offset + 1

    def expect(self, partition: Key, offset: int) -> None:
        """Expect ``offset`` next (a restored state that needs its input from there)."""
        self._expected[partition] = offset

    def forget(self, partitions: Iterable[Key]) -> None:
        """Forget revoked or newly assigned partitions: their first message is trusted."""
        for p in partitions:
            self._expected.pop(p, None)
            self._sought.pop(p, None)
            self._last_redelivered.pop(p, None)
