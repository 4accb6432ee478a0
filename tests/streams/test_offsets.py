"""The offset guard (streams/offsets.py): each offset once, in order, holes re-read."""

from __future__ import annotations

from streams.offsets import OffsetGuard, Verdict

P = ("usage.vm", 0)


def test_first_message_is_trusted_then_offsets_must_follow() -> None:
    g = OffsetGuard("t")
    assert g.check(P, 40) is Verdict.PROCESS
    g.processed(P, 40)
    assert g.check(P, 41) is Verdict.PROCESS
    g.processed(P, 41)
    assert g.expected(P) == 42


def test_redelivered_offsets_are_skipped_and_counted() -> None:
    g = OffsetGuard("t")
    for o in range(10, 15):
        assert g.check(P, o) is Verdict.PROCESS
        g.processed(P, o)
    # Faust seeks back to the committed offset: what was processed comes again
    assert [g.check(P, o) for o in range(11, 15)] == [Verdict.REDELIVERED] * 4
    assert g.check(P, 15) is Verdict.PROCESS
    assert g.redelivered == 4


def test_a_hole_asks_for_one_seek_and_skips_until_the_reread_fills_it() -> None:
    g = OffsetGuard("t")
    g.check(P, 107)
    g.processed(P, 107)
    assert g.check(P, 118) is Verdict.SEEK  # 108..117 never came: seek back to 108
    assert g.expected(P) == 108
    assert g.check(P, 119) is Verdict.SKIP  # still the old fetch
    assert g.check(P, 108) is Verdict.PROCESS  # the re-read
    g.processed(P, 108)
    assert g.holes == 1


def test_a_real_gap_is_accepted_once_the_reread_shows_it() -> None:
    # a compacted or transactional topic can lack offsets: after the seek the re-read hands
    # the first skipped offset again, and processing goes on from there
    g = OffsetGuard("t")
    g.check(P, 5)
    g.processed(P, 5)
    assert g.check(P, 9) is Verdict.SEEK
    assert g.check(P, 10) is Verdict.SKIP
    assert g.check(P, 9) is Verdict.PROCESS


def test_partitions_and_topics_are_separate_and_forgotten_on_reassignment() -> None:
    g = OffsetGuard("t")
    other = ("usage.client", 0)
    g.check(P, 100)
    g.processed(P, 100)
    assert g.check(other, 3) is Verdict.PROCESS  # another topic's partition 0
    g.forget([P])
    assert g.expected(P) is None
    assert g.check(P, 50) is Verdict.PROCESS  # a new assignment starts where Faust says
