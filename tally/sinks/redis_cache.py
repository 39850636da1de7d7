"""Redis hot cache of counter states, written after they are committed and published.

Redis is only a cache: a failure is logged and counted, then Redis is left alone for a cool-down
so a dead Redis costs the pipeline nothing. A state only replaces an older revision, so two
processors writing the same window in either order leave the newest state.

Each state that replaces an older one also bumps its subject's change counters (`subject_changes_key`):
`any` for every window, `ended` for a window that had already ended (a late event or a repair). A reader
that keeps a figure computed from a subject's windows knows it still holds while the counters it saw
are unchanged (docs/adr/0046).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from tally.schemas.counters import PublishedState

log = logging.getLogger("tally.sinks.redis")

# ARGV[1] = n: KEYS[i] (i <= n) gets revision ARGV[5i-3], state ARGV[5i-2], ttl ARGV[5i-1]; ARGV[5i] names
# its subject's change counters KEYS[n + ARGV[5i]] (0: none), ARGV[5i+1] is 1 for a window that had ended.
# Counters start at ARGV[2 + 5n] (the time in ms), so a key that expired and came back does not repeat a value.
_SET_IF_NEWER = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local a = 5 * i - 3
  local revision = tonumber(ARGV[a])
  local current = redis.call('HGET', KEYS[i], 'revision')
  if (not current) or tonumber(current) < revision then
    redis.call('HSET', KEYS[i], 'revision', revision, 'state', ARGV[a + 1])
    redis.call('EXPIRE', KEYS[i], ARGV[a + 2])
    local change = tonumber(ARGV[a + 3])
    if change > 0 then
      local subject = KEYS[n + change]
      if redis.call('EXISTS', subject) == 0 then
        redis.call('HSET', subject, 'any', ARGV[2 + 5 * n], 'ended', ARGV[2 + 5 * n])
      end
      redis.call('HINCRBY', subject, 'any', 1)
      if ARGV[a + 4] == '1' then
        redis.call('HINCRBY', subject, 'ended', 1)
      end
      if redis.call('TTL', subject) < tonumber(ARGV[a + 2]) then
        redis.call('EXPIRE', subject, ARGV[a + 2])
      end
    end
  end
end
return 0
"""
_CHUNK = 1000


def cache_key(prefix: str, counter_key: str) -> str:
    return f"{prefix}counter:{counter_key}"


def subject_changes_key(prefix: str, tenant: str, subject: str) -> str:
    return f"{prefix}changes:{orjson.dumps([tenant, subject]).decode()}"


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
                keys, args = self._arguments(states[i:i + _CHUNK], now)
                await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.errors += 1
            self._skip_until = time.monotonic() + self._cooldown_s
            log.warning("redis cache skipped for %.0fs: %s", self._cooldown_s, exc)

    def _arguments(self, states: Sequence[PublishedState], now: datetime) -> tuple[list[str], list[int | bytes]]:
        keys: list[str] = []
        args: list[int | bytes] = [len(states)]
        subjects: dict[str, int] = {}
        for s in states:
            keys.append(cache_key(self._prefix, s.key))
            change = 0
            if s.subject is not None:
                key = subject_changes_key(self._prefix, s.tenant, s.subject)
                change = subjects.setdefault(key, len(subjects) + 1)
            args += [s.revision, s.to_bytes(),
                     max(60, int((s.window_end - now).total_seconds()) + self._ttl_after_window_s),
                     change, int(s.window_end <= now)]
        args.append(int(now.timestamp() * 1000))
        return keys + list(subjects), args

    async def close(self) -> None:
        await self._client.aclose()
