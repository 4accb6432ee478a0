"""The offset guard (streams/offsets.py): each offset once, in order, holes re-read."""

from __future__ import annotations

from streams.offsets import RESEEK_AFTER_S, OffsetGuard, Verdict

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


def test_a_seek_whose_reread_never_comes_is_sent_again_by_the_next_skipped_message() -> None:
    # Faust drops re-read messages at or below the last offset it delivered, and a fetch in
    # flight during the seek raises that offset: the re-read can be lost, so seek again
    g = OffsetGuard("t")
    g.check(P, 107, now=0.0)
    g.processed(P, 107)
    assert g.check(P, 118, now=10.0) is Verdict.SEEK
    assert g.check(P, 119, now=10.0 + RESEEK_AFTER_S / 2) is Verdict.SKIP
    assert g.check(P, 120, now=10.0 + RESEEK_AFTER_S) is Verdict.SEEK  # lost: again
    assert g.expected(P) == 108
    assert g.check(P, 121, now=10.0 + RESEEK_AFTER_S + 0.1) is Verdict.SKIP  # clock restarted
    assert g.check(P, 108, now=20.0) is Verdict.PROCESS
    g.processed(P, 108)
    assert (g.holes, g.reseeks) == (1, 1)
    assert g.overdue(now=100.0) == []  # the re-read came: nothing left to seek


def test_overdue_seeks_are_listed_once_per_period_for_the_timer() -> None:
    # the last messages of a partition: nothing more arrives to notice the lost seek
    g = OffsetGuard("t")
    other = ("usage.vm", 1)
    g.check(P, 5, now=0.0)
    g.processed(P, 5)
    g.check(other, 0, now=0.0)
    g.processed(other, 0)
    assert g.check(P, 9, now=1.0) is Verdict.SEEK
    assert g.overdue(now=1.0 + RESEEK_AFTER_S / 2) == []
    assert g.overdue(now=1.0 + RESEEK_AFTER_S) == [(P, 6)]
    assert g.overdue(now=1.0 + RESEEK_AFTER_S + 0.1) == []  # its clock restarted
    assert g.overdue(now=1.0 + 2 * RESEEK_AFTER_S) == [(P, 6)]
    g.forget([P])
    assert g.overdue(now=100.0) == []
