"""Seeded simulators of each source family, for the demo, tests and benchmarks."""

from producers.simulators.containers import ContainerSimulator
from producers.simulators.redis_enterprise import RedisEnterpriseSimulator
from producers.simulators.vm import VmSimulator

__all__ = ["ContainerSimulator", "RedisEnterpriseSimulator", "VmSimulator"]
