"""Unit tests of record validation (streams/normalize.py)."""

from decimal import Decimal

from streams.normalize import invalid_reason, invalid_records

SENT = 1_800_000_000_000


def good() -> dict:
    return {"event_id": "e", "tenant_id": "t", "metric": "m", "resource_id": "r",
            "value": Decimal("1.5"), "event_time_ms": SENT - 1000}


def test_valid_record() -> None:
    assert invalid_reason(good(), SENT) is None


def test_each_problem_is_named() -> None:
    cases = {
        "tenant_id is empty": {"tenant_id": ""},
        "negative": {"value": Decimal(-1)},
        "not a finite decimal": {"value": Decimal("NaN")},
        "5 minutes after": {"event_time_ms": SENT + 6 * 60_000},
        "35 days before": {"event_time_ms": SENT - 36 * 86_400_000},
    }
    for expected, change in cases.items():
        reason = invalid_reason({**good(), **change}, SENT)
        assert reason is not None and expected in reason, (change, reason)


def test_invalid_records_names_each_bad_record_of_an_envelope() -> None:
    records = [good(), {**good(), "value": Decimal(-2)}, good(),
               {**good(), "event_time_ms": SENT + 6 * 60_000}, {**good(), "metric": ""}]
    bad = invalid_records(records, SENT)
    assert [i for i, _ in bad] == [1, 3, 4]
    assert all(reason == invalid_reason(records[i], SENT) for i, reason in bad)
    assert invalid_records([good(), good()], SENT) == []
