"""Token buckets in Redis, decided atomically in Lua, answering with the IETF RateLimit headers.

Why not the `limits` package: see docs/adr/0003-rate-limit-lua-token-bucket.md. In short, it has no
token bucket (only fixed and sliding windows), and getting the remaining quota and reset time for the
headers takes a second round trip; here one script call decides, refills and reports.
The script reads Redis' own clock, so several gateways with skewed clocks share one bucket fairly.

Checks are micro-batched: every check that arrives during one pass of the event loop waits for the
end of that pass, then all of them go to Redis in one EVALSHA; while that call is out, new checks
gather for the next one, so there is at most one call in flight and batches grow with the load. For each bucket the script takes the
requests' tokens one by one, in arrival order, exactly as that many separate calls at the same
instant would; it returns how many it allowed and the bucket's level before the first, and
`_decisions` rebuilds every request's answer (remaining, reset, retry) from those with the same
floating-point steps as the script. One round trip then serves hundreds of requests.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from tally.edge.problems import Problem
from tally.ingest.redisguard import RedisDown, RedisGuard

# KEYS: one bucket each; ARGV: rate, burst and number of requests per key, in KEYS order.
TOKEN_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local count = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  local before = tokens
  local allowed = 0
  for _ = 1, count do
    if tokens >= 1 then
      tokens = tokens - 1
      allowed = allowed + 1
    end
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
  out[i] = {allowed, string.format('%.17g', before)}
end
return out
"""


@dataclass(frozen=True)
class Limit:
    per_s: float
    burst: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after_s: int = 0


@dataclass
class _Bucket:
    """The checks on one bucket waiting for the next Redis call, in arrival order."""

    policy: str
    limit: Limit
    waiters: list[asyncio.Future[Decision]] = field(default_factory=list)


def _decisions(policy: str, limit: Limit, count: int, allowed: int, before: float) -> list[Decision]:
    """The answers of `count` requests on one bucket, as one script call per request would have given."""
    rate, burst = limit.per_s, limit.burst
    window_s = max(1, math.ceil(burst / rate))
    policy_header = f'"{policy}";q={burst};w={window_s}'
    out: list[Decision] = []
    tokens = before
    for index in range(count):
        if index < allowed:
            tokens = tokens - 1
            full_s = math.ceil(math.ceil((burst - tokens) * 1000 / rate) / 1000)
            out.append(Decision(True, {"RateLimit-Policy": policy_header,
                                       "RateLimit": f'"{policy}";r={math.floor(tokens)};t={full_s}'}))
            continue
        full_s = math.ceil(math.ceil((burst - tokens) * 1000 / rate) / 1000)
        retry_after_s = max(1, math.ceil(math.ceil((1 - tokens) * 1000 / rate) / 1000))
        out.append(Decision(False, {"RateLimit-Policy": policy_header,
                                    "RateLimit": f'"{policy}";r={math.floor(tokens)};t={full_s}',
                                    "Retry-After": str(retry_after_s)}, retry_after_s))
    return out


class RateLimiter:
    def __init__(self, guard: RedisGuard, prefix: str) -> None:
        self._guard = guard
        self._prefix = f"{prefix}rl:"
        self._script = guard.client.register_script(TOKEN_BUCKETS)
        self._waiting: dict[tuple[str, Limit], _Bucket] = {}
        self._sending: asyncio.Task[None] | None = None
        self.calls = 0

    async def check(self, policy: str, subject: str, limit: Limit) -> Decision:
        """Take a token from the bucket of (policy, subject); if Redis is down, the guard's policy decides."""
        loop = asyncio.get_running_loop()
        if not self._waiting and self._sending is None:
            loop.call_soon(self._flush)
        slot = (f"{self._prefix}{policy}:{subject}", limit)
        bucket = self._waiting.get(slot)
        if bucket is None:
            bucket = self._waiting[slot] = _Bucket(policy, limit)
        waiter: asyncio.Future[Decision] = loop.create_future()
        bucket.waiters.append(waiter)
        return await waiter

    def _flush(self) -> None:
        """End of the loop pass, or the previous call is back: send everything that waits in one call."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, {}
        self._sending = asyncio.get_running_loop().create_task(self._decide(waiting))
        self._sending.add_done_callback(self._sent)

    def _sent(self, _task: asyncio.Task[None]) -> None:
        self._sending = None
        self._flush()

    async def _decide(self, waiting: dict[tuple[str, Limit], _Bucket]) -> None:
        buckets = list(waiting.values())
        args: list[float | int] = []
        for bucket in buckets:
            args += [bucket.limit.per_s, bucket.limit.burst, len(bucket.waiters)]
        self.calls += 1
        try:
            replies = await self._guard.call("rate_limit", self._script(keys=[key for key, _ in waiting], args=args))
            for bucket, (allowed, before) in zip(buckets, replies, strict=True):
                _answer(bucket, _decisions(bucket.policy, bucket.limit, len(bucket.waiters), int(allowed),
                                           float(before)))
        except RedisDown:
            for bucket in buckets:
                _answer(bucket, [Decision(True)] * len(bucket.waiters))
        except Exception as exc:  # noqa: BLE001 - a 503 Problem (policy closed) or a bug: every waiter raises its own copy
            for bucket in buckets:
                for waiter in bucket.waiters:
                    if not waiter.done():
                        waiter.set_exception(_copy(exc))
        finally:
            for bucket in buckets:
                for waiter in bucket.waiters:
                    if not waiter.done():
                        waiter.cancel()


def _answer(bucket: _Bucket, decisions: list[Decision]) -> None:
    for waiter, decision in zip(bucket.waiters, decisions, strict=True):
        if not waiter.done():
            waiter.set_result(decision)


def _copy(exc: Exception) -> Exception:
    """One exception object per waiting request, so their tracebacks and headers stay apart."""
    if isinstance(exc, Problem):
        return Problem(exc.status, exc.title, exc.detail, type_=exc.type, headers=dict(exc.headers), **exc.extensions)
    return RuntimeError(f"rate limit check failed: {exc!r}")
