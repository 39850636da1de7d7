"""The jobs `tally jobs` knows, by name."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from tally.billing.context import JobContext
from tally.billing.close import close_periods
from tally.billing.jobs import Job, daily, refresh_limits
from tally.billing.reconcile import default_since, reconcile
from tally.billing.stripe_report import StripeSender, report
from tally.meters import backfill
from tally.meters.catalog import Catalog
from tally.sinks.kafka import committed, high_watermarks


async def _limits(ctx: JobContext, _key: str, _now: datetime) -> dict[str, Any]:
    return {"blocked_subjects": await refresh_limits(ctx)}


LIMITS = Job("limits", _limits, lambda now: now.isoformat(timespec="seconds"),
             "decide hard-limit blocks now (the worker does it continuously)")

def sender(ctx: JobContext) -> StripeSender:
    """One sender per worker, so its circuit breaker remembers failures across runs."""
    if "stripe" not in ctx.shared:
        ctx.shared["stripe"] = StripeSender(ctx.config)
    return ctx.shared["stripe"]


async def _stripe_report(ctx: JobContext, _key: str, now: datetime) -> dict[str, Any]:
    return await report(ctx, sender(ctx), now, ctx.config.hook)


STRIPE_REPORT = Job("stripe_report", _stripe_report, daily,
                    "report billable usage of current and previous periods to Stripe Billing Meter Events", money=True)

async def _period_close(ctx: JobContext, _key: str, now: datetime) -> dict[str, Any]:
    """The last report of each period due, then its usage frozen: what follows is an adjustment."""
    reported = await report(ctx, sender(ctx), now, ctx.config.hook)
    return {**await close_periods(ctx, now), "report": reported}


PERIOD_CLOSE = Job("period_close", _period_close, lambda now: now.strftime("%Y-%m-%dT%H"),
                   "hourly: report and freeze the usage of periods past their end plus the grace", money=True)

async def _reconcile(ctx: JobContext, _key: str, now: datetime) -> dict[str, Any]:
    report_ = await reconcile(ctx, default_since(now), topic_states=ctx.config.topic_states)
    return report_.figures()


RECONCILE = Job("reconcile", _reconcile, daily,
                "daily: recompute the last two days' counter windows and record drift (no fix)")

async def _meters_backfill(ctx: JobContext, _key: str, _now: datetime) -> dict[str, Any]:
    c = ctx.config.backfill
    figures = await backfill.run(ctx.pool, Catalog(ctx.config.meters), c,
                                 partial(committed, c.kafka_bootstrap, c.consumer_group, c.events_topic),
                                 partial(high_watermarks, c.kafka_bootstrap, c.events_topic),
                                 ctx.config.hook)
    await ctx.relay_counters()  # every run: a relay that failed after the last chunk is retried by the next
    return figures


METERS_BACKFILL = Job("meters_backfill", _meters_backfill, lambda now: now.strftime("%Y-%m-%dT%H:%M"),
                      "each minute: count the stored past of new meter versions that are ready (tally meters status)")

SCHEDULED: list[Job] = [STRIPE_REPORT, PERIOD_CLOSE, RECONCILE, METERS_BACKFILL]
BY_NAME = {job.name: job for job in [LIMITS, *SCHEDULED]}
