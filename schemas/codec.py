"""Avro codecs on fastavro with parsed schemas.

Writes Avro single-object encoding (``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint
of the schema's Parsing Canonical Form + body) or, when a schema registry id is configured,
the Confluent wire format (``00`` + 4-byte big-endian schema id + body). Reads both.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

__all__ = [
    "AvroCodec",
    "CodecError",
    "DECIMAL_QUANTUM",
    "SINGLE_OBJECT_MAGIC",
    "crc64_avro",
    "dead_letter_codec",
    "envelope_codec",
    "load_schema",
    "quota_alert_codec",
    "quota_limit_codec",
    "record_codec",
    "window_codec",
]

#: Every decimal in our schemas is decimal(38, 9).
DECIMAL_QUANTUM = Decimal("0.000000001")

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_CONFLUENT_MAGIC = 0
_EMPTY64 = 0xC15D213AA4D7A795


class CodecError(ValueError):
    """Bytes that are not a valid message of the expected schema; the message says why."""


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin CRC-64 fingerprint the Avro specification uses for single-object encoding."""
    fp = _EMPTY64
    for b in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ b) & 0xFF]
    return fp


_SCHEMA_FILES = {
    "metering.v1.UsageRecord": "usage_record.avsc",
    "metering.v1.UsageEnvelope": "usage_envelope.avsc",
    "metering.v1.WindowResult": "window_result.avsc",
    "metering.v1.DeadLetter": "dead_letter.avsc",
    "metering.v1.QuotaAlert": "quota_alert.avsc",
    "metering.v1.QuotaLimit": "quota_limit.avsc",
}


@cache
def _named() -> dict[str, Any]:
    named: dict[str, Any] = {}
    expanded: dict[str, Any] = {}
    # order matters: the envelope refers to UsageRecord by name
    for full_name, file_name in _SCHEMA_FILES.items():
        raw = json.loads(resources.files(__package__).joinpath(file_name).read_text())
        fastavro.parse_schema(raw, named_schemas=named)
        # expanded copies are self-contained: canonical form and fingerprint need that
        expanded[full_name] = fastavro.parse_schema(raw, named_schemas=dict(named), expand=True)
    return expanded


def load_schema(full_name: str) -> Any:
    """The parsed schema of one of this package's records, e.g. ``metering.v1.UsageRecord``."""
    try:
        return _named()[full_name]
    except KeyError as exc:
        raise CodecError(f"unknown schema {full_name!r}") from exc


class AvroCodec:
    """Encode and decode one record type.

    ``registry_id`` switches writing to the Confluent wire format. ``resolve_id`` maps a
    Confluent schema id found while reading to the writer's schema (a registry client);
    without it only ids equal to ``registry_id`` are readable.
    """

    def __init__(
        self,
        full_name: str,
        *,
        registry_id: int | None = None,
        resolve_id: Callable[[int], Any] | None = None,
    ) -> None:
        self.schema = load_schema(full_name)
        self.full_name = full_name
        canonical = to_parsing_canonical_form(self.schema)
        self.fingerprint = crc64_avro(canonical.encode())
        self._header = SINGLE_OBJECT_MAGIC + struct.pack("<Q", self.fingerprint)
        self.registry_id = registry_id
        self._resolve_id = resolve_id
        self._writers_by_id: dict[int, Any] = {}
        if registry_id is not None:
            self._writers_by_id[registry_id] = self.schema
            self._header = struct.pack(">bI", _CONFLUENT_MAGIC, registry_id)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Serialize one record; raises CodecError naming what does not fit the schema."""
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self.schema, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CodecError(f"{self.full_name}: cannot encode: {exc!r}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """Deserialize one message in single-object or Confluent wire format."""
        if len(data) < 5:
            raise CodecError(f"{self.full_name}: message of {len(data)} bytes is too short")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise CodecError(f"{self.full_name}: truncated single-object header")
            (fp,) = struct.unpack_from("<Q", data, 2)
            if fp != self.fingerprint:
                raise CodecError(
                    f"{self.full_name}: schema fingerprint {fp:#018x} is not {self.fingerprint:#018x}"
                )
            writer, offset = self.schema, 10
        elif data[0] == _CONFLUENT_MAGIC:
            (schema_id,) = struct.unpack_from(">I", data, 1)
            writer, offset = self._writer_for_id(schema_id), 5
        else:
            raise CodecError(f"{self.full_name}: unknown wire format (first byte {data[0]:#04x})")
        try:
            out = fastavro.schemaless_reader(io.BytesIO(data[offset:]), writer, self.schema)
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise CodecError(f"{self.full_name}: corrupt body: {exc!r}") from exc
        if not isinstance(out, dict):
            raise CodecError(f"{self.full_name}: body is not a record")
        return out

    def _writer_for_id(self, schema_id: int) -> Any:
        writer = self._writers_by_id.get(schema_id)
        if writer is None:
            if self._resolve_id is None:
                raise CodecError(f"{self.full_name}: unknown Confluent schema id {schema_id}")
            try:
                writer = fastavro.parse_schema(self._resolve_id(schema_id), named_schemas={})
            except Exception as exc:
                raise CodecError(f"{self.full_name}: schema id {schema_id}: {exc!r}") from exc
            self._writers_by_id[schema_id] = writer
        return writer


@cache
def record_codec() -> AvroCodec:
    """The codec of ``metering.v1.UsageRecord``."""
    return AvroCodec("metering.v1.UsageRecord")


@cache
def envelope_codec() -> AvroCodec:
    """The codec of ``metering.v1.UsageEnvelope`` (a batch of usage records)."""
    return AvroCodec("metering.v1.UsageEnvelope")


@cache
def window_codec() -> AvroCodec:
    """The codec of ``metering.v1.WindowResult``."""
    return AvroCodec("metering.v1.WindowResult")


@cache
def dead_letter_codec() -> AvroCodec:
    """The codec of ``metering.v1.DeadLetter``."""
    return AvroCodec("metering.v1.DeadLetter")


@cache
def quota_alert_codec() -> AvroCodec:
    """The codec of ``metering.v1.QuotaAlert``."""
    return AvroCodec("metering.v1.QuotaAlert")


@cache
def quota_limit_codec() -> AvroCodec:
    """The codec of ``metering.v1.QuotaLimit`` (the values of ``quota.limits``)."""
    return AvroCodec("metering.v1.QuotaLimit")
