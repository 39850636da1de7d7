"""A Catalog kept fresh in a long-running process (the gateway's products, the jobs worker, the alert evaluator):
whoever needs the meters asks for the catalog, and it is refreshed first when it is older than `poll_s` (a
one-row read while nothing moved; ADR 0140). No task of its own: a process that reads nothing reads no catalog.

An outage of PostgreSQL never reaches the caller: the last catalog is answered (at first, the deploy-time meters
alone) and the refresh is tried again `poll_s` later, so a process lives through it and catches up after.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from tally.meters.catalog import Catalog
from tally.meters.definitions import MetersConfig

log = logging.getLogger("tally.meters")

# What a refresh waits out: the database away or restarting.
OUTAGES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class LiveCatalog:
    def __init__(self, built_ins: MetersConfig, poll_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.catalog = Catalog(built_ins)
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._next = 0.0  # time.monotonic() of the next refresh
        self._lock = asyncio.Lock()
        self._failing = False

    async def current(self, pool: asyncpg.Pool | asyncpg.Connection) -> Catalog:
        """The catalog, refreshed first if `poll_s` has passed since the last try."""
        if time.monotonic() < self._next:
            return self.catalog
        async with self._lock:  # one refresh at a time; those that waited find it done
            if time.monotonic() >= self._next:
                await self._refresh(pool)
        return self.catalog

    async def fresh(self, conn: asyncpg.Pool | asyncpg.Connection, tenant: str) -> MetersConfig:
        """The tenant's meters as of now, whatever the poll: for a check that must see a change just made (a plan or
        alert rule naming a meter created a moment ago). An outage here is the caller's: the write fails with it."""
        async with self._lock:
            meters = await self.catalog.fresh(conn, tenant)
            self._next = time.monotonic() + self._poll_s
        return meters

    async def _refresh(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as the
            # refresh completes, and the stopping loop that called it would go on.
            async with asyncio.timeout(self._timeout_s):
                moved = await self.catalog.refresh(pool)
            if moved:
                log.info("meter catalog at revision %d", self.catalog.revision)
            if self._failing:
                log.info("meter catalog refreshed again")
            self._failing = False
        except OUTAGES as exc:
            if not self._failing:
                log.warning("meter catalog not refreshed, keeping revision %d: %s: %s", self.catalog.revision,
                            type(exc).__name__, exc)
            self._failing = True
        finally:
            self._next = time.monotonic() + self._poll_s
