"""Benchmarks: figures are quoted as ratios against a baseline measured in the same run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "publish_report"]

#: where every run's figures are kept (git-ignored)
RESULTS = Path(__file__).resolve().parent / "results"


def publish_report(
    name: str, report: dict[str, Any], out: Path | None, as_json: bool,
    show: Callable[[dict[str, Any]], None],
) -> int:
    """Save a run's report as JSON (``out`` or ``bench/results/<name>-<time>.json``) and print
    it, as JSON or with ``show``."""
    path = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        show(report)
    print(f"result: {path}")
    return 0
