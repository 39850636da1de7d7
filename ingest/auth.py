"""API keys: stored as sha256 hashes with tenant and scopes, cached briefly so the hot path skips the database.

Keys are 32 random bytes, so a fast hash is enough; no password-style stretching is needed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import asyncpg

PREFIX = "tly_"
SCOPES = ("events:write", "logs:write")
DEFAULT_SCOPES = SCOPES


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    scopes: frozenset[str]


def new_key() -> tuple[str, str]:
    """A fresh secret and its public id (the first characters, safe to show and log)."""
    secret = PREFIX + secrets.token_urlsafe(32)
    return secret, secret[: len(PREFIX) + 8]


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyStore:
    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 30.0) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}

    async def authenticate(self, secret: str) -> Principal | None:
        digest = hash_key(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self._pool.fetchrow(
            "select id, tenant, scopes from api_keys where key_hash = $1 and revoked_at is null", digest
        )
        principal = Principal(row["id"], row["tenant"], frozenset(row["scopes"])) if row else None
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, principal)
        return principal


async def create_key(conn: asyncpg.Connection, tenant: str, name: str, scopes: list[str]) -> tuple[str, str]:
    secret, key_id = new_key()
    await conn.execute(
        "insert into api_keys (id, tenant, name, key_hash, scopes) values ($1, $2, $3, $4, $5)",
        key_id, tenant, name, hash_key(secret), scopes,
    )
    return key_id, secret


async def list_keys(conn: asyncpg.Connection, tenant: str | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select id, tenant, name, scopes, created_at, revoked_at from api_keys"
        " where ($1::text is null or tenant = $1) order by created_at",
        tenant,
    )


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    status = await conn.execute(
        "update api_keys set revoked_at = now() where id = $1 and revoked_at is null", key_id
    )
    return status.endswith(" 1")
