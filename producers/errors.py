"""The exception root of the `producers` package."""

__all__ = ["ProducerError", "PublishError"]


class ProducerError(Exception):
    """Root of every error raised by a producer."""


class PublishError(ProducerError):
    """Kafka did not acknowledge a batch; the caller must not report success."""
