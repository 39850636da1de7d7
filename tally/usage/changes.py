"""Whether a subject's windows changed: the change counters the counter cache bumps with every window it
writes (`tally.sinks.redis_cache.subject_changes_key`), as a reader that keeps figures in memory sees them.

The counters of every subject read lately are fetched together, in one round trip at most every `poll_s`,
because a round trip costs the client some 130 us of CPU, more than the rest of a kept read. A read can
therefore miss a change that reached Redis less than `poll_s` before it. A subject read for the first time
is asked for alone, before its windows are read. After a Redis failure the counters are not asked for
during `cooldown_s` (every read then recomputes), so reads do not each wait out the client's retries
(docs/adr/0046).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tally.sinks.redis_cache import subject_changes_key

log = logging.getLogger("tally.usage")

Seen = tuple[bytes, bytes]  # the `any` and `ended` counters; empty where the key holds none

# Every key's two counters in one reply, "any ended" per key and keys apart by ",": a reply of a thousand
# parts cost the client some 5 ms to parse.
_COUNTERS = """
local out = {}
for i, key in ipairs(KEYS) do
  local found = redis.call('HMGET', key, 'any', 'ended')
  out[i] = (found[1] or '') .. ' ' .. (found[2] or '')
end
return table.concat(out, ',')
"""


class SubjectChanges:
    def __init__(self, client: redis.Redis, prefix: str, poll_s: float = 0.1, idle_s: float = 60.0,
                 max_subjects: int = 10_000, cooldown_s: float = 5.0) -> None:
        self._client = client
        self._prefix = prefix
        self._poll_s = poll_s
        self._idle_s = idle_s
        self._max_subjects = max_subjects
        self._cooldown_s = cooldown_s
        self._skip_until = float("-inf")
        self._script: AsyncScript | None = None
        self._seen: dict[str, Seen] = {}
        self._asked: dict[str, float] = {}
        self._polled_at = float("-inf")
        self._polling: asyncio.Future[None] | None = None

    async def seen(self, tenant: str, subject: str) -> Seen | None:
        """The subject's counters as Redis held them `poll_s` ago or later; None when Redis cannot tell."""
        key = subject_changes_key(self._prefix, tenant, subject)
        now = time.monotonic()
        if now < self._skip_until:
            return None
        self._asked[key] = now
        try:
            if now - self._polled_at >= self._poll_s:
                await self._poll()
            found = self._seen.get(key)
            if found is None:
                found = self._seen[key] = (await self._read([key]))[key]
        except (RedisError, OSError) as exc:
            log.warning("usage change counters unread, figures recomputed for %.0f s: %s", self._cooldown_s, exc)
            self._seen.clear()
            self._skip_until = time.monotonic() + self._cooldown_s
            return None
        return found

    async def _poll(self) -> None:
        """One poll at a time: reads that find it under way wait for it instead of starting another."""
        if self._polling is None:
            self._polling = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._polling)

    async def _refresh(self) -> None:
        started = time.monotonic()
        try:
            idle = [key for key, at in self._asked.items() if at < started - self._idle_s]
            for key in idle:
                del self._asked[key]
                self._seen.pop(key, None)
            if len(self._asked) > self._max_subjects:
                self._asked.clear()
                self._seen.clear()
            self._seen.update(await self._read(list(self._seen)))
            self._polled_at = started
        finally:
            self._polling = None

    async def _read(self, keys: list[str]) -> dict[str, Seen]:
        if not keys:
            return {}
        if self._script is None:
            self._script = self._client.register_script(_COUNTERS)
        found = (await self._script(keys=keys)).split(b",")
        return {key: tuple(counters.split(b" ")) for key, counters in zip(keys, found)}  # type: ignore[misc]
