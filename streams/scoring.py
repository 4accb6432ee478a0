"""The composite billing score of a window (billaged's formula, weights from config).

    score = cpu_seconds * w_cpu + memory_gb * w_mem + disk_mb * w_disk

cpu_seconds = cpu_time_nanos / 1e9 (VMs) + cpu_seconds (containers); memory_gb =
memory_usage_bytes (tenant's mean footprint) / 1e9; disk_mb = (disk_read_bytes +
disk_write_bytes) / 1e6. Decimal throughout, quantized to 9 places half-even at the end only.
Metrics outside these terms (Redis shard-seconds, container memory GB-seconds) are billed
from their own totals, not through the score.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from decimal import Decimal

from schemas import DECIMAL_QUANTUM

__all__ = ["SCORE_TERMS", "score"]

#: term -> (metric, divisor to the term's unit) pairs summed into it
SCORE_TERMS: dict[str, tuple[tuple[str, Decimal], ...]] = {
    "cpu_seconds": (("cpu_time_nanos", Decimal(10) ** 9), ("cpu_seconds", Decimal(1))),
    "memory_gb": (("memory_usage_bytes", Decimal(10) ** 9),),
    "disk_mb": (("disk_read_bytes", Decimal(10) ** 6), ("disk_write_bytes", Decimal(10) ** 6)),
}

_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)


def score(totals: Mapping[str, Decimal], weights: Mapping[str, Decimal]) -> Decimal:
    """Score of one window from its per-metric totals; exact, then quantized to 1e-9."""
    result = Decimal(0)
    for term, parts in SCORE_TERMS.items():
        weight = weights.get(term)
        if not weight:
            continue
        amount = Decimal(0)
        for metric, divisor in parts:
            value = totals.get(metric)
            if value:
                amount = _CTX.add(amount, _CTX.divide(value, divisor))
        result = _CTX.add(result, _CTX.multiply(amount, weight))
    return result.quantize(DECIMAL_QUANTUM, context=_CTX)
