"""Redis hot cache of counter states, written after they are committed and published.

Redis is only a cache: a failure is logged and counted, then Redis is left alone for a cool-down
so a dead Redis costs the pipeline nothing. A state only replaces an older revision, so two
processors writing the same window in either order leave the newest state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import redis.asyncio as redis
from redis.exceptions import RedisError

from schemas.counters import PublishedState

log = logging.getLogger("tally.sinks.redis")

# KEYS[i] gets revision ARGV[3i-2], state ARGV[3i-1], ttl ARGV[3i]: one round trip per chunk.
_SET_IF_NEWER = """
for i, key in ipairs(KEYS) do
  local revision = tonumber(ARGV[3 * i - 2])
  local current = redis.call('HGET', key, 'revision')
  if (not current) or tonumber(current) < revision then
    redis.call('HSET', key, 'revision', revision, 'state', ARGV[3 * i - 1])
    redis.call('EXPIRE', key, ARGV[3 * i])
  end
end
return 0
"""
_CHUNK = 1000


def cache_key(prefix: str, counter_key: str) -> str:
    return f"{prefix}counter:{counter_key}"


class RedisCounterCache:
    def __init__(self, url: str, prefix: str, ttl_after_window_s: int, cooldown_s: float = 5.0) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(_SET_IF_NEWER)
        self._prefix = prefix
        self._ttl_after_window_s = ttl_after_window_s
        self._cooldown_s = cooldown_s
        self._skip_until = 0.0
        self._pending: list[PublishedState] = []
        self.errors = 0

    async def write(self, states: Sequence[PublishedState]) -> None:
        self._pending.extend(states)

    async def flush(self) -> None:
        """Best effort: never raises, so the processor never waits on its cache."""
        states, self._pending = self._pending, []
        if not states or time.monotonic() < self._skip_until:
            return
        now = datetime.now(timezone.utc)
        try:
            for i in range(0, len(states), _CHUNK):
                keys: list[str] = []
                args: list[int | bytes] = []
                for s in states[i:i + _CHUNK]:
                    keys.append(cache_key(self._prefix, s.key))
                    args += [s.revision, s.to_bytes(), max(60, int((s.window_end - now).total_seconds())
                                                           + self._ttl_after_window_s)]
                await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.errors += 1
            self._skip_until = time.monotonic() + self._cooldown_s
            log.warning("redis cache skipped for %.0fs: %s", self._cooldown_s, exc)

    async def close(self) -> None:
        await self._client.aclose()
