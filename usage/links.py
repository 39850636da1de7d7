"""Signed, expiring links to a subject's usage page: what a tenant hands its customer instead of a key.

The token names the tenant, the subject and the expiry, and is signed with HMAC-SHA256 under
`TALLY_USAGE_LINK_SECRET`; it grants reading that one subject's usage until it expires, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson


class BadLink(ValueError):
    pass


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, tenant: str, subject: str, expires: int) -> str:
    body = _b64(orjson.dumps({"t": tenant, "s": subject, "e": expires}))
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify(secret: str, token: str, subject: str, now: float | None = None) -> str:
    """The tenant the token was signed for, if it is genuine, unexpired and for this subject."""
    body, _, mac = token.partition(".")
    try:
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise BadLink("the link's signature is not valid")
        claims = orjson.loads(_unb64(body))
    except (ValueError, orjson.JSONDecodeError):
        raise BadLink("the link is malformed") from None
    if claims.get("s") != subject:
        raise BadLink("the link is for another subject")
    if claims.get("e", 0) <= (time.time() if now is None else now):
        raise BadLink("the link has expired; ask for a new one")
    return claims["t"]
