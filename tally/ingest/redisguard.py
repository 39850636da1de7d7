"""Redis calls behind one policy: when Redis is unreachable the gateway degrades, it never answers 500.

With policy "open" (the default) the request goes on without the Redis feature (no rate limit, no
stored idempotent response, no replay memory): events stay safe because the processors deduplicate by
(tenant, source, id). With policy "closed" the request gets 503 and Retry-After. Either way a metric
counts the failure and a log line says so, at most once per operation every few seconds.
After Redis is found unreachable it is not asked again for a short while, so a dead Redis costs no
timeout per request. A full connection pool, an answer Redis refused (OOM, READONLY, a script error)
says nothing about reachability: the policy decides that one call, and the breaker stays closed.
Requests queue for a connection (up to the timeout) instead of failing at once when all are busy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

import redis.asyncio as redis
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError

from tally.ingest.config import RedisFailurePolicy
from tally.ingest.metrics import Metrics
from tally.edge.problems import Problem

log = logging.getLogger("tally.gateway.redis")
T = TypeVar("T")

LOG_EVERY_S = 10.0
POOL_EXHAUSTED = "No connection available."  # redis-py's BlockingConnectionPool, after its timeout


class RedisDown(Exception):
    """Redis failed and the policy lets the request go on without it."""


class RedisGuard:
    def __init__(self, client: redis.Redis, policy: RedisFailurePolicy, metrics: Metrics,
                 retry_after_s: int = 5, pause_s: float = 1.0) -> None:
        self.client = client
        self.policy = policy
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._pause_s = pause_s
        self._down_until = 0.0
        self._logged: dict[str, float] = {}

    @classmethod
    def connect(cls, url: str, timeout_s: float, policy: RedisFailurePolicy, metrics: Metrics,
                retry_after_s: int = 5) -> "RedisGuard":
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=256, timeout=timeout_s,
                                                     socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                     retry_on_timeout=False)
        client = redis.Redis(connection_pool=pool)
        return cls(client, policy, metrics, retry_after_s)

    async def call(self, operation: str, awaitable: Awaitable[T]) -> T:
        """Await a Redis call; on failure raise RedisDown (policy open) or a 503 Problem (policy closed)."""
        if time.monotonic() < self._down_until:
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            self._failed(operation, "Redis marked down after a recent failure")
        try:
            return await awaitable
        except (ResponseError, MaxConnectionsError) as exc:
            self._failed(operation, f"{type(exc).__name__}: {exc}")
        except (RedisError, OSError) as exc:
            if str(exc) == POOL_EXHAUSTED:
                self._failed(operation, "every connection is busy")
            self._down_until = time.monotonic() + self._pause_s
            self._failed(operation, f"{type(exc).__name__}: {exc}")

    def _failed(self, operation: str, reason: str) -> NoReturn:
        self._metrics.redis_failures.labels(operation).inc()
        now = time.monotonic()
        if now - self._logged.get(operation, 0.0) >= LOG_EVERY_S:
            self._logged[operation] = now
            log.warning("redis unavailable during %s (policy %s): %s", operation, self.policy, reason)
        if self.policy == "closed":
            raise Problem(503, "Service unavailable", "a dependency of the gateway (Redis) is unreachable",
                          headers={"Retry-After": str(self._retry_after_s)})
        raise RedisDown(operation)

    async def eviction_policy(self) -> str | None:
        """Redis' maxmemory-policy when it has a memory limit (None without one, or if CONFIG is not allowed)."""
        try:
            config = await self.client.config_get("maxmemory*")
        except (RedisError, OSError):
            return None
        policy = config.get("maxmemory-policy")
        return policy if int(config.get("maxmemory", 0) or 0) > 0 else None

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """The client was built on a pool of ours, which its own close leaves connected."""
        await self.client.aclose(close_connection_pool=True)
