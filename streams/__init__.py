"""The stream stage: a Faust app that normalizes, windows and scores usage per tenant."""

from streams.scoring import SCORE_TERMS, score
from streams.windows import PartitionWindows, WindowConfig, window_id
from streams.worker import build_worker, run_worker

__all__ = [
    "SCORE_TERMS",
    "PartitionWindows",
    "WindowConfig",
    "build_worker",
    "run_worker",
    "score",
    "window_id",
]
