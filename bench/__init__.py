"""Benchmarks: figures are quoted as ratios against a baseline measured in the same run."""
