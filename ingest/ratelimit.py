"""Token buckets in Redis, one atomic Lua call per request, answering with the IETF RateLimit headers.

Why not the `limits` package: see docs/adr/0003-rate-limit-lua-token-bucket.md. In short, it has no
token bucket (only fixed and sliding windows), and getting the remaining quota and reset time for the
headers takes a second round trip; here one EVALSHA decides, refills and reports.
The script reads Redis' own clock, so several gateways with skewed clocks share one bucket fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ingest.redisguard import RedisDown, RedisGuard

TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
local retry_ms = 0
if allowed == 0 then
  retry_ms = math.ceil((cost - tokens) * 1000 / rate)
end
return {allowed, math.floor(tokens), retry_ms, math.ceil((burst - tokens) * 1000 / rate)}
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


class RateLimiter:
    def __init__(self, guard: RedisGuard, prefix: str) -> None:
        self._guard = guard
        self._prefix = f"{prefix}rl:"
        self._script = guard.client.register_script(TOKEN_BUCKET)

    async def check(self, policy: str, subject: str, limit: Limit, cost: int = 1) -> Decision:
        """Take `cost` tokens from the bucket of (policy, subject); if Redis is down, the guard's policy decides."""
        key = f"{self._prefix}{policy}:{subject}"
        try:
            allowed, remaining, retry_ms, full_ms = await self._guard.call(
                "rate_limit", self._script(keys=[key], args=[limit.per_s, limit.burst, cost])
            )
        except RedisDown:
            return Decision(True)
        window_s = max(1, math.ceil(limit.burst / limit.per_s))
        headers = {
            "RateLimit-Policy": f'"{policy}";q={limit.burst};w={window_s}',
            "RateLimit": f'"{policy}";r={int(remaining)};t={math.ceil(int(full_ms) / 1000)}',
        }
        if allowed:
            return Decision(True, headers)
        retry_after_s = max(1, math.ceil(int(retry_ms) / 1000))
        headers["Retry-After"] = str(retry_after_s)
        return Decision(False, headers, retry_after_s)
