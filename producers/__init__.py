"""Producers: publish usage from each source family to Kafka in batch envelopes."""

from producers.errors import ProducerError, PublishError
from producers.publisher import EnvelopePublisher, usage_record

__all__ = ["EnvelopePublisher", "ProducerError", "PublishError", "usage_record"]
