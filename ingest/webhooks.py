"""Webhook intake: per-source scheme and secrets from a YAML file; verified, replay-checked, then published.

The file maps a source name (the last part of /v1/webhooks/{source}) to its scheme, tenant and secrets:

    sources:
      stripe:   {scheme: stripe, tenant: acme, secrets_env: STRIPE_WEBHOOK_SECRETS}
      billing:  {scheme: standard, tenant: acme, secrets: ["whsec_..."]}
      github:   {scheme: hmac, tenant: acme, secrets: ["..."], id_header: X-GitHub-Delivery,
                 type_header: X-GitHub-Event}

The tenant comes from this file, never from the request. The provider's own event id becomes the
event id (Stripe's body id, webhook-id, or an id header), so a provider's retries deduplicate; a
payload without any id gets the hash of its body.
A replay (the same signed message again within the tolerance window) is refused; the memory of it is
dropped again if publishing fails, so the provider's retry of that same message is not mistaken for one.
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

from ingest.events import is_json
from ingest.problems import Problem
from ingest.signatures import SCHEMES, HmacFormat, Signed, verify_hmac, verify_standard, verify_stripe
from schemas.envelope import MAX_ID, MAX_TYPE, CloudEvent

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
    id_header: str | None = None
    type_header: str | None = None

    def verify(self, body: bytes, headers: Any) -> Signed:
        if self.scheme == "stripe":
            return verify_stripe(body, headers, self.secrets, self.tolerance_s)
        if self.scheme == "standard":
            return verify_standard(body, headers, self.secrets, self.tolerance_s)
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
            except Exception as exc:  # noqa: BLE001 - any failure means the secret is unusable
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
        sources[str(name)] = Source(
            name=str(name), scheme=spec["scheme"], tenant=str(spec["tenant"]), secrets=_secrets(str(name), spec),
            tolerance_s=float(spec.get("tolerance_s", 300)), hmac=fmt,
            id_header=str(spec["id_header"]).lower() if spec.get("id_header") else None,
            type_header=str(spec["type_header"]).lower() if spec.get("type_header") else None,
        )
    return sources


def replay_key(source: Source, signed: Signed, body: bytes) -> str:
    """The identity of one signed message: the same bytes under the same signed timestamp and id."""
    digest = hashlib.sha256(f"{source.name}\0{signed.message_id or ''}\0{signed.timestamp}\0".encode())
    digest.update(body)
    return digest.hexdigest()


def to_event(source: Source, signed: Signed, headers: Any, media: str, body: bytes, received_at: datetime) -> CloudEvent:
    """The webhook as a CloudEvent: the provider's id and type, the payload as data."""
    payload: Any = None
    if is_json(media) or source.scheme in ("stripe", "standard"):
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise Problem(400, "Malformed JSON", "the webhook payload is not valid JSON",
                          errors=[{"field": "(body)", "message": "invalid JSON"}]) from None
    else:
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Problem(400, "Invalid webhook", "the webhook payload is not UTF-8",
                          errors=[{"field": "(body)", "message": "not UTF-8"}]) from None
    fields = payload if isinstance(payload, dict) else {}
    event_id = (signed.message_id or (headers.get(source.id_header) if source.id_header else None)
                or (fields.get("id") if isinstance(fields.get("id"), str) else None)
                or hashlib.sha256(body).hexdigest())
    kind = (headers.get(source.type_header) if source.type_header else None) or fields.get("type")
    event_type = kind if isinstance(kind, str) and kind else "webhook"
    if len(event_id) > MAX_ID or len(event_type) > MAX_TYPE:
        raise Problem(400, "Invalid webhook", "the provider's event id or type is too long",
                      errors=[{"field": "id" if len(event_id) > MAX_ID else "type", "message": "too long"}])
    return CloudEvent.model_construct(
        specversion="1.0", id=event_id, source=f"webhooks/{source.name}", type=event_type, time=received_at,
        subject=None, datacontenttype=media or None, dataschema=None, data=payload,
    )
