"""The jobs worker prunes job_runs: runs of jobs that move no money go once older than the retention, a batch at
a time; runs within it, every run of a money job (Stripe report, period close) and of a job it does not know stay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import asyncpg

from tally.billing.context import BillingConfig, JobContext
from tally.billing.jobs import Job, work
from tally.meters.definitions import load_meters
from tally.settings import Settings
from tests.metering.helpers import METERS
from tests.processor.helpers import wait_for


async def _ran(_ctx: JobContext, _key: str, _now: datetime) -> dict:
    return {"ran": True}


async def _runs(db: asyncpg.Connection, job: str) -> dict[str, int]:
    rows = await db.fetch("select run_key, count(*) as n from job_runs where job = $1 group by run_key", job)
    return {row["run_key"]: row["n"] for row in rows}


async def test_old_runs_of_jobs_that_move_no_money_are_pruned(isolated: Settings, db: asyncpg.Connection) -> None:
    tag = uuid.uuid4().hex[:8]
    plain = [Job(f"plain-{n}-{tag}", _ran, lambda _now: "now", "moves no money") for n in range(2)]
    money = Job(f"money-{tag}", _ran, lambda _now: "now", "reports to Stripe", money=True)
    unknown = f"unknown-{tag}"  # a job this worker does not run (renamed, or run by hand)
    for name in [*(job.name for job in plain), money.name, unknown]:
        # 2,500 old runs (more than one batch), ok and failed, and one within the retention
        await db.execute("insert into job_runs (job, run_key, status, started_at, finished_at)"
                         " select $1, 'old', case when n % 2 = 0 then 'ok' else 'failed' end,"
                         "        now() - interval '31 days' - n * interval '1 second', now() - interval '31 days'"
                         " from generate_series(1, 2500) n", name)
        await db.execute("insert into job_runs (job, run_key, status, started_at, finished_at)"
                         " values ($1, 'recent', 'ok', now() - interval '29 days', now() - interval '29 days')", name)
    config = BillingConfig(isolated.database_url, isolated.redis_url, isolated.redis_prefix,
                           isolated.redis_counter_ttl_s, load_meters(inline=METERS), tick_s=0.2,
                           job_runs_retention_days=30)
    ctx = await JobContext.open(config)
    stop = asyncio.Event()
    worker = asyncio.create_task(work(ctx, [*plain, money], stop))
    try:
        async def pruned() -> bool:
            return not await db.fetchval("select count(*) from job_runs where job = any($1) and run_key = 'old'",
                                         [job.name for job in plain])
        await wait_for(pruned, 60, "the old runs of the jobs that move no money to be pruned")
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        await ctx.close()
    for job in plain:
        assert await _runs(db, job.name) == {"recent": 1, "now": 1}
    assert await _runs(db, money.name) == {"old": 2500, "recent": 1, "now": 1}
    assert await _runs(db, unknown) == {"old": 2500, "recent": 1}
