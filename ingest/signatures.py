"""Webhook signature schemes: Stripe, Standard Webhooks and plain HMAC-SHA256 headers.

Stripe and Standard Webhooks are checked by their own libraries (the `stripe` and `standardwebhooks`
packages), which compare in constant time. We check the timestamp ourselves first, in both
directions (the stripe package only refuses old ones), so a stale signature is named as such.
Plain HMAC (GitHub's X-Hub-Signature-256, Slack-style signed timestamps) is a few lines of `hmac`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

import stripe
from standardwebhooks.webhooks import Webhook

SCHEMES = ("stripe", "standard", "hmac")


class SignatureError(Exception):
    """The request is not signed by the source: reason is missing, invalid or stale."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signed:
    """What the signature vouches for: the provider's message id (if any) and the signed timestamp."""

    message_id: str | None
    timestamp: str


@dataclass(frozen=True)
class HmacFormat:
    header: str = "x-hub-signature-256"
    prefix: str = "sha256="
    encoding: str = "hex"
    timestamp_header: str | None = None
    signed: str = "{body}"


def _fresh(timestamp: str, tolerance_s: float) -> None:
    try:
        when = float(timestamp)
    except ValueError:
        raise SignatureError("invalid", "the signature timestamp is not a number") from None
    if abs(time.time() - when) > tolerance_s:
        raise SignatureError("stale", f"the signature timestamp is more than {tolerance_s:g} s away from now")


def verify_stripe(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float) -> Signed:
    """`Stripe-Signature: t=...,v1=...[,v1=...]`: HMAC-SHA256 over `t.payload`; any secret may match (rotation)."""
    header = headers.get("stripe-signature")
    if not header:
        raise SignatureError("missing", "the Stripe-Signature header is missing")
    stamps = [part[2:] for part in header.split(",") if part.strip().startswith("t=")]
    if len(stamps) != 1:
        raise SignatureError("invalid", "the Stripe-Signature header has no single t= timestamp")
    _fresh(stamps[0].strip(), tolerance_s)
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("invalid", "the payload is not UTF-8") from None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, int(tolerance_s))
        except stripe.SignatureVerificationError:
            continue
        return Signed(None, stamps[0].strip())
    raise SignatureError("invalid", "no signature in Stripe-Signature matches")


def verify_standard(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float) -> Signed:
    """Standard Webhooks: webhook-id, webhook-timestamp and `v1,<base64>` signatures over `id.timestamp.body`."""
    names = ("webhook-id", "webhook-timestamp", "webhook-signature")
    values = {name: headers.get(name, "") for name in names}
    missing = [name for name in names if not values[name]]
    if missing:
        raise SignatureError("missing", f"missing header(s): {', '.join(missing)}")
    _fresh(values["webhook-timestamp"], tolerance_s)
    for secret in secrets:
        try:
            Webhook(secret).verify(body, values, json_parse=False)
        except Exception:  # noqa: BLE001 - the library raises several types for one meaning: not signed by us
            continue
        return Signed(values["webhook-id"], values["webhook-timestamp"])
    raise SignatureError("invalid", "no signature in webhook-signature matches")


def verify_hmac(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float,
                fmt: HmacFormat) -> Signed:
    """A single HMAC-SHA256 header over the body, or over a template with a signed timestamp."""
    given = headers.get(fmt.header, "")
    if not given:
        raise SignatureError("missing", f"the {fmt.header} header is missing")
    if not given.startswith(fmt.prefix):
        raise SignatureError("invalid", f"the {fmt.header} header does not start with {fmt.prefix!r}")
    timestamp = ""
    if fmt.timestamp_header:
        timestamp = headers.get(fmt.timestamp_header, "")
        if not timestamp:
            raise SignatureError("missing", f"the {fmt.timestamp_header} header is missing")
        _fresh(timestamp, tolerance_s)
    before, _, after = fmt.signed.replace("{timestamp}", timestamp).partition("{body}")
    message = before.encode() + body + after.encode()
    offered = given[len(fmt.prefix):].strip().encode()
    for secret in secrets:
        digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        expected = digest.hex().encode() if fmt.encoding == "hex" else base64.b64encode(digest)
        if hmac.compare_digest(expected, offered):
            return Signed(None, timestamp)
    raise SignatureError("invalid", f"the {fmt.header} signature does not match")
