"""Per-metric aggregations (streams/aggregations.py): exact and order-independent."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from metering.config import load_settings
from metering.errors import ConfigError
from streams.aggregations import DEFAULT_METRIC_AGGREGATIONS, MetricState, new_state


def fold(kind: str, samples: list[tuple[str, int, str]]) -> MetricState:
    st = new_state(kind)
    for i, (res, ts, value) in enumerate(samples):
        st.add(Decimal(value), ts, f"e{i}", res)
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
