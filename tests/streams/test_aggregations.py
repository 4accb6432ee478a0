"""Per-metric aggregations (streams/aggregations.py): exact and order-independent."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.config import load_settings
from metering.errors import ConfigError
from streams.aggregations import AGGREGATIONS, DEFAULT_METRIC_AGGREGATIONS, MetricState, new_state


def fold(kind: str, samples: list[tuple[str, int, str]]) -> MetricState:
    st = new_state(kind)
    for i, (res, ts, value) in enumerate(samples):
        st.add(Decimal(value), ts, f"e{i}", res)
    return st


def fold_events(kind: str, events: Iterable[tuple[str, str, int, str]]) -> MetricState:
    # (event_id, resource, ts, value): the id travels with its sample, so a permutation is a
    # different arrival order of the same events (fold() numbers ids by arrival)
    st = new_state(kind)
    for event_id, res, ts, value in events:
        st.add(Decimal(value), ts, event_id, res)
    return st


def test_time_weighted_holds_each_reading_until_the_next_and_the_last_until_the_end() -> None:
    # window [0, 60 s): vm-a at 2 GB for 20 s then 4 GB for 40 s; vm-b 1 GB from 30 s on
    samples = [("vm-a", 0, "2"), ("vm-a", 20_000, "4"), ("vm-b", 30_000, "1")]
    want = Decimal(2 * 20 + 4 * 40 + 1 * 30)
    for order in itertools.permutations(samples):
        assert fold("time_weighted", list(order)).result(60_000) == want


def test_time_weighted_is_exact_on_decimals_and_counts_a_repeated_instant_once() -> None:
    st = fold("time_weighted", [("r", 0, "0.1"), ("r", 1, "0.2"), ("r", 1, "0.15")])
    # 0.1 for 1 ms, then the larger reading at t=1 ms (0.2) until 3 ms
    assert st.result(3) == Decimal("0.0001") + Decimal("0.0004")
    assert st.samples == 3


def test_resource_mean_and_sum_ignore_the_window_end() -> None:
    samples = [("a", 0, "2"), ("a", 1, "4"), ("b", 0, "10")]
    assert fold("resource_mean", samples).result(99) == Decimal(13)
    assert fold("sum", samples).result() == Decimal(16)


def test_latest_is_the_value_with_the_greatest_event_time_whatever_the_arrival_order() -> None:
    # a late, older reading must not replace a newer one; resources are not kept apart
    events = [("e1", "r", 3_000, "7"), ("e2", "r", 1_000, "5"), ("e3", "r", 2_000, "9"),
              ("e4", "other", 0, "1")]
    for order in itertools.permutations(events):
        assert fold_events("latest", order).result() == Decimal(7)


def test_latest_breaks_a_tie_on_event_time_by_the_greater_event_id_in_any_order() -> None:
    # readings of several resources at one instant: the event id decides, so a replay that
    # delivers them in another order bills the same value
    events = [("evt-a", "r1", 5_000, "1"), ("evt-c", "r2", 5_000, "3"), ("evt-b", "r3", 5_000, "2"),
              ("evt-z", "r1", 4_000, "9")]
    for order in itertools.permutations(events):
        st = fold_events("latest", order)
        assert st.result() == Decimal(3)
        assert st.latest_key == (5_000, "evt-c")


def test_unique_count_counts_each_distinct_value_once_in_any_order() -> None:
    samples = [("r", 0, "3"), ("r", 1, "1"), ("r", 2, "3"), ("r", 3, "2"), ("r", 4, "1")]
    for order in itertools.permutations(samples):
        st = fold("unique_count", list(order))
        assert st.result() == Decimal(3)
        assert st.samples == 5  # the window's sample count still sees every sample


def test_unique_count_compares_values_numerically_across_resources_and_times() -> None:
    # Decimal equality ignores the exponent (2, 2.0 and 2.000000000 are one value), and
    # values are counted, not resources or instants
    samples = [("a", 0, "2"), ("b", 0, "2.0"), ("a", 9, "2.000000000"), ("c", 5, "0.5")]
    assert fold("unique_count", samples).result() == Decimal(2)


# five events over three resources, with a repeated value written with another exponent, two
# readings of one resource at one instant and a tie on the latest event time. Window [0, 10 s).
# Repeating means are covered by the resource_mean test below.
_PERMUTED_EVENTS = [
    ("e1", "vm-a", 0, "2"),
    ("e2", "vm-a", 4_000, "4"),
    ("e3", "vm-b", 4_000, "2.0"),
    ("e4", "vm-b", 4_000, "1"),
    ("e5", "vm-c", 4_000, "0.5"),
]
_PERMUTED_WANT = {
    "sum": Decimal("9.5"),
    "count": Decimal(5),
    "max": Decimal(4),
    "latest": Decimal("0.5"),  # the four readings at 4 s tie: the greatest id, e5, wins
    "unique_count": Decimal(4),  # 2, 4, 1, 0.5
    "resource_mean": Decimal(3) + Decimal("1.5") + Decimal("0.5"),
    # vm-a 2 for 4 s then 4 for 6 s; vm-b the larger reading at 4 s (2) for 6 s; vm-c 0.5 for 6 s
    "time_weighted": Decimal(2 * 4 + 4 * 6 + 2 * 6) + Decimal("0.5") * 6,
}


@pytest.mark.parametrize("kind", AGGREGATIONS)
def test_every_aggregation_gives_the_same_result_for_every_arrival_order(kind: str) -> None:
    # billing is exact only if a window recomputed after a crash or a replay, which sees the
    # same samples in another order, gives the same number (a new aggregation needs a want)
    want = _PERMUTED_WANT[kind]
    results = {fold_events(kind, order).result(10_000) for order in itertools.permutations(_PERMUTED_EVENTS)}
    assert results == {want}


def test_resource_mean_of_repeating_means_rounds_the_same_in_every_arrival_order() -> None:
    # means of 1.000000001/3, 0.000000002/3 and 0.000000001/6 sum to exactly 0.3333333345,
    # halfway between two billed values: rounded means added in first-arrival order gave
    # ...335 for some orders and ...334 for others
    events = [("a1", "a", 0, "1"), ("a2", "a", 1, "0"), ("a3", "a", 2, "0.000000001"),
              ("b1", "b", 0, "0.000000002"), ("b2", "b", 1, "0"), ("b3", "b", 2, "0")]
    events += [(f"c{i}", "c", i, "0.000000001" if i == 0 else "0") for i in range(6)]
    billed = set()
    for first in itertools.permutations(["a", "b", "c"]):
        order = sorted(events, key=lambda e: first.index(e[1]))
        billed.add(fold_events("resource_mean", order).result().quantize(Decimal("1E-9")))
    assert billed == {Decimal("0.333333334")}  # half-even on the exact total


_EVENTS = st.lists(st.tuples(st.sampled_from(["vm-a", "vm-b", "vm-c"]), st.integers(0, 9_000),
                             st.integers(0, 40).map(lambda v: str(Decimal(v) / 8))), max_size=30)


@pytest.mark.parametrize("kind", AGGREGATIONS)
@settings(max_examples=100, deadline=None)
@given(events=_EVENTS, cuts=st.lists(st.integers(0, 30), max_size=4))
def test_merging_folded_parts_equals_adding_every_sample(
        kind: str, events: list[tuple[str, int, str]], cuts: list[int]) -> None:
    # the window stage merges a message folded once into each of its windows, which already
    # hold other messages: the same state as adding the samples one by one
    numbered = [(f"e{i}", res, ts, value) for i, (res, ts, value) in enumerate(events)]
    one_by_one = fold_events(kind, numbered)
    bounds = [0, *sorted(c for c in cuts if c <= len(numbered)), len(numbered)]
    merged = new_state(kind)
    for lo, hi in itertools.pairwise(bounds):
        merged.merge(fold_events(kind, numbered[lo:hi]))
    assert merged.samples == one_by_one.samples
    assert merged.result(10_000) == one_by_one.result(10_000)


def test_merging_leaves_the_merged_part_alone_and_refuses_another_kind() -> None:
    part = fold("resource_mean", [("vm-a", 0, "1")])
    first, second = fold("resource_mean", [("vm-a", 0, "2")]), new_state("resource_mean")
    first.merge(part)
    second.merge(part)
    second.merge(part)
    assert (first.result(), second.result()) == (Decimal("1.5"), Decimal(1))
    assert part.per_resource == {"vm-a": [Decimal(1), 1]}  # copied, not shared
    points = fold("time_weighted", [("vm-a", 0, "1")])
    into = new_state("time_weighted")
    into.merge(points)
    into.merge(fold("time_weighted", [("vm-a", 5, "2")]))
    assert points.points == {"vm-a": {0: Decimal(1)}}
    with pytest.raises(ValueError, match="cannot merge a sum state into a max state"):
        new_state("max").merge(new_state("sum"))


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        new_state("avg")


def test_settings_extend_the_builtin_table_and_name_a_bad_value() -> None:
    s = load_settings(metric_aggregations={"gpu_seconds": "sum", "memory_usage_bytes": "time_weighted"})
    assert s.metric_aggregations["gpu_seconds"] == "sum"
    assert s.metric_aggregations["memory_usage_bytes"] == "time_weighted"
    assert s.metric_aggregations["cpu_time_nanos"] == DEFAULT_METRIC_AGGREGATIONS["cpu_time_nanos"]
    with pytest.raises(ConfigError, match="METRIC_AGGREGATIONS"):
        load_settings(metric_aggregations={"x": "average"})
