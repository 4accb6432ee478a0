"""Unit tests of record validation (streams/normalize.py)."""

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

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


BAD_CHANGES = [
    {"event_id": ""}, {"tenant_id": ""}, {"metric": ""}, {"resource_id": ""},
    {"value": Decimal(-1)}, {"value": Decimal("NaN")}, {"value": Decimal("sNaN")},
    {"value": Decimal("Infinity")}, {"value": Decimal(10) ** 29}, {"value": 1.5}, {"value": 2},
    {"event_time_ms": SENT + 5 * 60_000 + 1}, {"event_time_ms": SENT - 35 * 86_400_000 - 1},
]
EDGE_VALUES = [Decimal(0), Decimal(10) ** 29 - Decimal("1e-9"), Decimal("0.000000001")]
EDGE_TIMES = [SENT + 5 * 60_000, SENT - 35 * 86_400_000]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.just({}),
    st.sampled_from(BAD_CHANGES),
    st.sampled_from(EDGE_VALUES).map(lambda v: {"value": v}),
    st.sampled_from(EDGE_TIMES).map(lambda t: {"event_time_ms": t}),
), max_size=12))
def test_the_whole_envelope_check_agrees_with_checking_each_record(changes: list[dict]) -> None:
    # invalid_records checks a valid envelope at once and only then record by record
    records = [{**good(), **change} for change in changes]
    expected = [(i, reason) for i, r in enumerate(records)
                if (reason := invalid_reason(r, SENT)) is not None]
    assert invalid_records(records, SENT) == expected
