"""Memory of signed webhook messages already seen, in Redis, for as long as their signature stays valid."""

from __future__ import annotations

from ingest.problems import Problem
from ingest.redisguard import RedisDown, RedisGuard


class ReplayMemory:
    def __init__(self, guard: RedisGuard, prefix: str) -> None:
        self._guard = guard
        self._prefix = f"{prefix}seen:"

    async def first_time(self, key: str, window_s: int) -> bool:
        """Remember the message; False if it was remembered already. With Redis down, the policy decides."""
        try:
            return bool(await self._guard.call("webhook_replay",
                                               self._guard.client.set(self._prefix + key, b"1", nx=True, ex=window_s)))
        except RedisDown:
            return True

    async def forget(self, key: str) -> None:
        """Publishing failed: the provider's retry of this very message must not count as a replay."""
        try:
            await self._guard.call("webhook_replay", self._guard.client.delete(self._prefix + key))
        except (RedisDown, Problem):
            return
