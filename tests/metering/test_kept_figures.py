"""Kept period figures (docs/adr/0046) stay equal to figures recomputed from every window: after a change to
a recent hour, after a late event changes a settled hour, and across a plan change mid-period, which the
kept selection learns of by notification alone; without the counters, nothing is kept. Kept figures and
selections whose time alone passed are served while one refresh each computes them again (docs/adr/0162), and
only until their hard bound when it fails. Windows are committed to PostgreSQL and written to Redis by the
processor's own cache writer, as the pipeline does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from tally.schemas.counters import CounterKey, encode_state
from tally.sinks.redis_cache import RedisCounterCache
from tally.settings import Settings
from tally.usage.changes import SubjectChanges
from tally.usage.figures import UsageService
from tally.usage.plan_changes import PlanChanges
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe
from tally.usage.windows import WindowReader, hour_start

POLL_S = 0.05
SETTLE_S = 3 * 3600  # hours that ended more than two hours ago are settled, so late events can reach them

_UPSERT = """
insert into counters as c (key, tenant, meter, aggregation, window_name, window_start, window_end, subject, value,
                           count, latest_time)
values ($1, $2, 'tokens', 'SUM', 'hour', $3, $4, $5, $6, 1, $3)
on conflict (tenant, key) do update set value = c.value + excluded.value, count = c.count + 1,
    revision = c.revision + 1, updated_at = now()
returning key, tenant, meter, aggregation, window_name, window_start, window_end, subject, value, count, revision,
    updated_at
"""


class Committer:
    """Adds to an hour window the way the processor does: committed in PostgreSQL, then cached."""

    def __init__(self, db: asyncpg.Connection, settings: Settings, tenant: str, subject: str) -> None:
        self._db = db
        self._cache = RedisCounterCache(settings.redis_url, settings.redis_prefix, settings.redis_counter_ttl_s)
        self._tenant = tenant
        self._subject = subject

    async def add(self, start: datetime, value: Decimal) -> None:
        key = CounterKey(self._tenant, "tokens", "hour", start, self._subject, ()).to_text()
        r = await self._db.fetchrow(_UPSERT, key, self._tenant, start, start + timedelta(hours=1), self._subject,
                                    value)
        await self._cache.write([encode_state(r["key"], r["tenant"], r["meter"], r["aggregation"], r["window_name"],
                                              r["window_start"], r["window_end"], r["subject"], {}, str(r["value"]),
                                              r["count"], r["revision"], r["updated_at"])])
        await self._cache.flush()
        assert self._cache.errors == 0

    async def close(self) -> None:
        await self._cache.close()


async def _changed(plans: PlanChanges, tenant: str, listened: object) -> None:
    while plans.epoch(tenant) == listened:
        await asyncio.sleep(0.01)


@pytest.fixture
async def pool(settings: Settings) -> Any:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def test_kept_figures_equal_recomputed_ones(settings: Settings, db: asyncpg.Connection,
                                                  pool: asyncpg.Pool) -> None:
    tenant, subject = f"kept-{uuid.uuid4().hex[:8]}", "acme"
    await save_plan(db, tenant, Plan(id="small", meters=[PlanMeter(meter="tokens", included=100)]))
    await save_plan(db, tenant, Plan(id="large", meters=[PlanMeter(meter="tokens", included=1000, limit_mode="hard")]))
    # The period began at least five days ago, so it holds settled and recent hours.
    anchor_day = (date.today() - timedelta(days=5)).day
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="small", anchor_day=anchor_day,
                                             start_date=date.today() - timedelta(days=60)))
    client = redis.Redis.from_url(settings.redis_url)
    committer = Committer(db, settings, tenant, subject)
    now = hour_start(datetime.now(timezone.utc))
    plans = PlanChanges(settings.database_url)
    kept = UsageService(pool, WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s,
                                           settle_s=SETTLE_S), select_ttl_s=3600, kept_s=3600,
                        changes=SubjectChanges(client, settings.redis_prefix, poll_s=POLL_S), plans=plans)

    async def recomputed(spec: str = "current") -> dict[str, Any]:
        reader = WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s, settle_s=10**9)
        return await UsageService(pool, reader).usage(tenant, subject, spec=spec)

    async def equal_after_a_poll() -> dict[str, Any]:
        await asyncio.sleep(POLL_S * 2)
        figures = await kept.usage(tenant, subject)
        assert figures == await recomputed()
        assert await kept.usage(tenant, subject) is figures  # kept, not recomputed
        fresh = UsageService(pool, WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s,
                                                settle_s=10**9))
        assert await kept.history(tenant, subject) == await fresh.history(tenant, subject)
        return figures

    try:
        for h in range(1, 24 * 4, 5):
            await committer.add(now - timedelta(hours=h), Decimal(h) / 4)
        before = await equal_after_a_poll()
        assert await kept.usage(tenant, subject, spec="previous") == await recomputed("previous")

        await committer.add(now, Decimal("2.5"))  # the current hour
        recent = await equal_after_a_poll()
        assert Decimal(recent["meters"][0]["used"]) == Decimal(before["meters"][0]["used"]) + Decimal("2.5")

        await committer.add(now - timedelta(hours=11), Decimal("0.75"))  # a late event in a settled hour
        late = await equal_after_a_poll()
        assert Decimal(late["meters"][0]["used"]) == Decimal(recent["meters"][0]["used"]) + Decimal("0.75")

        while plans.epoch(tenant) is None:  # listening since the first read
            await asyncio.sleep(0.05)
        await kept.usage(tenant, subject)  # the selection kept under the listened epoch
        listened = plans.epoch(tenant)
        await subscribe(db, tenant, Subscription(subject=subject, plan_id="large", anchor_day=anchor_day,
                                                 start_date=date.today() - timedelta(days=60)))
        await asyncio.wait_for(_changed(plans, tenant, listened), 10)
        upgraded = await equal_after_a_poll()
        assert upgraded["plan"] == "large"
        assert upgraded["meters"][0]["included"] == "1000"
        assert upgraded["meters"][0]["limit_mode"] == "hard"
        assert upgraded["meters"][0]["used"] == late["meters"][0]["used"]
    finally:
        await committer.close()
        await client.aclose()


async def test_without_the_change_counters_nothing_is_kept(settings: Settings, db: asyncpg.Connection,
                                                          pool: asyncpg.Pool) -> None:
    tenant, subject = f"unkept-{uuid.uuid4().hex[:8]}", "acme"
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="tokens", included=10)]))
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="p", start_date=date.today() - timedelta(days=9)))
    client, down = redis.Redis.from_url(settings.redis_url), redis.Redis(port=1)
    committer = Committer(db, settings, tenant, subject)
    reader = WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s)
    blind = UsageService(pool, reader, changes=SubjectChanges(down, settings.redis_prefix))
    try:
        await committer.add(hour_start(datetime.now(timezone.utc)), Decimal(3))
        first = await blind.usage(tenant, subject)
        await committer.add(hour_start(datetime.now(timezone.utc)), Decimal(4))
        second = await blind.usage(tenant, subject)
        assert (first["meters"][0]["used"], second["meters"][0]["used"]) == ("3", "7")
    finally:
        await committer.close()
        await client.aclose()
        await down.aclose()


KEPT_S = 6.0  # kept 3-6 s after being computed, then served while refreshing until 9-12 s


@dataclass
class Refreshed:
    """A subject read once by a service keeping its figures and selection `KEPT_S`, with one window in a settled hour
    (`settled_at`) and one in the current hour."""

    tenant: str
    subject: str
    service: UsageService
    first: dict[str, Any]
    read_at: float  # time.monotonic() when the first read had answered
    settled_at: datetime


@contextlib.asynccontextmanager
async def _refreshed(settings: Settings, db: asyncpg.Connection, pool: asyncpg.Pool) -> AsyncIterator[Refreshed]:
    tenant, subject = f"refresh-{uuid.uuid4().hex[:8]}", "acme"
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="tokens", included=100)]))
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="p", anchor_day=(date.today() - timedelta(days=5)).day,
                                             start_date=date.today() - timedelta(days=60)))
    client = redis.Redis.from_url(settings.redis_url)
    committer = Committer(db, settings, tenant, subject)
    now = hour_start(datetime.now(timezone.utc))
    plans = PlanChanges(settings.database_url)
    service = UsageService(pool, WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s,
                                              settle_s=SETTLE_S, settled_ttl_s=KEPT_S), kept_s=KEPT_S,
                           changes=SubjectChanges(client, settings.redis_prefix, poll_s=POLL_S), plans=plans)
    try:
        await committer.add(now - timedelta(hours=10), Decimal(5))
        await committer.add(now, Decimal(2))
        await _until(lambda: asyncio.sleep(0, plans.epoch(tenant)), lambda epoch: epoch is not None)
        first = await service.usage(tenant, subject)
        assert first["meters"][0]["used"] == "7"
        yield Refreshed(tenant, subject, service, first, time.monotonic(), now - timedelta(hours=10))
    finally:
        await service.close()
        await committer.close()
        await client.aclose()


@contextlib.asynccontextmanager
async def _locked(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """Another session holding the tables a recomputation reads (selection and windows) until the block ends."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute("lock table subscriptions, counters in access exclusive mode")
            yield conn
    finally:
        await conn.close()


async def _waiting(conn: asyncpg.Connection) -> list[str]:
    """The tables other sessions of this database wait for, one entry per waiting lock."""
    return await conn.fetchval("select coalesce(array_agg(relation::regclass::text order by relation::regclass::text), "
                               "'{}') from pg_locks where not granted and database = "
                               "(select oid from pg_database where datname = current_database())")


async def _until(read: Callable[[], Awaitable[Any]], holds: Callable[[Any], bool], timeout_s: float = 10.0) -> Any:
    async def wait() -> Any:
        while not holds(found := await read()):
            await asyncio.sleep(0.05)
        return found
    return await asyncio.wait_for(wait(), timeout_s)


async def test_expired_figures_are_served_while_one_refresh_recomputes_them(settings: Settings,
                                                                            db: asyncpg.Connection,
                                                                            pool: asyncpg.Pool) -> None:
    async with _refreshed(settings, db, pool) as r:
        await asyncio.sleep(KEPT_S + 0.1)  # the figures', the selection's and the settled fold's time has passed
        async with _locked(settings) as lock:
            assert await asyncio.wait_for(r.service.usage(r.tenant, r.subject), 2) is r.first
            # One refresh each for the selection and the figures, waiting on the lock, however many reads come.
            await _until(lambda: _waiting(lock), lambda tables: len(tables) == 2)
            for _ in range(5):
                assert await r.service.usage(r.tenant, r.subject) is r.first
            await asyncio.sleep(0.2)
            assert await _waiting(lock) == ["counters", "subscriptions"]
            # A change that reaches PostgreSQL alone (no change counter moves) shows once the refresh lands.
            await lock.execute("update counters set value = value + 10 where tenant = $1 and window_start = $2",
                               r.tenant, r.settled_at)
        later = await _until(lambda: r.service.usage(r.tenant, r.subject),
                             lambda figures: figures["meters"][0]["used"] == "17")
        assert await r.service.usage(r.tenant, r.subject) is later  # kept again


async def test_a_failing_refresh_is_logged_once_and_serves_only_until_the_hard_bound(
        settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    def failures() -> float:
        return REGISTRY.get_sample_value("tally_usage_refresh_failures_total") or 0.0

    # As the gateway's read pool: the server cancels a statement waiting longer than its timeout.
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                     server_settings={"statement_timeout": "500"})
    before = failures()
    try:
        async with _refreshed(settings, db, pool) as r:
            await asyncio.sleep(KEPT_S + 0.1)
            with caplog.at_level(logging.WARNING, logger="tally.usage"):
                async with _locked(settings):
                    assert await asyncio.wait_for(r.service.usage(r.tenant, r.subject), 2) is r.first
                    await _until(lambda: asyncio.sleep(0, failures()), lambda n: n == before + 2)
                    for _ in range(5):
                        assert await r.service.usage(r.tenant, r.subject) is r.first
                    assert failures() == before + 2
                    assert len([m for m in caplog.messages if "not refreshed" in m]) == 2
                    # Past the hard bound reads recompute, and meet the failure themselves.
                    await asyncio.sleep(max(0.0, r.read_at + 2 * KEPT_S + 0.2 - time.monotonic()))
                    with pytest.raises(asyncpg.QueryCanceledError):
                        await asyncio.wait_for(r.service.usage(r.tenant, r.subject), 5)
            assert await r.service.usage(r.tenant, r.subject) == r.first
    finally:
        await pool.close()


async def test_closing_cancels_the_refreshes_under_way(settings: Settings, db: asyncpg.Connection,
                                                      pool: asyncpg.Pool) -> None:
    async with _refreshed(settings, db, pool) as r:
        await asyncio.sleep(KEPT_S + 0.1)
        async with _locked(settings) as lock:
            assert await asyncio.wait_for(r.service.usage(r.tenant, r.subject), 2) is r.first
            await _until(lambda: _waiting(lock), lambda tables: len(tables) == 2)
            await asyncio.wait_for(r.service.close(), 5)
            await _until(lambda: _waiting(lock), lambda tables: tables == [])  # their statements were cancelled
