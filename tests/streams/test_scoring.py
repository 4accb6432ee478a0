"""Unit tests of the billing score (streams/scoring.py)."""

from decimal import Decimal

from metering.config import DEFAULT_SCORE_WEIGHTS
from streams.scoring import score


def test_billaged_formula_with_default_weights() -> None:
    totals = {
        "cpu_time_nanos": Decimal(12_500_000_000),  # 12.5 s
        "memory_usage_bytes": Decimal(3_000_000_000),  # 3 GB
        "disk_read_bytes": Decimal(1_000_000),
        "disk_write_bytes": Decimal(2_000_000),  # 3 MB
        "network_rx_bytes": Decimal(99),  # not part of the score
    }
    assert score(totals, DEFAULT_SCORE_WEIGHTS) == Decimal("12.5") + Decimal("1.5") + Decimal("0.9")


def test_weights_are_configurable_and_rounding_is_exact() -> None:
    totals = {"cpu_time_nanos": Decimal(1)}  # one nanosecond
    assert score(totals, {"cpu_seconds": Decimal("1")}) == Decimal("0.000000001")
    assert score(totals, {"cpu_seconds": Decimal("0.4")}) == Decimal("0E-9")
    assert score({}, DEFAULT_SCORE_WEIGHTS) == Decimal(0)


def test_container_cpu_seconds_count_in_the_cpu_term() -> None:
    from decimal import Decimal

    from metering.config import DEFAULT_SCORE_WEIGHTS
    from streams.scoring import score

    vm_only = score({"cpu_time_nanos": Decimal(3 * 10**9)}, DEFAULT_SCORE_WEIGHTS)
    both = score({"cpu_time_nanos": Decimal(3 * 10**9), "cpu_seconds": Decimal("1.5")},
                 DEFAULT_SCORE_WEIGHTS)
    assert vm_only == Decimal("3.000000000")
    assert both == Decimal("4.500000000")
