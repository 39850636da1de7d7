"""Plans and subscriptions in PostgreSQL: what a period includes per meter, and which subject has which plan.

A plan change is a new row in `subscription_plans`; the plan of a period is the newest one that took
effect before the period ended, so an upgrade counts for the whole period it happens in (docs/adr/0040).
Every change notifies readers that keep selections (`usage.plan_changes`).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

import asyncpg
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from usage.periods import Anchor, check_zone
from usage.plan_changes import notify

SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PlanMeter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    included: Decimal = Field(ge=0)
    limit_mode: Literal["soft", "hard"] = "soft"
    overage_price: Decimal = Field(Decimal(0), ge=0)
    thresholds: list[int] = Field(default_factory=lambda: [80, 100])
    stripe_event: str | None = Field(None, description="the Stripe billing meter's event_name")

    @field_validator("thresholds")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(t <= 0 or t > 1000 for t in value):
            raise ValueError("thresholds are percentages of the included quantity, 1..1000")
        return sorted(set(value))


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=SLUG)
    name: str = ""
    report: Literal["overage", "usage"] = Field("overage", description="what is reported to Stripe")
    meters: list[PlanMeter] = Field(min_length=1)

    @field_validator("meters")
    @classmethod
    def _unique(cls, value: list[PlanMeter]) -> list[PlanMeter]:
        if len({m.meter for m in value}) != len(value):
            raise ValueError("each meter at most once per plan")
        return value


def _iso_date(value: object) -> object:
    """A date is written YYYY-MM-DD; pydantic would also read a number as a Unix time."""
    if not isinstance(value, (str, date)):
        raise ValueError("a date, YYYY-MM-DD")
    return value


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=256)
    plan_id: str = Field(pattern=SLUG)
    stripe_customer_id: str | None = None
    anchor_day: int = Field(1, ge=1, le=31)
    time_zone: str = "UTC"
    start_date: Annotated[date, BeforeValidator(_iso_date)]

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        check_zone(value)
        return value

    def anchor(self) -> Anchor:
        return Anchor(self.anchor_day, self.time_zone, self.start_date)


class UnknownPlan(LookupError):
    pass


async def save_plan(conn: asyncpg.Connection, tenant: str, plan: Plan) -> None:
    """Create or replace a plan; its meters are replaced as a whole."""
    async with conn.transaction():
        await conn.execute(
            "insert into plans (tenant, id, name, report) values ($1, $2, $3, $4)"
            " on conflict (tenant, id) do update set name = excluded.name, report = excluded.report,"
            " updated_at = now()", tenant, plan.id, plan.name, plan.report)
        await conn.execute("delete from plan_meters where tenant = $1 and plan_id = $2", tenant, plan.id)
        await conn.executemany(
            "insert into plan_meters (tenant, plan_id, meter, included, limit_mode, overage_price, thresholds,"
            " stripe_event) values ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(tenant, plan.id, m.meter, m.included, m.limit_mode, m.overage_price, m.thresholds, m.stripe_event)
             for m in plan.meters])
        await notify(conn, tenant)


def _plan(row: asyncpg.Record, meters: list[asyncpg.Record]) -> Plan:
    return Plan(id=row["id"], name=row["name"], report=row["report"], meters=[
        PlanMeter(meter=m["meter"], included=m["included"], limit_mode=m["limit_mode"],
                  overage_price=m["overage_price"], thresholds=list(m["thresholds"]), stripe_event=m["stripe_event"])
        for m in meters])


async def load_plans(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, plan_id: str | None = None) -> list[Plan]:
    rows = await conn.fetch("select id, name, report from plans where tenant = $1 and ($2::text is null or id = $2)"
                            " order by id", tenant, plan_id)
    meters = await conn.fetch("select * from plan_meters where tenant = $1 and ($2::text is null or plan_id = $2)"
                              " order by meter", tenant, plan_id)
    return [_plan(r, [m for m in meters if m["plan_id"] == r["id"]]) for r in rows]


async def subscribe(conn: asyncpg.Connection, tenant: str, sub: Subscription, at: datetime | None = None) -> None:
    """Create or update a subscription; a different plan is recorded as a plan change effective `at` (now)."""
    async with conn.transaction():
        if not await conn.fetchval("select true from plans where tenant = $1 and id = $2", tenant, sub.plan_id):
            raise UnknownPlan(f"no plan {sub.plan_id!r} for this tenant")
        previous = await conn.fetchval(
            "select plan_id from subscriptions where tenant = $1 and subject = $2 for update", tenant, sub.subject)
        await conn.execute(
            "insert into subscriptions (tenant, subject, plan_id, stripe_customer_id, anchor_day, time_zone,"
            " start_date)"
            " values ($1, $2, $3, $4, $5, $6, $7) on conflict (tenant, subject) do update set"
            " plan_id = excluded.plan_id, stripe_customer_id = excluded.stripe_customer_id,"
            " anchor_day = excluded.anchor_day, time_zone = excluded.time_zone, start_date = excluded.start_date,"
            " updated_at = now()",
            tenant, sub.subject, sub.plan_id, sub.stripe_customer_id, sub.anchor_day, sub.time_zone, sub.start_date)
        if previous != sub.plan_id:
            # The first plan holds from the beginning; a change from `at` on.
            await conn.execute(
                "insert into subscription_plans (tenant, subject, plan_id, effective_at) values ($1, $2, $3,"
                " case when $5 then '-infinity'::timestamptz else coalesce($4, now()) end)",
                tenant, sub.subject, sub.plan_id, at, previous is None)
        await notify(conn, tenant)


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(subject=row["subject"], plan_id=row["plan_id"], stripe_customer_id=row["stripe_customer_id"],
                        anchor_day=row["anchor_day"], time_zone=row["time_zone"], start_date=row["start_date"])


async def load_subscriptions(conn: asyncpg.Connection | asyncpg.Pool, tenant: str | None,
                             subject: str | None = None) -> list[tuple[str, Subscription]]:
    """(tenant, subscription) pairs; tenant None lists every tenant's (for jobs)."""
    rows = await conn.fetch(
        "select * from subscriptions where ($1::text is null or tenant = $1) and ($2::text is null or subject = $2)"
        " order by tenant, subject", tenant, subject)
    return [(r["tenant"], _subscription(r)) for r in rows]


_PLAN_AT = """
select p.id, p.name, p.report, m.meter, m.included, m.limit_mode, m.overage_price, m.thresholds, m.stripe_event
from plans p join plan_meters m on m.tenant = p.tenant and m.plan_id = p.id
where p.tenant = $1 and p.id = (select plan_id from subscription_plans where tenant = $1 and subject = $2
                                and effective_at < $3 order by effective_at desc limit 1)
order by m.meter
"""


async def plan_for_period(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, subject: str,
                          period_end: datetime) -> Plan | None:
    """The plan in force for the period ending at `period_end`: the newest change effective before it."""
    rows = await conn.fetch(_PLAN_AT, tenant, subject, period_end)
    return _plan(rows[0], rows) if rows else None
