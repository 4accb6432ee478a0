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
from decimal import Context, Decimal
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

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
    "webhook_delivery_codec",
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
    "metering.v1.WebhookDelivery": "webhook_delivery.avsc",
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


#: Values fastavro reads for a schema without decimal logical types are turned into what it reads with them
#: by one of these (records and maps are fixed in place and returned).
_Fix = Callable[[Any], Any]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})

_from_bytes = int.from_bytes


class _Scale(NamedTuple):
    """How fastavro's ``read_decimal`` turns the unscaled integer of one decimal schema into a Decimal."""

    create: Callable[[int], Decimal]  # Context.create_decimal of `context`
    exponent: int
    context: Context


class _RecordPlan(NamedTuple):
    """The fields of a record to fix: plain decimal fields apart, so loops can convert them inline."""

    decimals: list[tuple[str, _Scale]]
    others: list[tuple[str, _Fix]]


class _NamedReference(Exception):
    """A schema refers to a named type by name; stripping could change what the name resolves to."""


def _scale(precision: int, scale: int) -> _Scale:
    # fastavro's read_decimal sets the precision on a module-wide Context() before every value and
    # returns create_decimal(unscaled).scaleb(-scale); a Context of our own with that precision gives
    # the same digits, exponent and (beyond `precision` digits only) rounding
    context = Context(prec=precision)
    return _Scale(context.create_decimal, -scale, context)


def _decimal_fix(scale: _Scale) -> _Fix:
    create, exponent, context = scale

    def fix(raw: bytes) -> Decimal:
        return create(_from_bytes(raw, "big", signed=True)).scaleb(exponent, context)

    return fix


def _record_fix(plan: _RecordPlan) -> _Fix:
    decimals, others = plan

    def fix(record: dict[str, Any]) -> dict[str, Any]:
        for name, (create, exponent, context) in decimals:
            record[name] = create(_from_bytes(record[name], "big", signed=True)).scaleb(exponent, context)
        for name, fix_field in others:
            record[name] = fix_field(record[name])
        return record

    return fix


def _records_fix(plan: _RecordPlan) -> _Fix:
    """Fix an array of records in place (no second list of hundreds of items per envelope).

    This is the hot loop of envelope decoding, so the common shapes convert inline, without a
    call per record.
    """
    decimals, others = plan
    if len(decimals) == 1 and not others:
        ((name, (create, exponent, context)),) = decimals

        def fix_one_decimal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for record in records:
                record[name] = create(_from_bytes(record[name], "big", signed=True)).scaleb(exponent, context)
            return records

        return fix_one_decimal
    fix_record = _record_fix(plan)

    def fix(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for record in records:
            fix_record(record)
        return records

    return fix


def _array_fix(fix_item: _Fix) -> _Fix:
    def fix(items: list[Any]) -> list[Any]:
        return [fix_item(item) for item in items]

    return fix


def _map_fix(fix_value: _Fix) -> _Fix:
    def fix(values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            values[key] = fix_value(value)  # replacing values while iterating is safe, the size stays
        return values

    return fix


def _nullable_fix(fix_value: _Fix) -> _Fix:
    def fix(value: Any) -> Any:
        return None if value is None else fix_value(value)

    return fix


def _strip_decimals(schema: Any) -> tuple[Any, _Fix | _Scale | _RecordPlan | None]:
    """A copy of an expanded schema without ``bytes`` decimal logical types, and how to fix its values.

    The copy has the same wire format; the fix (a _Scale for a decimal, a _RecordPlan for a record,
    else a _Fix; None: nothing to fix) turns what fastavro reads with the copy into exactly what it
    reads with ``schema``. Decimals whose values could not be told apart after reading (say in a
    union with other bytes branches) keep their logical type, so fastavro still converts those.
    """
    if isinstance(schema, str):
        if schema not in _PRIMITIVES:
            raise _NamedReference(schema)
        return schema, None
    if isinstance(schema, list):
        branches = [_strip_decimals(branch) for branch in schema]
        fixes = [(i, fix) for i, (_, fix) in enumerate(branches) if fix is not None]
        # only ["null", X]-like unions: a None is the null branch, anything else the other one
        if len(fixes) == 1 and all(branch == "null" for i, branch in enumerate(schema) if i != fixes[0][0]):
            return [stripped for stripped, _ in branches], _nullable_fix(_as_fix(fixes[0][1]))
        return schema, None
    kind = schema["type"]
    if kind == "bytes" and schema.get("logicalType") == "decimal":
        precision, scale = schema.get("precision"), schema.get("scale", 0)
        if isinstance(precision, int) and isinstance(scale, int) and 0 <= scale <= precision:
            return {k: v for k, v in schema.items() if k != "logicalType"}, _scale(precision, scale)
        return schema, None
    if kind in ("record", "error"):
        fields: list[Any] = []
        plan = _RecordPlan([], [])
        for field in schema["fields"]:
            stripped, fix = _strip_decimals(field["type"])
            fields.append({**field, "type": stripped})
            if isinstance(fix, _Scale):
                plan.decimals.append((field["name"], fix))
            elif fix is not None:
                plan.others.append((field["name"], _as_fix(fix)))
        if not plan.decimals and not plan.others:
            return schema, None
        return {**schema, "fields": fields}, plan
    if kind == "array":
        items, fix = _strip_decimals(schema["items"])
        if fix is None:
            return schema, None
        array_fix = _records_fix(fix) if isinstance(fix, _RecordPlan) else _array_fix(_as_fix(fix))
        return {**schema, "items": items}, array_fix
    if kind == "map":
        values, fix = _strip_decimals(schema["values"])
        if fix is None:
            return schema, None
        return {**schema, "values": values}, _map_fix(_as_fix(fix))
    return schema, None


def _as_fix(fix: _Fix | _Scale | _RecordPlan) -> _Fix:
    if isinstance(fix, _Scale):
        return _decimal_fix(fix)
    if isinstance(fix, _RecordPlan):
        return _record_fix(fix)
    return fix


def _fast_reader(schema: Any) -> tuple[Any, _Fix | None]:
    """The schema the fast path reads with (parsed) and the fix of its values; see _strip_decimals."""
    try:
        # fastavro's bookkeeping keys would carry the original (logical) named types along
        raw = {k: v for k, v in schema.items() if not k.startswith("__")}
        stripped, plan = _strip_decimals(raw)
    except _NamedReference:
        # only recursive types keep references after expansion; not worth a fast path
        return schema, None
    if plan is None:
        return schema, None
    fix = _as_fix(plan)
    plain = fastavro.parse_schema(stripped, named_schemas={}, expand=True)
    # logical types are not part of the canonical form: equal forms mean equal wire formats
    if to_parsing_canonical_form(plain) != to_parsing_canonical_form(schema):
        return schema, None
    return plain, fix


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
        # Messages written with our own schema (nearly all) are read with a copy of it that has no
        # decimal logical types, and the decimals converted afterwards: fastavro's per-value
        # logical-type dispatch costs more than the conversion itself.
        self._plain_schema, self._fix = _fast_reader(self.schema)
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
        # BytesIO shares the bytes it is given; a slice would copy the whole body
        stream = io.BytesIO(data)
        stream.seek(offset)
        try:
            if writer is self.schema:
                # no reader schema: equal schemas need no resolution
                out = fastavro.schemaless_reader(stream, self._plain_schema, None)
                if self._fix is not None and isinstance(out, dict):
                    out = self._fix(out)
            else:
                out = fastavro.schemaless_reader(stream, writer, self.schema)
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
            if writer == self.schema:
                # the same schema under another id: take the fast path, no resolution needed
                writer = self.schema
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


@cache
def webhook_delivery_codec() -> AvroCodec:
    """The codec of ``metering.v1.WebhookDelivery`` (the values of ``webhook.deliveries``)."""
    return AvroCodec("metering.v1.WebhookDelivery")
