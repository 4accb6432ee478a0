"""Avro schemas (.avsc) of the pipeline's messages and the codec that reads and writes them."""

from schemas.codec import (
    DECIMAL_QUANTUM,
    AvroCodec,
    CodecError,
    crc64_avro,
    dead_letter_codec,
    envelope_codec,
    load_schema,
    quota_alert_codec,
    quota_limit_codec,
    record_codec,
    webhook_delivery_codec,
    window_codec,
)
from schemas.deadletters import encode_dead_letter

__all__ = [
    "DECIMAL_QUANTUM",
    "AvroCodec",
    "CodecError",
    "crc64_avro",
    "dead_letter_codec",
    "encode_dead_letter",
    "envelope_codec",
    "load_schema",
    "quota_alert_codec",
    "quota_limit_codec",
    "record_codec",
    "webhook_delivery_codec",
    "window_codec",
]
