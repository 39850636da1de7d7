"""Memory of signed webhook messages already seen, in Redis, for as long as their signature stays valid.

A message is remembered as pending while it is published, then under the event id it was accepted
as, so a provider's own retry of an accepted message gets that answer again (200), not an error.
"""

from __future__ import annotations

from tally.edge.problems import Problem
from tally.ingest.redisguard import RedisDown, RedisGuard

PENDING = b""


class ReplayMemory:
    def __init__(self, guard: RedisGuard, prefix: str) -> None:
        self._guard = guard
        self._prefix = f"{prefix}seen:"

    async def first_time(self, key: str, window_s: int) -> bytes | None:
        """Remember the message; None if it is new, else what was remembered (PENDING or the accepted id).

        With Redis down, the policy decides (open: treated as new)."""
        try:
            return await self._guard.call("webhook_replay", self._guard.client.set(
                self._prefix + key, PENDING, nx=True, ex=window_s, get=True))
        except RedisDown:
            return None

    async def accepted(self, key: str, event_id: str) -> None:
        try:
            await self._guard.call("webhook_replay", self._guard.client.set(
                self._prefix + key, event_id.encode(), xx=True, keepttl=True))
        except (RedisDown, Problem):
            return

    async def forget(self, key: str) -> None:
        """Publishing failed: the provider's retry of this very message must not count as a replay."""
        try:
            await self._guard.call("webhook_replay", self._guard.client.delete(self._prefix + key))
        except (RedisDown, Problem):
            return
