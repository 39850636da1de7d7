"""SIGTERM in the middle of a long job stops the jobs worker at once: the job is cancelled, as a kill -9 would end
it, and its run is found interrupted next time (a backfill or a reconciliation can run for a minute)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

import asyncpg

from tally.billing.context import BillingConfig, JobContext
from tally.billing.jobs import Job, run_job, work
from tally.meters.definitions import load_meters
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
