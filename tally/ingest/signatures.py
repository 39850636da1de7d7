"""Webhook signature schemes: Stripe, Standard Webhooks, MercadoPago and plain HMAC-SHA256 headers.

Stripe and Standard Webhooks are checked by their own libraries (the `stripe` and `standardwebhooks`
packages), which compare in constant time. We check the timestamp ourselves first, in both
directions (the stripe package only refuses old ones), so a stale signature is named as such.
Plain HMAC (GitHub's X-Hub-Signature-256, Slack-style signed timestamps) and MercadoPago's manifest
are a few lines of `hmac`. Whatever a scheme accepts in several spellings (a timestamp as `0170…`,
`+170…`, `170….5`) is normalised before it names the message, so a respelling is still a replay.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import stripe
from standardwebhooks.webhooks import Webhook

SCHEMES = ("stripe", "standard", "hmac", "mercadopago")
MERCADOPAGO_ALPHANUMERIC = re.compile(r"^[A-Za-z0-9]+$")
MILLISECONDS_FROM = 10**11  # a timestamp above this is in milliseconds (seconds reach it in the year 5138)


class SignatureError(Exception):
    """The request is not signed by the source: reason is missing, invalid or stale."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signed:
    """What the signature vouches for: the provider's message id (if any), the signed timestamp in
    whole seconds ("" when none is signed), whether the body itself is signed, and a digest of all of
    it that names this one message for the replay memory."""

    message_id: str | None
    timestamp: str
    body_signed: bool
    digest: str


def _signed(message_id: str | None, timestamp: str, signed_content: bytes, body_signed: bool = True) -> Signed:
    digest = hashlib.sha256(f"{message_id or ''}\0{timestamp}\0".encode() + signed_content).hexdigest()
    return Signed(message_id, timestamp, body_signed, digest)


@dataclass(frozen=True)
class HmacFormat:
    header: str = "x-hub-signature-256"
    prefix: str = "sha256="
    encoding: str = "hex"
    timestamp_header: str | None = None
    signed: str = "{body}"


def _fresh(timestamp: str, tolerance_s: float) -> str:
    """The timestamp in whole seconds, as the libraries sign it, if it is within the tolerance of now."""
    try:
        when = float(timestamp)
    except ValueError:
        raise SignatureError("invalid", "the signature timestamp is not a number") from None
    if not math.isfinite(when):
        raise SignatureError("invalid", "the signature timestamp is not a number")
    if abs(time.time() - when) > tolerance_s:
        raise SignatureError("stale", f"the signature timestamp is more than {tolerance_s:g} s away from now")
    return str(int(when))


def verify_stripe(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float) -> Signed:
    """`Stripe-Signature: t=...,v1=...[,v1=...]`: HMAC-SHA256 over `t.payload`; any secret may match (rotation)."""
    header = headers.get("stripe-signature")
    if not header:
        raise SignatureError("missing", "the Stripe-Signature header is missing")
    if not header.isascii():
        raise SignatureError("invalid", "the Stripe-Signature header holds non-ASCII characters")
    stamps = [part.strip()[2:] for part in header.split(",") if part.strip().startswith("t=")]
    if len(stamps) != 1:
        raise SignatureError("invalid", "the Stripe-Signature header has no single t= timestamp")
    timestamp = _fresh(stamps[0].strip(), tolerance_s)
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("invalid", "the payload is not UTF-8") from None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, int(tolerance_s))
        except stripe.SignatureVerificationError:
            continue
        return _signed(None, timestamp, body)
    raise SignatureError("invalid", "no signature in Stripe-Signature matches")


def verify_standard(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float) -> Signed:
    """Standard Webhooks: webhook-id, webhook-timestamp and `v1,<base64>` signatures over `id.timestamp.body`."""
    names = ("webhook-id", "webhook-timestamp", "webhook-signature")
    values = {name: headers.get(name, "") for name in names}
    missing = [name for name in names if not values[name]]
    if missing:
        raise SignatureError("missing", f"missing header(s): {', '.join(missing)}")
    timestamp = _fresh(values["webhook-timestamp"], tolerance_s)
    for secret in secrets:
        try:
            Webhook(secret).verify(body, values, json_parse=False)
        except Exception:  # noqa: BLE001 - the library raises several types for one meaning: not signed by us
            continue
        return _signed(values["webhook-id"], timestamp, body)
    raise SignatureError("invalid", "no signature in webhook-signature matches")


def verify_hmac(body: bytes, headers: Mapping[str, str], secrets: list[str], tolerance_s: float,
                fmt: HmacFormat) -> Signed:
    """A single HMAC-SHA256 header over the body, or over a template with a signed timestamp."""
    given = headers.get(fmt.header, "")
    if not given:
        raise SignatureError("missing", f"the {fmt.header} header is missing")
    if not given.startswith(fmt.prefix):
        raise SignatureError("invalid", f"the {fmt.header} header does not start with {fmt.prefix!r}")
    sent, timestamp = "", ""
    if fmt.timestamp_header:
        sent = headers.get(fmt.timestamp_header, "")
        if not sent:
            raise SignatureError("missing", f"the {fmt.timestamp_header} header is missing")
        timestamp = _fresh(sent, tolerance_s)
    before, _, after = fmt.signed.replace("{timestamp}", sent).partition("{body}")
    message = before.encode() + body + after.encode()
    offered = given[len(fmt.prefix):].strip().encode()
    for secret in secrets:
        digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        expected = digest.hex().encode() if fmt.encoding == "hex" else base64.b64encode(digest)
        if hmac.compare_digest(expected, offered):
            return _signed(None, timestamp, body)
    raise SignatureError("invalid", f"the {fmt.header} signature does not match")


def mercadopago_manifest(data_id: str | None, request_id: str | None, ts: str) -> str:
    """MercadoPago's signed template: `id:<data.id>;request-id:<x-request-id>;ts:<ts>;`, a part left out
    when the request lacks it, an alphanumeric data.id lower-cased (as MercadoPago documents)."""
    parts = []
    if data_id:
        parts.append(f"id:{data_id.lower() if MERCADOPAGO_ALPHANUMERIC.match(data_id) else data_id};")
    if request_id:
        parts.append(f"request-id:{request_id};")
    parts.append(f"ts:{ts};")
    return "".join(parts)


def verify_mercadopago(headers: Mapping[str, str], query: Mapping[str, str], secrets: list[str],
                       tolerance_s: float) -> Signed:
    """`x-signature: ts=...,v1=<hex>` over the manifest, not the body: only data.id (from the query
    string), x-request-id and ts are vouched for. ts may come in seconds or milliseconds."""
    header = headers.get("x-signature", "")
    if not header:
        raise SignatureError("missing", "the x-signature header is missing")
    parts = dict(part.strip().partition("=")[::2] for part in header.split(","))
    ts, offered = parts.get("ts", ""), parts.get("v1", "")
    if not ts or not offered:
        raise SignatureError("invalid", "the x-signature header needs ts= and v1=")
    try:
        seconds = float(ts) / 1000 if float(ts) > MILLISECONDS_FROM else float(ts)
    except ValueError:
        raise SignatureError("invalid", "the signature timestamp is not a number") from None
    timestamp = _fresh(str(seconds), tolerance_s)
    data_id, request_id = query.get("data.id"), headers.get("x-request-id")
    manifest = mercadopago_manifest(data_id, request_id, ts).encode()
    for secret in secrets:
        expected = hmac.new(secret.encode(), manifest, hashlib.sha256).hexdigest().encode()
        if hmac.compare_digest(expected, offered.strip().lower().encode()):
            message_id = ".".join(part for part in (data_id, request_id) if part) or None
            return _signed(message_id, timestamp, manifest, body_signed=False)
    raise SignatureError("invalid", "the x-signature signature does not match")
