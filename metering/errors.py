"""The exception root of the `metering` package."""

__all__ = ["ConfigError", "EmbeddedServerError", "MeteringError"]


class MeteringError(Exception):
    """Root of every error raised by the `metering` package."""


class ConfigError(MeteringError):
    """A setting is missing or invalid; the message names the setting."""


class EmbeddedServerError(MeteringError):
    """An embedded server (Tansu, ClickHouse) could not be started or reached."""
