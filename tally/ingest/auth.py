"""API keys: stored as sha256 hashes with tenant and scopes, cached briefly so the hot path skips the database.

Keys are 32 random bytes, so a fast hash is enough; no password-style stretching is needed.
Known keys and unknown tokens are cached apart, each as a bounded LRU: a flood of made-up tokens
can only evict other made-up tokens, never a valid key. Each lookup is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict

import asyncpg

from tally.edge.products import Principal

PREFIX = "tly_"
SCOPES = ("events:write", "logs:write", "logs:read", "events:read", "usage:read", "admin:write", "alerts:read",
          "alerts:write", "meters:read", "meters:admin")
DEFAULT_SCOPES = ("events:write", "logs:write")


def new_key() -> tuple[str, str]:
    """A fresh secret and its public id (the first characters, safe to show and log)."""
    secret = PREFIX + secrets.token_urlsafe(32)
    return secret, secret[: len(PREFIX) + 8]


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class _Lru:
    """At most `size` entries, each for `ttl_s`; the least recently used goes first."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self._size = size
        self._ttl_s = ttl_s
        self._entries: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()

    def get(self, digest: bytes, now: float) -> tuple[bool, Principal | None]:
        hit = self._entries.get(digest)
        if hit is None or hit[0] <= now:
            return False, None
        self._entries.move_to_end(digest)
        return True, hit[1]

    def put(self, digest: bytes, principal: Principal | None, now: float) -> None:
        self._entries[digest] = (now + self._ttl_s, principal)
        self._entries.move_to_end(digest)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class KeyStore:
    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 30.0, timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._known = _Lru(100_000, ttl_s)
        self._unknown = _Lru(10_000, ttl_s)

    def cached(self, secret: str) -> tuple[bool, Principal | None]:
        """(True, the answer) when the token was looked up recently, else (False, None)."""
        digest, now = hash_key(secret), time.monotonic()
        hit = self._known.get(digest, now)
        return hit if hit[0] else self._unknown.get(digest, now)

    async def authenticate(self, secret: str) -> Principal | None:
        found, principal = self.cached(secret)
        if found:
            return principal
        digest = hash_key(secret)
        async with asyncio.timeout(self._timeout_s):
            row = await self._pool.fetchrow(
                "select id, tenant, scopes from api_keys where key_hash = $1 and revoked_at is null", digest
            )
        principal = Principal(row["id"], row["tenant"], frozenset(row["scopes"])) if row else None
        (self._known if principal else self._unknown).put(digest, principal, time.monotonic())
        return principal


async def create_key(conn: asyncpg.Connection, tenant: str, name: str, scopes: list[str]) -> tuple[str, str]:
    """A new key; `ValueError` for a scope no route checks (a typo would make a key without the intended right)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
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
