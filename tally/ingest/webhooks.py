"""Webhook intake: per-source scheme and secrets from a YAML file; verified, replay-checked, then published.

The file maps a source name (the last part of /v1/webhooks/{source}) to its scheme, tenant and secrets:

    sources:
      stripe:   {scheme: stripe, tenant: acme, secrets_env: STRIPE_WEBHOOK_SECRETS}
      billing:  {scheme: standard, tenant: acme, secrets: ["whsec_..."]}
      github:   {scheme: hmac, tenant: acme, secrets: ["..."]}
      payments: {scheme: mercadopago, tenant: acme, secrets_env: MP_SECRETS, type: payment.notification}

The tenant comes from this file, never from the request. Only what the signature covers names the
event: its id is the signed message id (webhook-id; MercadoPago's data.id and x-request-id), else
the `id` of a signed body, else the hash of the signed content; its type is the `type` of a signed
body, else the source's configured `type`, and never the log type (the events route's rule: a signed
body of that type gets 400, a source configured with it stops the gateway). Unsigned headers
(GitHub's X-GitHub-Delivery and X-GitHub-Event) never name an event, so a captured delivery replayed
later is the same event again and the processors drop it (ADR 5).
A replay (the same signed message again within the tolerance window) is answered 200 with the id it
was accepted under, or 409 while the first is still being published; the memory of it is dropped
again if publishing fails, so the provider's retry of that same message is not mistaken for one.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from standardwebhooks.webhooks import Webhook

from tally.edge import values
from tally.ingest.events import is_json, reserved_type
from tally.edge.problems import Problem
from tally.ingest.signatures import (
    SCHEMES,
    HmacFormat,
    Signed,
    verify_hmac,
    verify_mercadopago,
    verify_standard,
    verify_stripe,
)
from tally.schemas.envelope import MAX_BYTES, MAX_CONTENT_TYPE, CloudEvent

SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class WebhookConfigError(ValueError):
    """The webhook sources file is wrong; the gateway refuses to start rather than accept unsigned calls."""


@dataclass(frozen=True)
class Source:
    name: str
    scheme: str
    tenant: str
    secrets: list[str]
    tolerance_s: float = 300.0
    hmac: HmacFormat = field(default_factory=HmacFormat)
    event_type: str = "webhook"

    def verify(self, body: bytes, headers: Any, query: Any) -> Signed:
        if self.scheme == "stripe":
            return verify_stripe(body, headers, self.secrets, self.tolerance_s)
        if self.scheme == "standard":
            return verify_standard(body, headers, self.secrets, self.tolerance_s)
        if self.scheme == "mercadopago":
            return verify_mercadopago(headers, query, self.secrets, self.tolerance_s)
        return verify_hmac(body, headers, self.secrets, self.tolerance_s, self.hmac)

    @property
    def replay_window_s(self) -> int:
        """A timestamp may be up to the tolerance in the past or future, so remember twice that."""
        return int(self.tolerance_s * 2) + 1


def _secrets(name: str, spec: dict[str, Any]) -> list[str]:
    secrets = [str(s) for s in spec.get("secrets", [])]
    if spec.get("secrets_env"):
        secrets += [s.strip() for s in os.environ.get(str(spec["secrets_env"]), "").split(",") if s.strip()]
    if not secrets:
        raise WebhookConfigError(f"webhook source {name!r} has no secret (secrets or secrets_env)")
    if spec.get("scheme") == "standard":
        for secret in secrets:
            try:
                Webhook(secret)
            except Exception as exc:  # any failure means the secret is unusable
                raise WebhookConfigError(f"webhook source {name!r}: invalid Standard Webhooks secret") from exc
    return secrets


def load_sources(path: str | Path) -> dict[str, Source]:
    """Read and check the sources file; an empty path means no webhook sources."""
    if not path:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    sources: dict[str, Source] = {}
    for name, spec in (raw.get("sources") or {}).items():
        if not SOURCE_NAME.match(str(name)):
            raise WebhookConfigError(f"webhook source name {name!r} must match {SOURCE_NAME.pattern}")
        if spec.get("scheme") not in SCHEMES:
            raise WebhookConfigError(f"webhook source {name!r}: scheme must be one of {', '.join(SCHEMES)}")
        if not spec.get("tenant"):
            raise WebhookConfigError(f"webhook source {name!r} has no tenant")
        if len(str(spec["tenant"]).encode()) > MAX_BYTES["tenant"]:
            raise WebhookConfigError(f"webhook source {name!r}: tenant is longer than {MAX_BYTES['tenant']} bytes")
        unsigned = [option for option in ("id_header", "type_header") if spec.get(option)]
        if unsigned:
            raise WebhookConfigError(f"webhook source {name!r}: {', '.join(unsigned)} named an unsigned header, "
                                     "which anyone can change; ids and types now come from what is signed "
                                     "(set `type` for a fixed type)")
        defaults = HmacFormat()
        fmt = HmacFormat(
            header=str(spec.get("header", defaults.header)).lower(),
            prefix=str(spec.get("prefix", defaults.prefix)),
            encoding=str(spec.get("encoding", defaults.encoding)),
            timestamp_header=str(spec["timestamp_header"]).lower() if spec.get("timestamp_header") else None,
            signed=str(spec.get("signed", defaults.signed)),
        )
        if fmt.encoding not in ("hex", "base64") or "{body}" not in fmt.signed:
            raise WebhookConfigError(f"webhook source {name!r}: encoding is hex or base64, signed must hold {{body}}")
        if fmt.timestamp_header and "{timestamp}" not in fmt.signed:
            raise WebhookConfigError(f"webhook source {name!r}: timestamp_header is set but signed does not hold "
                                     "{timestamp}, so the timestamp would not be signed")
        event_type = str(spec.get("type", "webhook"))
        if not 0 < len(event_type.encode()) <= MAX_BYTES["type"]:
            raise WebhookConfigError(f"webhook source {name!r}: type must be 1 to {MAX_BYTES['type']} bytes")
        if (reserved := reserved_type(event_type)) is not None:
            raise WebhookConfigError(f"webhook source {name!r}: {reserved}; set `type` to another name")
        sources[str(name)] = Source(
            name=str(name), scheme=spec["scheme"], tenant=str(spec["tenant"]), secrets=_secrets(str(name), spec),
            tolerance_s=float(spec.get("tolerance_s", 300)), hmac=fmt, event_type=event_type,
        )
    return sources


def replay_key(source: Source, signed: Signed) -> str:
    """The identity of one signed message: the source and everything its signature covers."""
    return hashlib.sha256(f"{source.name}\0{signed.digest}".encode()).hexdigest()


def _payload(source: Source, media: str, body: bytes) -> Any:
    if is_json(media) or source.scheme in ("stripe", "standard"):
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise Problem(400, "Malformed JSON", "the webhook payload is not valid JSON",
                          errors=[{"field": "(body)", "message": "invalid JSON"}]) from None
        values.check_integers(body)
        values.check(payload, values.Hazards.of(body), "data")
        return payload
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(400, "Invalid webhook", "the webhook payload is not UTF-8",
                      errors=[{"field": "(body)", "message": "not UTF-8"}]) from None
    if "\x00" in text:
        raise values.invalid("data", "holds a NUL character")
    return text


def to_event(source: Source, signed: Signed, media: str, body: bytes, received_at: datetime) -> CloudEvent:
    """The webhook as a CloudEvent: id and type from what is signed, the payload as data."""
    payload = _payload(source, media, body)
    fields = payload if signed.body_signed and isinstance(payload, dict) else {}
    body_id, body_type = fields.get("id"), fields.get("type")
    event_id = (signed.message_id or (body_id if isinstance(body_id, str) and body_id else None)
                or signed.digest)
    event_type = body_type if isinstance(body_type, str) and body_type else source.event_type
    errors = [{"field": name, "message": f"longer than {MAX_BYTES[name]} bytes in UTF-8"}
              for name, value in (("id", event_id), ("type", event_type)) if len(value.encode()) > MAX_BYTES[name]]
    if len(media) > MAX_CONTENT_TYPE:
        errors.append({"field": "datacontenttype", "message": f"longer than {MAX_CONTENT_TYPE} characters"})
    if "\x00" in event_id or "\x00" in event_type:
        errors.append({"field": "id" if "\x00" in event_id else "type", "message": "holds a NUL character"})
    if (reserved := reserved_type(event_type)) is not None:
        errors.append({"field": "type", "message": reserved})
    if errors:
        raise Problem(400, "Invalid webhook", "the provider's event cannot be stored as sent", errors=errors)
    return CloudEvent.model_construct(
        specversion="1.0", id=event_id, source=f"webhooks/{source.name}", type=event_type, time=received_at,
        subject=None, datacontenttype=media or None, dataschema=None, data=payload,
    )
