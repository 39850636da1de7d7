"""Hot stats answers kept in Redis for a few seconds: a dashboard refreshing every few seconds costs one
query per answer and period, not one per viewer. Redis down only means no cache."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as redis

log = logging.getLogger("tally.query")


class AnswerCache:
    def __init__(self, url: str, prefix: str, ttl_s: float) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
        self._prefix = prefix
        self.ttl_s = ttl_s

    async def get_or_compute(self, tenant: str, query: str, compute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
        """The cached answer (True) or a fresh one, stored for `ttl_s` (False)."""
        digest = hashlib.blake2b(f"{tenant}\n{query}".encode(), digest_size=16).hexdigest()
        key = f"{self._prefix}stats:{digest}"
        try:
            cached = await self._client.get(key)
        except redis.RedisError as exc:
            log.warning("stats cache skipped: %s", exc)
            return await compute(), False
        if cached is not None:
            return cached, True
        answer = await compute()
        try:
            await self._client.set(key, answer, px=int(self.ttl_s * 1000))
        except redis.RedisError as exc:
            log.warning("stats cache not written: %s", exc)
        return answer, False

    async def close(self) -> None:
        await self._client.aclose()
