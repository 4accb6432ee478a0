"""Seeded simulators of each source family, for the demo, tests and benchmarks."""

from producers.simulators.vm import VmSimulator

__all__ = ["VmSimulator"]
