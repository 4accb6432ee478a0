"""The exception root of the `sinks` package."""

__all__ = ["BackpressureError", "SinkError", "SinkUnavailableError"]


class SinkError(Exception):
    """Root of every error raised by a sink."""


class SinkUnavailableError(SinkError):
    """The destination cannot be reached right now; the batch was not persisted."""


class BackpressureError(SinkError):
    """The sink cannot take more now; retry the same batch after ``retry_after`` seconds.

    Overload is signalled, not slept through: the batching base pauses the partitions
    and keeps the consumer alive while it waits.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
