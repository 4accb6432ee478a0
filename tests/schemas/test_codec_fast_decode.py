"""The fast decode path of AvroCodec (decimals converted by the codec, not by fastavro's logical types).

Every decoded value must be exactly what fastavro's own logical-type decode yields: same types, same
keys in the same order, and decimals equal in value, ``str`` and ``as_tuple()`` (exponent -9).
"""

from __future__ import annotations

import io
import struct
from decimal import Context, Decimal
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    AvroCodec,
    CodecError,
    dead_letter_codec,
    envelope_codec,
    quota_alert_codec,
    quota_limit_codec,
    record_codec,
    webhook_delivery_codec,
    window_codec,
)

_MAX_UNSCALED = 10**38 - 1
_CONTEXT = Context(prec=38)


def assert_same(got: Any, want: Any, path: str = "$") -> None:
    """Structural identity, stricter than ==: types, key order, and the decimals' digits and exponent."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} is not {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} are not {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} items, not {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, Decimal):
        assert got == want, f"{path}: {got!r} != {want!r}"
        assert str(got) == str(want), f"{path}: {got} is not written {want}"
        assert got.as_tuple() == want.as_tuple(), f"{path}: {got.as_tuple()} != {want.as_tuple()}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def reference_decode(codec: AvroCodec, data: bytes) -> Any:
    """What the codec returned before the fast path: fastavro with the decimal logical type."""
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), codec.schema, None)


def _without_decimal_logical_type(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_decimal_logical_type(v) for k, v in schema.items()
                if not k.startswith("__") and not (k == "logicalType" and v == "decimal")}
    if isinstance(schema, list):
        return [_without_decimal_logical_type(v) for v in schema]
    return schema


def raw_envelope_bytes(envelope: dict[str, Any]) -> bytes:
    """Single-object message of an envelope whose ``value`` fields are given as raw two's complement."""
    codec = envelope_codec()
    plain = fastavro.parse_schema(_without_decimal_logical_type(codec.schema), named_schemas={})
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + struct.pack("<Q", codec.fingerprint))
    fastavro.schemaless_writer(buf, plain, envelope)
    return buf.getvalue()


# decimal(38, 9): every unscaled value of at most 38 digits, with the edges drawn often
unscaled = st.one_of(
    st.integers(min_value=-_MAX_UNSCALED, max_value=_MAX_UNSCALED),
    st.sampled_from([0, 1, -1, _MAX_UNSCALED, -_MAX_UNSCALED, 10**9, -(10**9), 10**37, -(10**37)]),
    st.integers(min_value=-(10**12), max_value=10**12),
)
decimals = st.one_of(
    unscaled.map(lambda n: Decimal(n).scaleb(-9, _CONTEXT)),
    # fewer fractional digits than the scale: the writer rescales them
    st.decimals(min_value=-(10**20), max_value=10**20, places=3, allow_nan=False, allow_infinity=False),
)
text = st.text(max_size=12)
metadata = st.dictionaries(text, text, max_size=4)


def usage_records(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "event_id": text, "tenant_id": text, "source": text, "resource_id": text, "metric": text,
        "value": values,
        "event_time_ms": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "metadata": metadata,
    })


def envelopes(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "envelope_id": text, "source": text, "producer": text,
        "sent_at_ms": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "watermark_ms": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "records": st.lists(usage_records(values), max_size=25),
    })


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(envelopes(decimals))
def test_envelope_decode_equals_fastavro_logical_decode(envelope: dict[str, Any]) -> None:
    codec = envelope_codec()
    data = codec.encode(envelope)
    got = codec.decode(data)
    assert_same(got, reference_decode(codec, data))
    # and the round trip is exact
    assert got == envelope


@_SETTINGS
@given(envelopes(st.binary(max_size=24)))
def test_any_decimal_bytes_decode_as_fastavro_does(envelope: dict[str, Any]) -> None:
    # empty, or wider than 38 digits (rounded by fastavro's context): still identical
    data = raw_envelope_bytes(envelope)
    codec = envelope_codec()
    assert_same(codec.decode(data), reference_decode(codec, data))


def test_zero_and_extremes_keep_the_exponent() -> None:
    codec = envelope_codec()
    values = [Decimal(0), Decimal("0E-9"), Decimal(_MAX_UNSCALED).scaleb(-9, _CONTEXT),
              Decimal(-_MAX_UNSCALED).scaleb(-9, _CONTEXT), Decimal("-0.000000001"), Decimal("7")]
    envelope = {"envelope_id": "e", "source": "s", "producer": "p", "sent_at_ms": 1, "watermark_ms": None,
                "records": [{"event_id": str(i), "tenant_id": "t", "source": "vm", "resource_id": "r",
                             "metric": "m", "value": v, "event_time_ms": 0, "metadata": {}}
                            for i, v in enumerate(values)]}
    data = codec.encode(envelope)
    got = codec.decode(data)
    assert_same(got, reference_decode(codec, data))
    assert [r["value"].as_tuple().exponent for r in got["records"]] == [-9] * len(values)
    assert str(got["records"][0]["value"]) == "0E-9"


def test_confluent_reader_of_the_same_schema_takes_the_fast_path_with_equal_values() -> None:
    writer = AvroCodec("metering.v1.UsageEnvelope", registry_id=3)
    reader = AvroCodec("metering.v1.UsageEnvelope", resolve_id=lambda i: envelope_codec().schema)
    envelope = {"envelope_id": "e", "source": "s", "producer": "p", "sent_at_ms": 1, "watermark_ms": 5,
                "records": [{"event_id": "1", "tenant_id": "t", "source": "vm", "resource_id": "r",
                             "metric": "m", "value": Decimal("-12.5"), "event_time_ms": 0,
                             "metadata": {"a": "b"}}]}
    data = writer.encode(envelope)
    got = reader.decode(data)
    assert reader._writers_by_id[3] is reader.schema
    assert_same(got, fastavro.schemaless_reader(io.BytesIO(data[5:]), envelope_codec().schema, None))


def test_other_writer_schemas_are_resolved() -> None:
    # an older producer without metadata: resolution fills the reader's default
    old = {"type": "record", "name": "UsageRecord", "namespace": "metering.v1", "fields": [
        {"name": "event_id", "type": "string"}, {"name": "tenant_id", "type": "string"},
        {"name": "source", "type": "string"}, {"name": "resource_id", "type": "string"},
        {"name": "metric", "type": "string"},
        {"name": "value", "type": {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 9}},
        {"name": "event_time_ms", "type": "long"}]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old, named_schemas={}), {
        "event_id": "e", "tenant_id": "t", "source": "vm", "resource_id": "r", "metric": "m",
        "value": Decimal("1.5"), "event_time_ms": 9})
    reader = AvroCodec("metering.v1.UsageRecord", resolve_id=lambda i: old)
    got = reader.decode(b"\x00" + struct.pack(">I", 41) + buf.getvalue())
    assert got["metadata"] == {}
    assert str(got["value"]) == "1.500000000"


@pytest.mark.parametrize("cut", [11, 20, -3, -1])
def test_truncated_envelope_is_a_codec_error(cut: int) -> None:
    codec = envelope_codec()
    envelope = {"envelope_id": "e", "source": "s", "producer": "p", "sent_at_ms": 1, "watermark_ms": None,
                "records": [{"event_id": "1", "tenant_id": "t", "source": "vm", "resource_id": "r",
                             "metric": "m", "value": Decimal("3"), "event_time_ms": 0, "metadata": {}}]}
    data = codec.encode(envelope)
    with pytest.raises(CodecError, match="corrupt body"):
        codec.decode(data[:cut])


# ---- the other codecs still round-trip, identically to fastavro's logical decode ----

def _round_trip(codec: AvroCodec, value: dict[str, Any]) -> None:
    data = codec.encode(value)
    got = codec.decode(data)
    assert_same(got, reference_decode(codec, data))
    assert got == value


@_SETTINGS
@given(st.fixed_dictionaries({
    "window_id": text, "tenant_id": text,
    "window_start_ms": st.integers(min_value=0, max_value=2**62),
    "window_end_ms": st.integers(min_value=0, max_value=2**62),
    "totals": st.lists(st.fixed_dictionaries({
        "metric": text, "aggregation": text, "value": decimals,
        "samples": st.integers(min_value=0, max_value=2**40)}), max_size=6),
    "sample_count": st.integers(min_value=0, max_value=2**40),
    "score": decimals,
    "late_samples": st.integers(min_value=0, max_value=2**40),
    "has_gap": st.booleans(),
}))
def test_window_round_trip(window: dict[str, Any]) -> None:
    _round_trip(window_codec(), window)


@_SETTINGS
@given(st.fixed_dictionaries({
    "source_topic": text, "source_partition": st.integers(min_value=0, max_value=2**31 - 1),
    "source_offset": st.integers(min_value=0, max_value=2**62), "stage": text, "reason": text,
    "key": st.none() | st.binary(max_size=16), "payload": st.binary(max_size=64),
    "failed_at_ms": st.integers(min_value=0, max_value=2**62),
}))
def test_dead_letter_round_trip(dead: dict[str, Any]) -> None:
    _round_trip(dead_letter_codec(), dead)


@_SETTINGS
@given(st.fixed_dictionaries({
    "alert_id": text, "tenant_id": text, "metric": text, "period": st.sampled_from(["day", "month"]),
    "period_start_ms": st.integers(min_value=0, max_value=2**62),
    "threshold_percent": st.integers(min_value=0, max_value=1000),
    "limit": decimals, "used": decimals,
    "crossed_at_window_end_ms": st.integers(min_value=0, max_value=2**62),
}))
def test_quota_alert_round_trip(alert: dict[str, Any]) -> None:
    _round_trip(quota_alert_codec(), alert)


@_SETTINGS
@given(st.fixed_dictionaries({
    "tenant_id": text, "metric": text, "period": st.sampled_from(["day", "month"]),
    "limit": st.none() | decimals,
    "thresholds_percent": st.none() | st.lists(st.integers(min_value=0, max_value=1000), max_size=4),
    "set_at_ms": st.integers(min_value=0, max_value=2**62),
}))
def test_quota_limit_round_trip(limit: dict[str, Any]) -> None:
    _round_trip(quota_limit_codec(), limit)


@_SETTINGS
@given(st.fixed_dictionaries({
    "webhook_id": text, "window_id": text, "alert_id": text, "tenant_id": text,
    "status": st.sampled_from(["delivered", "duplicate", "dead_lettered"]),
    "attempts": st.integers(min_value=0, max_value=2**31 - 1),
    "last_status": st.one_of(st.just(0), st.integers(min_value=100, max_value=599)),
    "delivered_at_ms": st.integers(min_value=0, max_value=2**62),
    "source_topic": text, "source_partition": st.integers(min_value=0, max_value=2**31 - 1),
    "source_offset": st.integers(min_value=0, max_value=2**62),
    "payload_format": st.sampled_from(["usage.window", "report", "quota.alert"]),
    "last_error": text, "reason": text,
}))
def test_webhook_delivery_round_trip(delivery: dict[str, Any]) -> None:
    _round_trip(webhook_delivery_codec(), delivery)


def test_webhook_delivery_is_single_object_encoded_under_its_own_fingerprint() -> None:
    codec = webhook_delivery_codec()
    delivery = {"webhook_id": "msg_0123456789abcdef01234567", "window_id": "acme|0|60000",
                "alert_id": "", "tenant_id": "acme", "status": "delivered", "attempts": 3,
                "last_status": 200, "delivered_at_ms": 1_706_742_000_000,
                "source_topic": "usage.windows", "source_partition": 1, "source_offset": 42,
                "payload_format": "usage.window"}
    data = codec.encode(delivery)
    assert data[:2] == b"\xc3\x01" and data[2:10] == struct.pack("<Q", codec.fingerprint)
    # last_error and reason (what a dead_lettered record fills in) default to empty
    assert codec.decode(data) == {**delivery, "last_error": "", "reason": ""}
    dead = {**delivery, "status": "dead_lettered", "attempts": 0, "last_status": 0,
            "last_error": "cannot build the report payload: too big",
            "reason": "webhook delivery not attempted: cannot build the report payload: too big"}
    assert codec.decode(codec.encode(dead)) == dead
    assert codec.fingerprint not in {c.fingerprint for c in (window_codec(), dead_letter_codec(),
                                                             quota_alert_codec())}
    with pytest.raises(CodecError):  # a window is not a delivery record
        codec.decode(window_codec().encode({
            "window_id": "w", "tenant_id": "t", "window_start_ms": 0, "window_end_ms": 1,
            "totals": [], "sample_count": 0, "score": Decimal(0), "late_samples": 0,
            "has_gap": False}))


@_SETTINGS
@given(usage_records(decimals))
def test_usage_record_round_trip(record: dict[str, Any]) -> None:
    _round_trip(record_codec(), record)


# ---- decimals in places our schemas do not use yet: the fast reader stays exact there too ----

_DEC = {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 9}
_DEC4 = {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 4}
_SHAPES = fastavro.parse_schema({
    "type": "record", "name": "Shapes", "namespace": "test", "fields": [
        {"name": "list", "type": {"type": "array", "items": _DEC}},
        {"name": "by_key", "type": {"type": "map", "values": _DEC4}},
        {"name": "maybe", "type": ["null", {"type": "record", "name": "Inner", "fields": [
            {"name": "a", "type": _DEC}, {"name": "b", "type": "string"}]}]},
        {"name": "pairs", "type": {"type": "array", "items": {"type": "record", "name": "Pair", "fields": [
            {"name": "x", "type": _DEC}, {"name": "y", "type": _DEC4},
            {"name": "z", "type": ["null", _DEC]}]}}},
        # bytes and decimal in one union cannot be told apart once read: fastavro keeps converting it
        {"name": "either", "type": ["null", "bytes", _DEC]},
    ]}, named_schemas={}, expand=True)

decimals4 = st.integers(min_value=-(10**10 - 1), max_value=10**10 - 1).map(
    lambda n: Decimal(n).scaleb(-4, Context(prec=10)))


@_SETTINGS
@given(st.fixed_dictionaries({
    "list": st.lists(decimals, max_size=4),
    "by_key": st.dictionaries(text, decimals4, max_size=3),
    "maybe": st.none() | st.fixed_dictionaries({"a": decimals, "b": text}),
    "pairs": st.lists(st.fixed_dictionaries({"x": decimals, "y": decimals4, "z": st.none() | decimals}),
                      max_size=4),
    "either": st.none() | st.binary(max_size=4) | decimals,
}))
def test_fast_reader_of_other_shapes_equals_fastavro(value: dict[str, Any]) -> None:
    from schemas.codec import _fast_reader

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _SHAPES, value)
    plain, fix = _fast_reader(_SHAPES)
    assert fix is not None and plain is not _SHAPES
    got = fix(fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), plain, None))
    assert_same(got, fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), _SHAPES, None))


def test_recursive_schemas_keep_the_generic_reader() -> None:
    from schemas.codec import _fast_reader

    tree = fastavro.parse_schema({"type": "record", "name": "Node", "fields": [
        {"name": "v", "type": _DEC}, {"name": "kids", "type": {"type": "array", "items": "Node"}}]},
        named_schemas={}, expand=True)
    plain, fix = _fast_reader(tree)
    assert fix is None and plain is tree
    assert _fast_reader(dead_letter_codec().schema) == (dead_letter_codec().schema, None)
