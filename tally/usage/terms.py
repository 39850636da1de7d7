"""The terms of a period: which plan version billed which hours of it, and the quantities that follow.

A subscription version (plan, customer) or a plan version (an edit) takes effect for billing from the
first whole UTC hour at or after it was recorded, because usage is counted in hour windows: the hour
in which a change is made stays with the terms it was counted under. Each unit of usage is measured
against the allowance in force in the hour it was counted, the allowance being compared with the
period's usage so far; what was billed stays billed and what was free stays free, so a change never
reaches back, and a period that is over never sees a later change (docs/adr/0060).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

from tally.usage.periods import Period
from tally.usage.plans import Plan, PlanMeter, plan_of
from tally.usage.windows import HourWindow, combine

BEGINNING = datetime.min.replace(tzinfo=timezone.utc)


def billed_from(at: datetime) -> datetime:
    """The first whole UTC hour at or after `at`; the beginning for a first version ('-infinity', which
    asyncpg reads as a naive datetime.min)."""
    if at.tzinfo is None:
        return BEGINNING
    start = at.replace(minute=0, second=0, microsecond=0)
    return start if start == at else start + timedelta(hours=1)


@dataclass(frozen=True)
class Segment:
    """[start, end) of a period billed under one plan version."""

    start: datetime
    end: datetime
    plan: Plan
    version: int


@dataclass(frozen=True)
class Terms:
    period: Period
    segments: tuple[Segment, ...]

    @property
    def key(self) -> tuple:
        """What the terms are, as a value that can be compared (a kept figure holds while it is equal)."""
        return tuple((s.start, s.plan.id, s.version) for s in self.segments)

    @property
    def last(self) -> Segment:
        """The terms at the period's end: what the period's figures show and what it is closed under."""
        return self.segments[-1]

    def meters(self) -> list[str]:
        return sorted({m.meter for s in self.segments for m in s.plan.meters})

    def meter(self, meter: str) -> tuple[Segment, PlanMeter]:
        """The last segment whose plan has `meter`, with the meter's terms there."""
        return next((s, pm) for s in reversed(self.segments) if (pm := s.plan.meter(meter)) is not None)

    def overage(self, meter: str, windows: dict[datetime, HourWindow]) -> Decimal:
        """Usage past the allowance in force when it was counted."""
        return self._quantity(meter, windows, lambda plan: False)

    def billable(self, meter: str, windows: dict[datetime, HourWindow]) -> Decimal:
        """What Stripe is sent: the overage, or all usage in hours under a plan that reports usage."""
        return self._quantity(meter, windows, lambda plan: plan.report == "usage")

    def _quantity(self, meter: str, windows: dict[datetime, HourWindow], all_usage) -> Decimal:  # noqa: ANN001
        total = Decimal(0)
        for s in self.segments:
            pm = s.plan.meter(meter)
            if pm is None:
                continue
            before = combine([w for at, w in windows.items() if at < s.start])
            through = combine([w for at, w in windows.items() if at < s.end])
            total += through - before if all_usage(s.plan) else max(through - max(before, pm.included), Decimal(0))
        return total


async def terms_for(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, subject: str,
                    period: Period) -> Terms | None:
    """The period's terms from the subscription's and its plans' versions; None without a plan in it."""
    subs = await conn.fetch("select version, plan_id, effective_at from subscription_plans"
                            " where tenant = $1 and subject = $2 order by version", tenant, subject)
    plans = await conn.fetch("select * from plan_versions where tenant = $1 and plan_id = any($2::text[])"
                             " order by version", tenant, list({r["plan_id"] for r in subs}))
    changes = [billed_from(r["effective_at"]) for r in [*subs, *plans]]
    bounds = sorted({period.start, period.end, *(at for at in changes if period.start < at < period.end)})
    segments: list[Segment] = []
    for start, end in zip(bounds, bounds[1:]):
        sub = _in_force(subs, start)
        plan = sub and _in_force([p for p in plans if p["plan_id"] == sub["plan_id"]], start)
        if plan is None:
            continue
        if segments and (segments[-1].plan.id, segments[-1].version) == (plan["plan_id"], plan["version"]):
            segments[-1] = Segment(segments[-1].start, end, segments[-1].plan, segments[-1].version)
        else:
            segments.append(Segment(start, end, plan_of(plan), plan["version"]))
    return Terms(period, tuple(segments)) if segments else None


def _in_force(versions: list[asyncpg.Record], at: datetime) -> asyncpg.Record | None:
    """The newest of `versions` (oldest first) billed from `at` or earlier."""
    found = None
    for v in versions:
        if billed_from(v["effective_at"]) <= at:
            found = v
    return found
