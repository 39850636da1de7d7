"""Idempotency-Key (IETF httpapi draft): a retried request gets the first response back, not a second effect.

State per (tenant, route, key) is a Redis hash: the request's fingerprint, then the final response.
A repeat with the same fingerprint replays the stored response (marked `Idempotent-Replayed: true`),
a repeat while the first is still running gets 409, the same key with another payload gets 422.
Server errors (5xx) and batches with items Kafka did not take are not stored: the lock is released
so the client's retry runs for real.

What is stored is bounded, because every tenant shares the Redis that holds it (ADR 5): a response
body over `max_body_bytes` is kept as a summary (its top-level counts and title, without per-item
results), a 4xx is kept only for `error_ttl_s`, and each tenant may store at most `tenant_budget_bytes`
per TTL window; past it, answers are not kept at all (a retry then runs again, and the processors
drop the duplicate event by its id).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from tally.edge.answers import Answer, problem_answer
from tally.ingest.metrics import Metrics
from tally.edge.problems import Problem
from tally.ingest.redisguard import RedisDown, RedisGuard

log = logging.getLogger("tally.gateway.idempotency")

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
RECORD_OVERHEAD = 200  # bytes Redis spends on a record besides its body: key, fingerprint, fields
KEY_PATTERN = re.compile(r'^(?:"([\x21\x23-\x7e]{1,255})"|([\x21\x23-\x7e]{1,255}))$')

BEGIN = """
local found = redis.call('HMGET', KEYS[1], 'fp', 'status', 'ctype', 'body')
if found[1] then
  return found
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return false
"""

# KEYS: record, tenant budget; ARGV: fp, status, ctype, body, ttl_ms, budget_bytes, budget_window_ms.
# A record costs its body plus RECORD_OVERHEAD; past the tenant's budget it is dropped, not stored.
FINISH = """
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then
  return 0
end
local cost = #ARGV[4] + %d
local used = redis.call('INCRBY', KEYS[2], cost)
if redis.call('PTTL', KEYS[2]) < 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
if used > tonumber(ARGV[6]) then
  redis.call('DECRBY', KEYS[2], cost)
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'ctype', ARGV[3], 'body', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
""" % RECORD_OVERHEAD

RELEASE = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'status') == 0 then
  redis.call('DEL', KEYS[1])
end
return 1
"""


def parse_key(raw: str) -> str:
    """A quoted string or a bare token of 1 to 255 visible characters (no spaces or escapes); unbalanced
    quotes are refused, so `"abc` and `abc` are not the same key by accident."""
    match = KEY_PATTERN.match(raw.strip())
    if match is None:
        raise Problem(400, "Invalid Idempotency-Key",
                      "Idempotency-Key must be 1 to 255 visible ASCII characters, optionally in double quotes",
                      errors=[{"field": "Idempotency-Key", "message": "invalid value"}])
    return match.group(1) or match.group(2)


def fingerprint(method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """What makes two requests "the same": method, path, content type, CloudEvents headers and the body."""
    digest = hashlib.sha256()
    digest.update(f"{method} {path}\n{headers.get('content-type', '')}\n".encode())
    for name in sorted(k for k in headers.keys() if k.startswith("ce-")):
        digest.update(f"{name}:{headers[name]}\n".encode())
    digest.update(body)
    return digest.digest()


def summary(body: bytes) -> bytes:
    """A stored stand-in for a response body too large to keep: its top-level scalars (counts, title)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    kept = {k: v for k, v in value.items() if not isinstance(v, (dict, list))} if isinstance(value, dict) else {}
    kept["stored"] = "summary: the full response was too large to keep for replay"
    return orjson.dumps(kept)


@dataclass(frozen=True)
class Retention:
    ttl_s: int = 24 * 3600
    error_ttl_s: int = 60
    max_body_bytes: int = 4096
    tenant_budget_bytes: int = 8 * 1024 * 1024


class IdempotencyStore:
    def __init__(self, guard: RedisGuard, prefix: str, metrics: Metrics, retention: Retention, lock_s: int) -> None:
        self._guard = guard
        self._prefix = f"{prefix}idem:"
        self._budget_prefix = f"{prefix}idem-budget:"
        self._metrics = metrics
        self._retention = retention
        self._lock_ms = lock_s * 1000
        client = guard.client
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)
        self._release = client.register_script(RELEASE)

    def _key(self, tenant: str, route: str, key: str) -> str:
        scoped = hashlib.sha256(f"{tenant}\0{route}\0{key}".encode()).hexdigest()
        return f"{self._prefix}{scoped}"

    async def run(self, tenant: str, route: str, key: str, fp: bytes,
                  handler: Callable[[], Awaitable[Answer]]) -> Answer:
        """Run the handler once per key; replay, refuse or run it depending on what Redis remembers."""
        redis_key = self._key(tenant, route, key)
        try:
            found = await self._guard.call("idempotency", self._begin(keys=[redis_key], args=[fp, self._lock_ms]))
        except RedisDown:
            return await handler()
        if found:
            return self._answer_repeat(route, fp, found)
        try:
            answer = await handler()
        except Problem as problem:
            answer = problem_answer(problem)
        except BaseException:
            await self._quietly(self._release(keys=[redis_key], args=[fp]))
            raise
        if answer.status >= 500 or not answer.keep:
            await self._quietly(self._release(keys=[redis_key], args=[fp]))
        else:
            await self._quietly(self._finish(keys=[redis_key, self._budget_key(tenant)],
                                             args=self._stored(fp, answer)))
        return answer

    def _budget_key(self, tenant: str) -> str:
        return self._budget_prefix + hashlib.sha256(tenant.encode()).hexdigest()

    def _stored(self, fp: bytes, answer: Answer) -> list[bytes | int | str]:
        r = self._retention
        body = answer.body
        if len(body) > r.max_body_bytes:
            body = summary(body)
        ttl_s = r.error_ttl_s if answer.status >= 400 else r.ttl_s
        return [fp, answer.status, answer.media_type, body, ttl_s * 1000, r.tenant_budget_bytes, r.ttl_s * 1000]

    def _answer_repeat(self, route: str, fp: bytes, found: list[bytes | None]) -> Answer:
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
        return Answer(int(status), body or b"", (media_type or b"application/json").decode(), {REPLAYED: "true"})

    async def _quietly(self, awaitable: Awaitable[object]) -> None:
        """After the effect happened, a Redis failure must not change the client's answer."""
        try:
            await self._guard.call("idempotency", awaitable)
        except (RedisDown, Problem):
            log.warning("could not record the idempotent response; a retry will run again")
