"""Usage metering on Kafka: the command line, configuration and embedded servers."""

from metering.config import Settings, load_settings
from metering.errors import ConfigError, MeteringError

__all__ = ["ConfigError", "MeteringError", "Settings", "load_settings"]
