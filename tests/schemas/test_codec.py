"""Unit tests of the Avro codec (schemas/codec.py)."""

from __future__ import annotations

import struct
from decimal import Decimal

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import AvroCodec, CodecError, crc64_avro, envelope_codec, record_codec


def record() -> dict:
    return {"event_id": "e1", "tenant_id": "t", "source": "vm", "resource_id": "r",
            "metric": "cpu_time_nanos", "value": Decimal("12345678901234567890.123456789"),
            "event_time_ms": 1_700_000_000_000, "metadata": {"k": "v"}}


def test_single_object_round_trip_is_exact() -> None:
    codec = record_codec()
    data = codec.encode(record())
    assert data[:2] == b"\xc3\x01"
    assert codec.decode(data) == record()


def test_fingerprint_matches_the_avro_specification() -> None:
    codec = envelope_codec()
    pcf = to_parsing_canonical_form(codec.schema)
    # fastavro gives the fingerprint as the hex of its little-endian bytes
    assert struct.pack("<Q", codec.fingerprint).hex() == fingerprint(pcf, "CRC-64-AVRO")
    assert crc64_avro(b"") == 0xC15D213AA4D7A795


def test_reads_confluent_wire_format() -> None:
    import io

    writer = AvroCodec("metering.v1.UsageRecord", registry_id=17)
    data = writer.encode(record())
    assert data[:5] == b"\x00\x00\x00\x00\x11"
    reader = AvroCodec("metering.v1.UsageRecord", resolve_id=lambda i: record_codec().schema)
    assert reader.decode(data) == record()
    # and a body written by plain fastavro with a Confluent header
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, record_codec().schema, record())
    assert reader.decode(b"\x00" + struct.pack(">I", 99) + buf.getvalue()) == record()


@pytest.mark.parametrize("data,reason", [
    (b"\x01", "too short"),
    (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "fingerprint"),
    (b"\x07garbage-bytes", "unknown wire format"),
    (b"\x00\x00\x00\x00\x05abc", "unknown Confluent schema id"),
])
def test_bad_input_raises_codec_error_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        record_codec().decode(data)


def test_corrupt_body_is_a_codec_error() -> None:
    data = record_codec().encode(record())
    with pytest.raises(CodecError, match="corrupt body"):
        record_codec().decode(data[:14])
