"""Signed, expiring, revocable links to a subject's usage page: what a tenant hands its customer instead
of a key (ADR 0082).

Each link is a row of `usage_links` naming the tenant, the subject, the API key that minted it and its
expiry; the token carries the row's id and is signed with HMAC-SHA256. It grants reading that one
subject's usage until it expires, the link is revoked, or the key that minted it is revoked.

The token starts with the id of the secret that signed it (derived from the secret), so
`TALLY_USAGE_LINK_SECRET` can be replaced while links signed with the secrets listed in
`TALLY_USAGE_LINK_PREVIOUS_SECRETS` keep working until they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg
import orjson


class BadLink(ValueError):
    pass


class TooManyLinks(Exception):
    pass


@dataclass(frozen=True)
class Claims:
    link: int
    tenant: str
    subject: str
    expires: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_id(secret: str) -> str:
    """A short public name of a signing secret, so a token says which secret to check it with."""
    return hashlib.sha256(b"tally usage link secret\n" + secret.encode()).hexdigest()[:8]


class Signer:
    """Signs with the current secret; checks with it and the previous ones."""

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        self._current = secret
        self._secrets = {secret_id(s): s for s in (secret, *previous) if s}

    @property
    def configured(self) -> bool:
        return bool(self._current)

    def sign(self, claims: Claims) -> str:
        body = _b64(orjson.dumps({"l": claims.link, "t": claims.tenant, "s": claims.subject, "e": claims.expires}))
        head = secret_id(self._current)
        return f"{head}.{body}.{self._mac(self._current, head, body)}"

    def verify(self, token: str, subject: str, now: float | None = None) -> Claims:
        """The claims of a genuine, unexpired token for this subject (revocation is `live`'s to check)."""
        head, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        secret = self._secrets.get(head)
        if secret is None:
            raise BadLink("the link was signed with a secret no longer accepted; ask for a new one")
        if not hmac.compare_digest(self._mac(secret, head, body), mac):
            raise BadLink("the link's signature is not valid")
        try:
            raw = orjson.loads(_unb64(body))
            claims = Claims(int(raw["l"]), str(raw["t"]), str(raw["s"]), int(raw["e"]))
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            raise BadLink("the link is malformed") from None
        if claims.subject != subject:
            raise BadLink("the link is for another subject")
        if claims.expires <= (time.time() if now is None else now):
            raise BadLink("the link has expired; ask for a new one")
        return claims

    @staticmethod
    def _mac(secret: str, head: str, body: str) -> str:
        return _b64(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())


async def mint(pool: asyncpg.Pool, tenant: str, key_id: str, subject: str, expires: int, per_tenant: int) -> int:
    """A new link's id; `TooManyLinks` when the tenant has `per_tenant` live links already (security review M4)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(hashtextextended('usage_links ' || $1, 0))", tenant)
        live = await conn.fetchval("select count(*) from usage_links where tenant = $1 and revoked_at is null"
                                   " and expires_at > now()", tenant)
        if live >= per_tenant:
            raise TooManyLinks(f"the tenant has {live} live usage links, the most it may have; revoke some first")
        return await conn.fetchval(
            "insert into usage_links (tenant, subject, key_id, expires_at) values ($1, $2, $3, $4) returning id",
            tenant, subject, key_id, datetime.fromtimestamp(expires, timezone.utc))


async def live(pool: asyncpg.Pool, claims: Claims) -> bool:
    """Whether the link is neither revoked nor minted by a key revoked since."""
    return bool(await pool.fetchval(
        "select 1 from usage_links l join api_keys k on k.id = l.key_id where l.id = $1 and l.tenant = $2"
        " and l.revoked_at is null and k.revoked_at is null", claims.link, claims.tenant))


async def revoke(pool: asyncpg.Pool, tenant: str, *, link: int | None = None, key_id: str | None = None) -> int:
    """Revoke one link, or every link a key minted; how many were live."""
    status = await pool.execute(
        "update usage_links set revoked_at = now() where tenant = $1 and revoked_at is null"
        " and ($2::bigint is null or id = $2) and ($3::text is null or key_id = $3)", tenant, link, key_id)
    return int(status.rsplit(" ", 1)[1])
