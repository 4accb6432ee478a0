"""Quota logic without Kafka: periods, thresholds, repeated windows, limit changes, limits."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.config import load_settings
from metering.quota_cli import format_limits, set_limit
from streams.quota_agent import apply_limit_message
from streams.quotas import (
    LimitBook,
    QuotaError,
    TenantQuota,
    alert_codec,
    limit_codec,
    limit_key,
    limit_to_record,
    load_quota_file,
    make_limit,
    parse_limit_key,
    period_end,
    period_start,
)

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, sec: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, sec, tzinfo=dt.UTC).timestamp() * 1000)


def window(start: int, size: int = MIN, score: str = "0", tenant: str = "acme",
           **metrics: Any) -> dict[str, Any]:
    """A decoded WindowResult; metric=value (sum) or metric=(value, aggregation)."""
    totals = []
    for m, v in sorted(metrics.items()):
        value, agg = v if isinstance(v, tuple) else (v, "sum")
        totals.append({"metric": m, "aggregation": agg, "value": Decimal(value), "samples": 1})
    return {"window_id": f"{tenant}|{start}|{size}", "tenant_id": tenant, "window_start_ms": start,
            "window_end_ms": start + size, "totals": totals, "sample_count": len(totals),
            "score": Decimal(score), "late_samples": 0, "has_gap": False}


def limits(*specs: tuple[str, str, Any], tenant: str = "acme",
           thresholds: tuple[int, ...] | None = None) -> dict[tuple[str, str], Any]:
    return {(m, p): make_limit(tenant, m, p, v, thresholds) for m, p, v in specs}


def fired_ids(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["alert_id"] for a in alerts]


# ---- periods ---------------------------------------------------------------------------


def test_period_boundaries_are_utc_calendar_days_and_months() -> None:
    leap_end = ms(2024, 2, 29, 23, 59, 59) + 999
    assert period_start("day", leap_end) == ms(2024, 2, 29)
    assert period_start("month", leap_end) == ms(2024, 2, 1)
    assert period_end("month", ms(2024, 2, 1)) == ms(2024, 3, 1)
    assert period_start("day", ms(2024, 3, 1)) == ms(2024, 3, 1)
    assert period_start("month", ms(2024, 3, 1)) == ms(2024, 3, 1)
    assert period_end("month", ms(2023, 12, 1)) == ms(2024, 1, 1)
    assert period_end("day", ms(2023, 12, 31)) == ms(2024, 1, 1)
    with pytest.raises(QuotaError):
        period_start("week", 0)


@given(st.integers(min_value=0, max_value=ms(2200, 1, 1)), st.sampled_from(["day", "month"]))
def test_every_instant_lies_in_exactly_one_period(ts: int, period: str) -> None:
    start = period_start(period, ts)
    end = period_end(period, start)
    assert start <= ts < end
    assert period_start(period, end) == end  # periods tile time
    d = dt.datetime.fromtimestamp(start / 1000, dt.UTC)
    assert (d.hour, d.minute, d.second) == (0, 0, 0) and (period == "day" or d.day == 1)


# ---- thresholds ------------------------------------------------------------------------


def test_each_threshold_fires_once_with_exact_usage() -> None:
    tq = TenantQuota("acme")
    lim = limits(("cpu", "day", "1.0"))
    t0 = ms(2024, 5, 10, 8)
    got = []
    for i, v in enumerate(["0.3", "0.3", "0.2", "0.1", "0.1", "0.5", "0.5"]):
        got += tq.apply_window(window(t0 + i * MIN, cpu=v), lim, MIN).alerts
    start = ms(2024, 5, 10)
    assert fired_ids(got) == [f"acme|cpu|day|{start}|80", f"acme|cpu|day|{start}|100"]
    first, second = got
    # 0.3 + 0.3 + 0.2 = 0.8 exactly (no float drift): 80 % fires on the third window
    assert first["used"] == Decimal("0.800000000") and first["limit"] == Decimal("1.000000000")
    assert first["crossed_at_window_end_ms"] == t0 + 3 * MIN
    assert second["used"] == Decimal("1.000000000") and second["crossed_at_window_end_ms"] == t0 + 5 * MIN
    assert tq.usage[("cpu", "day")].used == Decimal("2.0")
    # every alert fits the Avro schema and reads back equal
    for a in got:
        assert alert_codec().decode(alert_codec().encode(a)) == a


def test_one_window_can_cross_several_thresholds() -> None:
    tq = TenantQuota("acme")
    out = tq.apply_window(window(ms(2024, 5, 10), cpu="250"), limits(("cpu", "month", 100)), MIN)
    assert [a["threshold_percent"] for a in out.alerts] == [80, 100]


def test_custom_thresholds_and_zero_limit() -> None:
    tq = TenantQuota("acme")
    lim = limits(("cpu", "day", 10), thresholds=(50, 90, 150))
    out = tq.apply_window(window(ms(2024, 5, 10), cpu="9"), lim, MIN)
    assert [a["threshold_percent"] for a in out.alerts] == [50, 90]
    # a limit of 0 allows nothing: the first usage fires every threshold, no usage fires none
    tq2 = TenantQuota("b")
    zero = limits(("cpu", "day", 0), tenant="b")
    assert tq2.apply_window(window(ms(2024, 5, 10), tenant="b", disk="1"), zero, MIN).alerts == []
    out = tq2.apply_window(window(ms(2024, 5, 10) + MIN, tenant="b", cpu="0.000000001"), zero, MIN)
    assert [a["threshold_percent"] for a in out.alerts] == [80, 100]


def test_day_and_month_alerts_on_the_first_of_a_month_have_distinct_ids() -> None:
    tq = TenantQuota("acme")
    out = tq.apply_window(window(ms(2024, 6, 1), cpu="100"),
                          limits(("cpu", "day", 100), ("cpu", "month", 100)), MIN)
    ids = fired_ids(out.alerts)
    assert len(ids) == len(set(ids)) == 4
    assert {a["period_start_ms"] for a in out.alerts} == {ms(2024, 6, 1)}


def test_a_new_day_starts_from_zero_and_fires_again_while_the_month_goes_on() -> None:
    tq = TenantQuota("acme")
    lim = limits(("cpu", "day", 10), ("cpu", "month", 100))
    day1 = ms(2024, 5, 10, 23, 59)
    a1 = tq.apply_window(window(day1, cpu="10"), lim, MIN).alerts
    a2 = tq.apply_window(window(day1 + MIN, cpu="8"), lim, MIN).alerts  # 00:00 next day
    assert [(a["period"], a["threshold_percent"]) for a in a1] == [("day", 80), ("day", 100)]
    assert [(a["period"], a["period_start_ms"], a["threshold_percent"]) for a in a2] == [
        ("day", ms(2024, 5, 11), 80)]
    assert tq.usage[("cpu", "day")].used == 8 and tq.usage[("cpu", "month")].used == 18
    # the fired marks of the previous day are gone with it
    assert all(f[2] >= ms(2024, 5, 1) for f in tq.fired)
    assert tq.fired_in("cpu", "day") == [80]


# ---- what counts -----------------------------------------------------------------------


def test_only_the_smallest_size_counts_and_repeated_windows_count_once() -> None:
    tq = TenantQuota("acme")
    lim = limits(("cpu", "day", 100))
    t0 = ms(2024, 5, 10, 8)
    w1, w2 = window(t0, cpu="30"), window(t0 + MIN, cpu="30")
    assert tq.apply_window(w1, lim, MIN).applied
    hour = tq.apply_window(window(t0, size=HOUR, cpu="1000"), lim, MIN)
    assert (hour.applied, hour.reason, hour.alerts) == (False, "size", [])
    assert tq.apply_window(w2, lim, MIN).applied
    again = tq.apply_window(w2, lim, MIN)  # re-emitted after a crash: identical
    assert (again.applied, again.reason) == (False, "duplicate")
    assert tq.apply_window(w1, lim, MIN).reason == "duplicate"  # an older one (a replay)
    assert tq.usage[("cpu", "day")].used == Decimal("60")
    assert tq.high_water == {MIN: t0 + 2 * MIN}


def test_non_additive_metrics_are_not_quotable_and_score_is() -> None:
    tq = TenantQuota("acme")
    lim = limits(("memory_usage_bytes", "day", 1), ("score", "day", 10), ("reqs", "day", 2))
    t0 = ms(2024, 5, 10, 8)
    w = window(t0, score="4.5", memory_usage_bytes=("5e9", "resource_mean"), peak=("7", "max"),
               reqs=("1", "count"))
    assert tq.apply_window(w, lim, MIN).alerts == []
    out = tq.apply_window(window(t0 + MIN, score="4.5", memory_usage_bytes=("5e9", "resource_mean"),
                                 reqs=("1", "count")), lim, MIN)
    assert [(a["metric"], a["threshold_percent"]) for a in out.alerts] == [
        ("reqs", 80), ("reqs", 100), ("score", 80)]
    assert ("memory_usage_bytes", "day") not in tq.usage
    assert tq.not_quotable == {"memory_usage_bytes": "resource_mean", "peak": "max"}
    assert tq.usage[("score", "month")].used == Decimal("9.0")


# ---- limit changes mid-period -----------------------------------------------------------


def test_raising_a_limit_above_usage_does_not_refire_a_fired_threshold() -> None:
    tq = TenantQuota("acme")
    t0 = ms(2024, 5, 10, 8)
    assert fired_ids(tq.apply_window(window(t0, cpu="85"), limits(("cpu", "day", 100)), MIN).alerts)
    raised = limits(("cpu", "day", 1000))
    # 85 of 1000: nothing; and the 80 % of the new limit (800) is this period's 80 % already
    assert tq.apply_window(window(t0 + MIN, cpu="15"), raised, MIN).alerts == []
    out = tq.apply_window(window(t0 + 2 * MIN, cpu="750"), raised, MIN)
    assert [a["threshold_percent"] for a in out.alerts] == []  # 850 >= 800 but 80 fired already
    out = tq.apply_window(window(t0 + 3 * MIN, cpu="150"), raised, MIN)
    assert [a["threshold_percent"] for a in out.alerts] == [100]  # 1000 of 1000: not fired before


def test_lowering_a_limit_fires_on_the_next_window_even_without_that_metric() -> None:
    tq = TenantQuota("acme")
    t0 = ms(2024, 5, 10, 8)
    assert tq.apply_window(window(t0, cpu="50"), limits(("cpu", "day", 100)), MIN).alerts == []
    lowered = limits(("cpu", "day", 50))
    out = tq.apply_window(window(t0 + MIN, disk="1"), lowered, MIN)  # no cpu in this window
    assert [(a["threshold_percent"], a["used"], a["limit"], a["crossed_at_window_end_ms"])
            for a in out.alerts] == [(80, Decimal("50.000000000"), Decimal("50.000000000"), t0 + 2 * MIN),
                                     (100, Decimal("50.000000000"), Decimal("50.000000000"), t0 + 2 * MIN)]


def test_a_limit_added_mid_period_sees_the_whole_period() -> None:
    tq = TenantQuota("acme")
    t0 = ms(2024, 5, 10, 8)
    tq.apply_window(window(t0, cpu="90"), {}, MIN)
    out = tq.apply_window(window(t0 + MIN, cpu="1"), limits(("cpu", "day", 100)), MIN)
    assert [a["threshold_percent"] for a in out.alerts] == [80]


# ---- exactly once across crashes ----------------------------------------------------------


def replay(windows: list[dict[str, Any]], lim: dict[tuple[str, str], Any],
           saved: Any = None, read_back: Sequence[dict[str, Any]] = ()) -> tuple[TenantQuota, list[Any]]:
    tq = TenantQuota.from_json("acme", json.loads(json.dumps(saved)) if saved else None)
    for a in read_back:
        tq.record_fired(a["metric"], a["period"], a["period_start_ms"], a["threshold_percent"])
    alerts = []
    for w in windows:
        alerts += tq.apply_window(w, lim, MIN).alerts
    return tq, alerts


def test_lost_table_write_after_acked_alerts_fires_nothing_twice() -> None:
    lim = limits(("cpu", "day", 100), ("score", "month", 10))
    t0 = ms(2024, 5, 31, 23, 57)  # crosses into June: day and month roll over mid-stream
    ws = [window(t0 + i * MIN, cpu="30", score="2") for i in range(6)]
    whole, all_alerts = replay(ws, lim)
    # batch 1 (windows 0-1) durable; batch 2 (2-3) sent its alerts, then the table write was lost
    s1, a1 = replay(ws[:2], lim)
    s2, a2 = replay(ws[2:4], lim, s1.to_json())
    assert a2, "the lost batch must have fired something, or this proves nothing"
    # restart: the table is s1; the alerts read back from quota.alerts are a1 + a2; the input is
    # re-read from the committed offset (anywhere at or before batch 2), with repeats
    s3, a3 = replay(ws[1:] + ws[3:], lim, s1.to_json(), read_back=a1 + a2)
    assert fired_ids(a1 + a2 + a3) == fired_ids(all_alerts)  # each once, in the same order
    assert s3.to_json() == whole.to_json()
    # without the read-back, the crash would send a2 again: what the agent's recovery prevents
    _, dup = replay(ws[2:], lim, s1.to_json())
    assert set(fired_ids(dup)) & set(fired_ids(a2))


def test_state_round_trips_through_json() -> None:
    tq, _ = replay([window(ms(2024, 5, 10) + i * MIN, cpu="0.333333333", score="1.5",
                          mem=("1", "max")) for i in range(4)], limits(("cpu", "day", 1)))
    again = TenantQuota.from_json("acme", json.loads(json.dumps(tq.to_json())))
    assert again.to_json() == tq.to_json()
    assert again.usage[("cpu", "day")].used == Decimal("1.333333332")  # exact, 4 x 0.333333333
    assert again.fired_in("cpu", "day") == [80, 100]


# ---- limits ------------------------------------------------------------------------------


def test_limit_book_precedence_removal_tombstone_and_default_tenant() -> None:
    book = LimitBook([make_limit("acme", "cpu", "day", 100, source="file"),
                      make_limit("*", "cpu", "day", 5, source="file"),
                      make_limit("acme", "disk", "month", 7, source="file")])
    assert book.for_tenant("acme")[("cpu", "day")].limit == 100
    assert book.for_tenant("other")[("cpu", "day")].limit == 5  # the default
    book.apply("acme|cpu|day", make_limit("acme", "cpu", "day", 50))  # run-time override
    assert book.for_tenant("acme")[("cpu", "day")].limit == 50
    book.apply("acme|disk|month", make_limit("acme", "disk", "month", None))  # removal
    assert ("disk", "month") not in book.for_tenant("acme")
    book.apply("acme|disk|month", None)  # tombstone: the file's limit again
    assert book.for_tenant("acme")[("disk", "month")].limit == 7
    book.apply("acme|cpu|day", None)
    assert book.for_tenant("acme")[("cpu", "day")].limit == 100
    book.apply("acme|cpu|day", make_limit("acme", "cpu", "day", None))  # hides the default too
    assert ("cpu", "day") not in book.for_tenant("acme")
    assert [(x.tenant, x.metric, x.period) for x in book.effective()] == [
        ("*", "cpu", "day"), ("acme", "disk", "month")]
    assert "acme    disk    month   7      80,100        file" in format_limits(book.effective())


def test_limit_messages_from_the_topic() -> None:
    book = LimitBook()
    rec = limit_to_record(make_limit("a|b", "cpu", "day", "1.5", [50, 100]))
    value = limit_codec().encode(rec)
    assert apply_limit_message(book, b"a|b|cpu|day", value) is None
    lim = book.for_tenant("a|b")[("cpu", "day")]
    assert (lim.limit, lim.thresholds) == (Decimal("1.500000000"), (50, 100))
    assert "does not match" in str(apply_limit_message(book, b"x|cpu|day", value))
    assert apply_limit_message(book, b"a|b|cpu|day", b"junk") is not None
    assert apply_limit_message(book, None, value) == "no key"
    assert apply_limit_message(book, b"a|b|cpu|day", None) is None
    assert book.for_tenant("a|b") == {}
    assert parse_limit_key(limit_key("a|b", "cpu", "month")) == ("a|b", "cpu", "month")
    with pytest.raises(QuotaError):
        parse_limit_key("a|cpu|year")


@pytest.mark.parametrize("limit, thresholds, problem", [
    ("1.0000000001", None, "more than 9 decimal places"),
    ("-1", None, ">= 0"),
    ("nan", None, "finite"),
    ("1e30", None, "exceeds"),
    ("abc", None, "not a decimal"),
    (True, None, "not a number"),
    (1, [0], "outside"),
    (1, [], "empty"),
])
def test_invalid_limits_are_refused(limit: Any, thresholds: Any, problem: str) -> None:
    with pytest.raises(QuotaError, match=problem):
        make_limit("acme", "cpu", "day", limit, thresholds)


def test_quota_file(tmp_path: Path) -> None:
    f = tmp_path / "quotas.toml"
    f.write_text('thresholds_percent = [90]\n'
                 '[[limits]]\ntenant = "acme"\nmetric = "cpu_time_nanos"\nperiod = "month"\n'
                 'limit = "3.6e12"\n'
                 '[[limits]]\ntenant = "*"\nmetric = "score"\nperiod = "day"\nlimit = 0.1\n'
                 'thresholds_percent = [50, 100]\n')
    qf = load_quota_file(f)
    assert qf.thresholds == (90,)
    got = {(x.tenant, x.metric, x.period): (x.limit, x.thresholds, x.source) for x in qf.limits}
    assert got == {("acme", "cpu_time_nanos", "month"): (Decimal("3600000000000.000000000"), (90,), "file"),
                   ("*", "score", "day"): (Decimal("0.100000000"), (50, 100), "file")}
    f.write_text('[[limits]]\ntenant = "acme"\nmetric = "cpu"\nperiod = "year"\nlimit = 1\n')
    with pytest.raises(QuotaError, match=r"limits\[0\].*period"):
        load_quota_file(f)
    f.write_text('[[limits]]\ntenant = "acme"\nmetric = "cpu"\nperiod = "day"\n')
    with pytest.raises(QuotaError, match="missing keys"):
        load_quota_file(f)
    with pytest.raises(QuotaError, match="cannot read"):
        load_quota_file(tmp_path / "missing.toml")


def test_cli_refuses_limits_on_non_additive_metrics_before_touching_kafka() -> None:
    s = load_settings(kafka_bootstrap_servers="127.0.0.1:1")
    with pytest.raises(QuotaError, match="resource_mean"):
        set_limit(s, "acme", "memory_usage_bytes", "day", 1)
    with pytest.raises(QuotaError, match="period"):
        set_limit(s, "acme", "cpu_time_nanos", "week", 1)
