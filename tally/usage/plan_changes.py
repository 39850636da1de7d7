"""Which tenants' plans or subscriptions changed: `save_plan` and `subscribe` notify on commit, and a reader
that keeps selections listens, so it can keep them until a change instead of for a few seconds.

`epoch(tenant)` changes with every notification for the tenant. It is None while the listening connection
is not up (it is opened on first use, and again after it broke, in the background), and then nothing may
be kept longer than its fixed time: notifications sent meanwhile are lost (docs/adr/0046).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import asyncpg

CHANNEL = "tally_plans"

log = logging.getLogger("tally.usage")


async def notify(conn: asyncpg.Connection, tenant: str) -> None:
    """Inside the writing transaction: PostgreSQL delivers it on commit, and never after a rollback."""
    await conn.execute("select pg_notify($1, $2)", CHANNEL, tenant)


class PlanChanges:
    def __init__(self, dsn: str, retry_s: float = 5.0) -> None:
        self._dsn = dsn
        self._retry_s = retry_s
        self._conn: asyncpg.Connection | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._retry_at = 0.0
        self._connections = 0  # a part of every epoch, so one from before a break never matches
        self._epochs: dict[str, int] = {}

    def epoch(self, tenant: str) -> tuple[int, int] | None:
        if self._conn is None or self._conn.is_closed():
            self._listen()
            return None
        return self._connections, self._epochs.get(tenant, 0)

    def _listen(self) -> None:
        if self._connecting is None and time.monotonic() >= self._retry_at:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=5)
            await conn.add_listener(CHANNEL, self._notified)
            self._connections += 1
            self._conn = conn
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            log.warning("plan changes not listened to, selections kept seconds only: %s", exc)
            self._retry_at = time.monotonic() + self._retry_s
        finally:
            self._connecting = None

    async def close(self) -> None:
        """At shutdown: waits for a connection being opened (it gives up within its timeout), closes the listening
        one, and opens none again."""
        self._retry_at = math.inf
        if self._connecting is not None:
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _notified(self, conn: object, pid: int, channel: str, tenant: object) -> None:
        self._epochs[str(tenant)] = self._epochs.get(str(tenant), 0) + 1
