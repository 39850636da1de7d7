"""Hard usage limits at intake: refuse an event whose subject used up a hard-limited allowance.

The decision is made elsewhere (the usage product's limit refresh) and kept in Redis; this module
only mirrors it: a background task copies the blocks of the tenants that have hard limits every
`refresh_s`, so the hot path pays a dictionary lookup and never waits on Redis. The copy is made
again only when the decision's digest changed: reading a thousand blocks takes the event loop some
10 ms, which every request arriving meanwhile would wait. Tenants without hard limits are not looked
at. If Redis cannot be read the last copy is kept; the blocks carry their period end and lapse by
themselves (docs/adr/0042).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
from datetime import datetime
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from tally.edge.problems import Problem
from tally.schemas.limits import decode_blocks, digest_key, tenant_key, tenants_key

log = logging.getLogger("tally.gateway.limits")

PROBLEM_TYPE = "tag:tally,2026:usage-limit-exceeded"

Block = tuple[Any, str, datetime]  # event type matcher, meter, period end


class UsageLimits:
    def __init__(self, client: redis.Redis, prefix: str, refresh_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._refresh_s = refresh_s
        self._blocks: dict[str, dict[str, list[Block]]] = {}
        self._digest: bytes | None = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def refused(self, tenant: str, event: dict[str, Any], now: datetime) -> Problem | None:
        """The 429 problem if this event is past a hard limit, else None."""
        subjects = self._blocks.get(tenant)
        if not subjects:
            return None
        blocks = subjects.get(event.get("subject") or "")
        if not blocks:
            return None
        for matches, meter, until in blocks:
            if until > now and matches(event["type"]):
                retry_after = max(1, int((until - now).total_seconds()) + 1)
                return Problem(429, "Usage limit exceeded",
                               f"the subject used its allowance of {meter} for the period ending {until.isoformat()}",
                               type_=PROBLEM_TYPE, headers={"Retry-After": str(retry_after)}, meter=meter,
                               subject=event.get("subject"), period_end=until.isoformat())
        return None

    async def load(self) -> None:
        """Copy the blocks of every tenant with hard limits from Redis, unless the digest is the copied one's."""
        digest = await self._client.get(digest_key(self._prefix))
        if digest is not None and digest == self._digest:
            return
        tenants = sorted(t.decode() for t in await self._client.smembers(tenants_key(self._prefix)))
        if not tenants:
            self._blocks, self._digest = {}, digest
            return
        pipe = self._client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hgetall(tenant_key(self._prefix, tenant))
        blocks: dict[str, dict[str, list[Block]]] = {}
        for tenant, found in zip(tenants, await pipe.execute()):
            blocks[tenant] = {subject.decode(): [(_matcher(glob), meter, until)
                                                 for glob, meter, until in decode_blocks(raw)]
                              for subject, raw in found.items()}
        self._blocks, self._digest = blocks, digest

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.load()
            except (RedisError, OSError, ValueError) as exc:
                log.warning("usage limits not refreshed, keeping the last copy: %s", exc)
            try:
                await asyncio.wait_for(self._stopping.wait(), self._refresh_s)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Let the refresh finish its round and end. It is asked rather than cancelled: a Redis call
        cancelled while it takes a connection from the pool can swallow the cancellation and never end."""
        if self._task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if not done:
            self._task.cancel()
            log.warning("usage limits refresh did not end within %.1f s; cancelled", timeout_s)


_MATCHERS: dict[str, Any] = {}


def _matcher(glob: str) -> Any:
    found = _MATCHERS.get(glob)
    if found is None:
        found = _MATCHERS[glob] = re.compile(fnmatch.translate(glob)).match
    return found
