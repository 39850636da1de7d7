"""The jobs worker: runs each due job once per key (its period or day), records every run (and prunes those ADR
0163 lets go), and keeps the hard-limit blocks fresh between runs.

Two workers (or a worker and `tally jobs run`) never run one job for one key at once: the run holds a
PostgreSQL advisory lock on hashtext("job:key") for its duration, and a key whose run ended `ok` is
not run again by the worker. A job that fails is recorded `failed` and tried again on a later tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson

from tally.billing import metrics
from tally.billing.context import JobContext
from tally.usage import alerts, limits

log = logging.getLogger("tally.jobs")

LOCK_CLASS = 4000  # the first key of the two-int advisory lock: job runs
PRUNE_EVERY_S = 3600.0  # job_runs grows by a few thousand rows a day (a backfill key a minute): hourly is plenty
_PRUNE_BATCH = 1000

Run = Callable[[JobContext, str, datetime], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Job:
    name: str
    run: Run
    key: Callable[[datetime], str]  # the key of the run due at this moment
    doc: str
    money: bool = False  # its runs record what was reported to Stripe or frozen: kept for ever, never pruned


def daily(now: datetime) -> str:
    return now.astimezone(timezone.utc).date().isoformat()


@dataclass(frozen=True)
class RunResult:
    job: str
    key: str
    status: str  # ok, failed, busy (another worker holds it), done (already ok)
    figures: dict[str, Any]


async def run_job(ctx: JobContext, job: Job, key: str, now: datetime | None = None,
                  force: bool = False) -> RunResult:
    """One run of `job` for `key` under its advisory lock, recorded in job_runs."""
    now = now or datetime.now(timezone.utc)
    async with ctx.pool.acquire() as conn:
        if not await conn.fetchval("select pg_try_advisory_lock($1, hashtext($2))", LOCK_CLASS, f"{job.name}:{key}"):
            return RunResult(job.name, key, "busy", {})
        try:
            if not force and await conn.fetchval(
                    "select true from job_runs where job = $1 and run_key = $2 and status = 'ok' limit 1",
                    job.name, key):
                return RunResult(job.name, key, "done", {})
            # A run still marked running under a lock we now hold was interrupted (kill -9).
            await conn.execute("update job_runs set status = 'failed', finished_at = now(), error = 'interrupted'"
                               " where job = $1 and run_key = $2 and status = 'running'", job.name, key)
            run_id = await conn.fetchval("insert into job_runs (job, run_key, status) values ($1, $2, 'running')"
                                         " returning id", job.name, key)
            try:
                figures = await job.run(ctx, key, now)
            except Exception as exc:
                log.exception("job %s for %s failed", job.name, key)
                await conn.execute("update job_runs set status = 'failed', finished_at = now(), error = $2"
                                   " where id = $1", run_id, f"{type(exc).__name__}: {exc}")
                return RunResult(job.name, key, "failed", {"error": str(exc)})
            await conn.execute("update job_runs set status = 'ok', finished_at = now(), figures = $2::jsonb"
                               " where id = $1", run_id, orjson.dumps(figures, default=str).decode())
            return RunResult(job.name, key, "ok", figures)
        finally:
            await conn.execute("select pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, f"{job.name}:{key}")


async def prune_runs(pool: asyncpg.Pool, jobs: list[Job], days: int) -> int:
    """Delete runs of `jobs` that move no money, started more than `days` ago, a batch at a time, oldest first.

    Nothing reads them: the worker looks for an `ok` run of the key due now only (a day or shorter) and
    `tally jobs run` forces its run. Runs of money jobs stay, and so do those of a job not named here.
    """
    names = [job.name for job in jobs if not job.money]
    if not days or not names:
        return 0
    pruned = 0
    while True:
        gone = await pool.fetchval(
            "with gone as (delete from job_runs where id = any(array("
            " select id from job_runs where job = any($1) and started_at < now() - make_interval(days => $2)"
            " order by id limit $3)) returning 1) select count(*) from gone", names, days, _PRUNE_BATCH)
        pruned += gone
        if gone < _PRUNE_BATCH:
            return pruned


async def refresh_limits(ctx: JobContext) -> int:
    c = ctx.config
    return await limits.refresh(ctx.pool, ctx.reader, ctx.redis, c.redis_prefix, await ctx.catalog(), c.limits_ttl_s)


async def _refresh_limits(ctx: JobContext) -> None:
    metrics.BLOCKED_SUBJECTS.set(await refresh_limits(ctx))


async def _detect_alerts(ctx: JobContext) -> None:
    """Record the thresholds crossed; `tally alerts` publishes and delivers them (tally/alerts/usage.py)."""
    await alerts.detect(ctx.pool, ctx.reader, await ctx.catalog(), ctx.config.late_horizon_s)


async def _prune_runs(ctx: JobContext, jobs: list[Job]) -> None:
    pruned = await prune_runs(ctx.pool, jobs, ctx.config.job_runs_retention_days)
    if pruned:
        log.info("pruned %d job runs older than %d days", pruned, ctx.config.job_runs_retention_days)


async def _every(seconds: float, what: str, call: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    """`call` every `seconds` until `stop`. The loop ends on the event as well as on cancellation: a library may
    swallow a cancellation (redis-py connects under asyncio.wait_for, which on Python 3.11 drops a cancel that
    arrives as the connection completes), and the worker would never stop."""
    while not stop.is_set():
        try:
            await call()
        except Exception:
            log.exception("%s failed", what)
        await _pause(stop, seconds)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Until `stop`, for at most `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _tick(ctx: JobContext, jobs: list[Job], stop: asyncio.Event) -> None:
    """Each job once per key when due (none after `stop`), then the report-row figures."""
    now = datetime.now(timezone.utc)
    for job in jobs:
        if stop.is_set():
            return
        try:
            result = await run_job(ctx, job, job.key(now), now)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # PostgreSQL stopped or restarting: wait it out here rather than exit; the next tick tries again
            log.warning("jobs not run: the database is unreachable (%s); trying again in %g s", exc, ctx.config.tick_s)
            break
        if result.status in ("ok", "failed"):
            log.info("job %s for %s: %s %s", job.name, result.key, result.status, result.figures)
    try:
        await metrics.read_report_rows(ctx.pool)  # each tick: `tally billing retry` and others move rows too
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.debug("report rows not counted: %s", exc)


async def work(ctx: JobContext, jobs: list[Job], stop: asyncio.Event) -> None:
    """Until `stop`: refresh hard limits and usage alerts continuously, run each job once per key when due, and
    prune old runs (`prune_runs`) at start and hourly.

    A stop in the middle of a job (a backfill or a reconciliation can run for a minute) cancels it: it ends as a
    kill -9 would, which every job survives (its transaction rolls back, its run is marked interrupted next time),
    so SIGTERM stops the worker at once rather than after the job."""
    c = ctx.config
    loops = [asyncio.create_task(_every(c.limits_refresh_s, "hard-limit refresh", partial(_refresh_limits, ctx), stop)),
             asyncio.create_task(_every(c.alerts_refresh_s, "usage alerts", partial(_detect_alerts, ctx), stop)),
             asyncio.create_task(_every(PRUNE_EVERY_S, "job-run retention", partial(_prune_runs, ctx, jobs), stop))]
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            tick = asyncio.create_task(_tick(ctx, jobs, stop))
            await asyncio.wait({tick, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not tick.done():
                tick.cancel()
                await asyncio.gather(tick, return_exceptions=True)
                break
            tick.result()
            await _pause(stop, c.tick_s)
    finally:
        stopping.cancel()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(stopping, *loops, return_exceptions=True)
