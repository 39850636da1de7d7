"""SIGTERM in the middle of a long job stops the jobs worker at once: the job is cancelled, as a kill -9 would end
it, and its run is found interrupted next time (a backfill or a reconciliation can run for a minute). A stop at any
moment of start-up ends the worker too. On Python 3.11 asyncio.wait_for drops a cancellation that arrives as what it
waits for completes: the catalog refresh no longer uses it, and the worker's loops end on the stop event as well,
since redis-py still connects under it."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

import asyncpg

from tally.billing.context import BillingConfig, JobContext
from tally.billing.jobs import Job, run_job, work
from tally.billing.registry import SCHEDULED
from tally.meters.definitions import DEFAULT_METERS, load_meters
from tally.meters.fresh import LiveCatalog
from tally.settings import Settings
from tests.metering.helpers import METERS


async def test_a_stop_during_a_long_job_ends_the_worker_at_once(isolated: Settings, db: asyncpg.Connection) -> None:
    started = asyncio.Event()

    async def long_job(_ctx: JobContext, _key: str, _now: datetime) -> dict:
        started.set()
        await asyncio.sleep(3600)
        return {}

    name = f"long-{uuid.uuid4().hex[:8]}"
    job = Job(name, long_job, lambda _now: "once", "a job that outlasts any stop")
    config = BillingConfig(isolated.database_url, isolated.redis_url, isolated.redis_prefix,
                           isolated.redis_counter_ttl_s, load_meters(inline=METERS), tick_s=0.2)
    ctx = await JobContext.open(config)
    try:
        stop = asyncio.Event()
        worker = asyncio.create_task(work(ctx, [job], stop))
        await asyncio.wait_for(started.wait(), 30)
        stop.set()
        began = time.monotonic()
        await asyncio.wait_for(worker, 10)
        assert time.monotonic() - began < 5
        assert await db.fetchval("select status from job_runs where job = $1", name) == "running"

        async def quick(_ctx: JobContext, _key: str, _now: datetime) -> dict:
            return {"ran": True}

        result = await run_job(ctx, Job(name, quick, job.key, job.doc), "once")
        assert result.status == "ok"
        assert [r["status"] for r in await db.fetch("select status from job_runs where job = $1 order by id", name)] \
            == ["failed", "ok"]  # the cancelled run was found interrupted
    finally:
        await ctx.close()


async def test_a_refresh_cancelled_as_it_completes_stays_cancelled(db: asyncpg.Connection) -> None:
    live = LiveCatalog(DEFAULT_METERS, poll_s=0)
    refresh = live.catalog.refresh
    reading: asyncio.Task | None = None

    async def completes_as_cancelled(conn: asyncpg.Connection) -> bool:
        moved = await refresh(conn)
        assert reading is not None
        reading.cancel()  # the stop arrives in the very step the refresh completes
        return moved

    live.catalog.refresh = completes_as_cancelled  # type: ignore[method-assign]
    reading = asyncio.create_task(live.current(db))
    done, _ = await asyncio.wait({reading}, timeout=10)
    assert done and reading.cancelled(), "the cancellation was swallowed: the caller's loop would go on"


async def test_a_stop_at_any_moment_of_start_up_ends_the_worker(isolated: Settings) -> None:
    config = BillingConfig(isolated.database_url, isolated.redis_url, isolated.redis_prefix,
                           isolated.redis_counter_ttl_s, load_meters(inline=METERS), tick_s=0.2)
    for n in range(50):
        ctx = await JobContext.open(config)
        try:
            stop = asyncio.Event()
            worker = asyncio.create_task(work(ctx, SCHEDULED, stop))
            await asyncio.sleep(n % 10 * 0.01)
            stop.set()
            done, _ = await asyncio.wait({worker}, timeout=10)
            assert done, f"the worker went on after a stop {n % 10 * 10} ms after it started"
            worker.result()
        finally:
            await ctx.close()
