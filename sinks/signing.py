"""Standard Webhooks signatures (https://www.standardwebhooks.com).

A delivery carries three headers:

* ``webhook-id``: the message identity, the same on every retry (receivers dedupe on it);
* ``webhook-timestamp``: integer Unix seconds when this attempt was sent;
* ``webhook-signature``: space-separated ``<version>,<base64 signature>`` entries. Version
  ``v1`` is HMAC-SHA256 over ``f"{webhook_id}.{webhook_timestamp}."`` + the raw body, keyed
  with the base64-decoded part of the secret after ``whsec_``.

Several ``v1`` entries may appear while a secret is being rotated; one match is enough.
Entries of other versions (``v1a`` asymmetric keys ...) are ignored, not rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

__all__ = [
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SECRET_PREFIX",
    "SignatureError",
    "decode_secret",
    "generate_secret",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
#: the spec recommends a secret of 24 to 64 random bytes
_SECRET_BYTES = 32


class SignatureError(ValueError):
    """A delivery whose Standard Webhooks headers do not prove it came from the secret's holder."""


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix may be left off, as the spec's
    libraries allow); raises ValueError for a secret that is not base64 or is empty."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not base64 after 'whsec_'") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def generate_secret() -> str:
    """A new random secret in the spec's format: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value ``v1,<base64 HMAC-SHA256>`` of one delivery attempt."""
    return "v1," + _signature(decode_secret(secret), msg_id, int(timestamp), body)


def signature_headers(
    secret: str | None, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed when a secret is given.

    ``timestamp`` defaults to now: every retry is signed again with its own send time.
    """
    ts = int(time.time()) if timestamp is None else int(timestamp)
    headers = {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(ts)}
    if secret:
        headers[HEADER_SIGNATURE] = sign(secret, msg_id, ts, body)
    return headers


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # plain dicts are case-sensitive; HTTP header names are not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if value is None or not value.strip():
        raise SignatureError(f"missing {name} header")
    return value.strip()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: int = 300,
    now: float | None = None,
) -> None:
    """Check a delivery's Standard Webhooks headers against ``secret``; return None or raise.

    Raises :class:`SignatureError` when a header is missing or malformed, when the timestamp
    is more than ``tolerance_seconds`` away from ``now`` (either way: replays and clocks far
    in the future are both refused), or when no ``v1`` signature matches. Comparison is in
    constant time (``hmac.compare_digest``).
    """
    msg_id = _header(headers, HEADER_ID)
    raw_ts = _header(headers, HEADER_TIMESTAMP)
    raw_sigs = _header(headers, HEADER_SIGNATURE)
    try:
        timestamp = int(raw_ts)
    except ValueError as exc:
        raise SignatureError(f"{HEADER_TIMESTAMP} {raw_ts!r} is not integer seconds") from exc
    current = time.time() if now is None else now
    if timestamp < current - tolerance_seconds:
        raise SignatureError(
            f"{HEADER_TIMESTAMP} {timestamp} is {current - timestamp:.0f}s old "
            f"(tolerance {tolerance_seconds}s)"
        )
    if timestamp > current + tolerance_seconds:
        raise SignatureError(
            f"{HEADER_TIMESTAMP} {timestamp} is {timestamp - current:.0f}s in the future "
            f"(tolerance {tolerance_seconds}s)"
        )
    expected = _signature(decode_secret(secret), msg_id, timestamp, body).encode("ascii")
    matched = False
    for entry in raw_sigs.split():
        version, sep, candidate = entry.partition(",")
        if not sep or version != "v1":
            continue
        # no early exit: every entry is compared, so timing does not reveal which one matched
        matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    if not matched:
        raise SignatureError("no v1 signature in webhook-signature matches the body and secret")
