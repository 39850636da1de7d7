"""Idempotency-Key (IETF httpapi draft): a retried request gets the first response back, not a second effect.

State per (tenant, route, key) is a Redis hash: the request's fingerprint, then the final response.
A repeat with the same fingerprint replays the stored response (marked `Idempotent-Replayed: true`),
a repeat while the first is still running gets 409, the same key with another payload gets 422.
Server errors (5xx) are not stored: the lock is released so the client's retry runs for real.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from starlette.responses import Response

from ingest.metrics import Metrics
from ingest.problems import Problem
from ingest.redisguard import RedisDown, RedisGuard

log = logging.getLogger("tally.gateway.idempotency")

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
KEY_PATTERN = re.compile(r'^"?([\x21\x23-\x7e]{1,255})"?$')

BEGIN = """
local found = redis.call('HMGET', KEYS[1], 'fp', 'status', 'ctype', 'body')
if found[1] then
  return found
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return false
"""

FINISH = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'ctype', ARGV[3], 'body', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

RELEASE = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'status') == 0 then
  redis.call('DEL', KEYS[1])
end
return 1
"""


def parse_key(raw: str) -> str:
    """The header is a structured-field string; a bare token is accepted too. 1 to 255 visible characters."""
    match = KEY_PATTERN.match(raw.strip())
    if match is None:
        raise Problem(400, "Invalid Idempotency-Key",
                      "Idempotency-Key must be 1 to 255 visible ASCII characters, optionally in double quotes",
                      errors=[{"field": "Idempotency-Key", "message": "invalid value"}])
    return match.group(1)


def fingerprint(method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """What makes two requests "the same": method, path, content type, CloudEvents headers and the body."""
    digest = hashlib.sha256()
    digest.update(f"{method} {path}\n{headers.get('content-type', '')}\n".encode())
    for name in sorted(k for k in headers.keys() if k.startswith("ce-")):
        digest.update(f"{name}:{headers[name]}\n".encode())
    digest.update(body)
    return digest.digest()


class IdempotencyStore:
    def __init__(self, guard: RedisGuard, prefix: str, metrics: Metrics, ttl_s: int, lock_s: int) -> None:
        self._guard = guard
        self._prefix = f"{prefix}idem:"
        self._metrics = metrics
        self._ttl_ms = ttl_s * 1000
        self._lock_ms = lock_s * 1000
        client = guard.client
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)
        self._release = client.register_script(RELEASE)

    def _key(self, tenant: str, route: str, key: str) -> str:
        scoped = hashlib.sha256(f"{tenant}\0{route}\0{key}".encode()).hexdigest()
        return f"{self._prefix}{scoped}"

    async def run(self, tenant: str, route: str, key: str, fp: bytes,
                  handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run the handler once per key; replay, refuse or run it depending on what Redis remembers."""
        redis_key = self._key(tenant, route, key)
        try:
            found = await self._guard.call("idempotency", self._begin(keys=[redis_key], args=[fp, self._lock_ms]))
        except RedisDown:
            return await handler()
        if found:
            return self._answer_repeat(route, fp, found)
        try:
            response = await handler()
        except Problem as problem:
            response = problem.response()
        except BaseException:
            await self._quietly(self._release(keys=[redis_key], args=[fp]))
            raise
        if response.status_code >= 500:
            await self._quietly(self._release(keys=[redis_key], args=[fp]))
        else:
            args = [fp, response.status_code, response.media_type or "application/json", bytes(response.body),
                    self._ttl_ms]
            await self._quietly(self._finish(keys=[redis_key], args=args))
        return response

    def _answer_repeat(self, route: str, fp: bytes, found: list[bytes | None]) -> Response:
        stored_fp, status, media_type, body = found
        if stored_fp != fp:
            raise Problem(422, "Idempotency-Key reused",
                          "this Idempotency-Key was already used with a different request payload",
                          errors=[{"field": "Idempotency-Key", "message": "reused with another payload"}])
        if status is None:
            raise Problem(409, "Request in progress",
                          "a request with this Idempotency-Key is still being processed; retry shortly",
                          headers={"Retry-After": "1"})
        self._metrics.replays.labels(route).inc()
        return Response(body or b"", int(status), {REPLAYED: "true"}, (media_type or b"").decode() or None)

    async def _quietly(self, awaitable: Awaitable[object]) -> None:
        """After the effect happened, a Redis failure must not change the client's answer."""
        try:
            await self._guard.call("idempotency", awaitable)
        except (RedisDown, Problem):
            log.warning("could not record the idempotent response; a retry will run again")
