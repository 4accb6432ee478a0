"""Standard Webhooks signing: the spec's published vector, an independent HMAC computation,
tampering, several signatures (key rotation) and the timestamp tolerance."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from sinks.signing import (
    SignatureError,
    decode_secret,
    generate_secret,
    sign,
    signature_headers,
    verify,
)

# The test vector published with the Standard Webhooks specification (and svix's libraries).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _headers(sig: str, msg_id: str = SPEC_ID, ts: int = SPEC_TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def _independent(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_sign_matches_the_spec_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    verify(SPEC_SECRET, _headers(SPEC_SIGNATURE), SPEC_BODY, now=SPEC_TS)
    # the spec's libraries also take the secret without its prefix
    assert sign(SPEC_SECRET.removeprefix("whsec_"), SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_sign_matches_an_independent_hmac_for_generated_secrets() -> None:
    body = '{"tenant_id":"acme","score":"12.500000000","ü":"utf-8 bytes"}'.encode()
    for i in range(20):
        secret = generate_secret()
        assert secret.startswith("whsec_") and len(decode_secret(secret)) == 32
        assert sign(secret, f"msg_{i}", 1_700_000_000 + i, body) == _independent(
            secret, f"msg_{i}", 1_700_000_000 + i, body
        )
    assert len({generate_secret() for _ in range(50)}) == 50


def test_tampering_with_body_id_timestamp_or_secret_is_detected() -> None:
    now = SPEC_TS
    cases = [
        (SPEC_SECRET, _headers(SPEC_SIGNATURE), b'{"test": 2432232315}'),  # body
        (SPEC_SECRET, _headers(SPEC_SIGNATURE, msg_id="msg_other"), SPEC_BODY),  # id
        (SPEC_SECRET, _headers(SPEC_SIGNATURE, ts=SPEC_TS + 1), SPEC_BODY),  # timestamp
        (generate_secret(), _headers(SPEC_SIGNATURE), SPEC_BODY),  # someone else's secret
        (SPEC_SECRET, _headers("v1," + SPEC_SIGNATURE[3:-2] + "A="), SPEC_BODY),  # signature bits
        (SPEC_SECRET, _headers("v2," + SPEC_SIGNATURE[3:]), SPEC_BODY),  # unknown version only
        (SPEC_SECRET, _headers(SPEC_SIGNATURE[3:]), SPEC_BODY),  # no version
    ]
    for secret, headers, body in cases:
        with pytest.raises(SignatureError, match="no v1 signature"):
            verify(secret, headers, body, now=now)


def test_missing_or_malformed_headers_are_refused() -> None:
    full = _headers(SPEC_SIGNATURE)
    for name in full:
        partial = {k: v for k, v in full.items() if k != name}
        with pytest.raises(SignatureError, match=f"missing {name}"):
            verify(SPEC_SECRET, partial, SPEC_BODY, now=SPEC_TS)
    with pytest.raises(SignatureError, match="missing webhook-signature"):
        verify(SPEC_SECRET, {**full, "webhook-signature": "  "}, SPEC_BODY, now=SPEC_TS)
    with pytest.raises(SignatureError, match="not integer seconds"):
        verify(SPEC_SECRET, {**full, "webhook-timestamp": "1614265330.5"}, SPEC_BODY, now=SPEC_TS)
    # header names are case-insensitive even in a plain dict
    verify(SPEC_SECRET, {k.title(): v for k, v in full.items()}, SPEC_BODY, now=SPEC_TS)


def test_any_one_of_several_signatures_may_match() -> None:
    rotated = generate_secret()
    new_sig = sign(rotated, SPEC_ID, SPEC_TS, SPEC_BODY)
    header = f"v1a,bm90LWEta2V5 {new_sig} v1,Zm9yZ2VkLXNpZ25hdHVyZQ== {SPEC_SIGNATURE}"
    verify(SPEC_SECRET, _headers(header), SPEC_BODY, now=SPEC_TS)  # matches the last entry
    verify(rotated, _headers(header), SPEC_BODY, now=SPEC_TS)  # matches the second entry
    with pytest.raises(SignatureError):
        verify(generate_secret(), _headers(header), SPEC_BODY, now=SPEC_TS)


def test_timestamp_tolerance_both_ways() -> None:
    headers = _headers(SPEC_SIGNATURE)
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 300)
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS - 300)
    with pytest.raises(SignatureError, match="old"):
        verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 301)
    with pytest.raises(SignatureError, match="future"):
        verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS - 301)
    verify(SPEC_SECRET, headers, SPEC_BODY, tolerance_seconds=10_000, now=SPEC_TS + 5_000)
    with pytest.raises(SignatureError, match="old"):
        verify(SPEC_SECRET, headers, SPEC_BODY, tolerance_seconds=5, now=SPEC_TS + 6)


def test_signature_headers_sign_at_send_time() -> None:
    secret = generate_secret()
    h = signature_headers(secret, "msg_x", b"{}")
    verify(secret, h, b"{}")  # now = the real clock
    assert signature_headers(None, "msg_x", b"{}", timestamp=5) == {
        "webhook-id": "msg_x",
        "webhook-timestamp": "5",
    }


def test_bad_secrets_are_refused() -> None:
    for bad in ("whsec_", "whsec_not base64!", "whsec_@@@@"):
        with pytest.raises(ValueError):
            sign(bad, SPEC_ID, SPEC_TS, SPEC_BODY)
