"""Plans and subscriptions in PostgreSQL, kept as history (docs/adr/0060).

`plans`/`plan_meters` and `subscriptions` hold the current state; every version is added to
`plan_versions` and `subscription_plans` and never changed, so which terms billed which hours of a period
(`tally.usage.terms`) can be recomputed after the fact. A change names only what it changes; a subscription's
anchor, zone and start date are fixed once its first period has begun, because they define the periods.
Every change notifies readers that keep selections (`tally.usage.plan_changes`).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tally.meters import rules
from tally.meters.definitions import MetersConfig
from tally.meters.rules import Refused
from tally.usage.periods import Anchor, NotStarted, PeriodError, check_zone, period_at
from tally.usage.plan_changes import notify

SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TEXT = r"^[^\x00]*$"  # PostgreSQL cannot store NUL characters
LOCK = 4002  # advisory lock class: one writer per plan, per subscription and per tenant's count at a time


class PlanMeter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    included: Decimal = Field(ge=0)
    limit_mode: Literal["soft", "hard"] = "soft"
    overage_price: Decimal = Field(Decimal(0), ge=0)
    thresholds: list[int] = Field(default_factory=lambda: [80, 100], max_length=20)
    stripe_event: str | None = Field(None, max_length=100, pattern=TEXT,
                                     description="the Stripe billing meter's event_name")

    @field_validator("thresholds")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(t <= 0 or t > 1000 for t in value):
            raise ValueError("thresholds are percentages of the included quantity, 1..1000")
        return sorted(set(value))


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=SLUG)
    name: str = Field("", max_length=200, pattern=TEXT)
    report: Literal["overage", "usage"] = Field("overage", description="what is reported to Stripe")
    meters: list[PlanMeter] = Field(min_length=1, max_length=50)

    @field_validator("meters")
    @classmethod
    def _unique(cls, value: list[PlanMeter]) -> list[PlanMeter]:
        if len({m.meter for m in value}) != len(value):
            raise ValueError("each meter at most once per plan")
        return value

    def meter(self, meter: str) -> PlanMeter | None:
        return next((m for m in self.meters if m.meter == meter), None)


def _iso_date(value: object) -> object:
    """A date is written YYYY-MM-DD; pydantic would also read a number as a Unix time."""
    if not isinstance(value, (str, date)):
        raise ValueError("a date, YYYY-MM-DD")
    return value


class Subscription(BaseModel):
    """A subscription's current state (a row of `subscriptions`)."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=256)
    plan_id: str = Field(pattern=SLUG)
    stripe_customer_id: str | None = Field(None, max_length=255, pattern=TEXT)
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


class SubscriptionChange(BaseModel):
    """What a `PUT /v1/subscriptions/{subject}` or `tally subscriptions set` names; the rest is kept.

    Creating a subscription needs `plan_id`; the anchor defaults to day 1 in UTC from today."""

    model_config = ConfigDict(extra="forbid")

    plan_id: str | None = Field(None, pattern=SLUG)
    stripe_customer_id: str | None = Field(None, max_length=255, pattern=TEXT,
                                           description="null removes the customer")
    anchor_day: int | None = Field(None, ge=1, le=31)
    time_zone: str | None = Field(None, max_length=64)
    start_date: date | None = None

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            check_zone(value)
        return value


class UnknownPlan(LookupError):
    pass


class QuotaExceeded(Exception):
    """A tenant already has as many plans or subscriptions as the setting allows (a 409)."""


def check_meters(plan: Plan, meters: MetersConfig) -> None:
    """Refuse plan meters a period cannot be billed from (`tally.meters.rules.billable`): unknown, or known but
    not billable, with the reason."""
    configured = {m.slug: m for m in meters.meters}
    errors = []
    for i, pm in enumerate(plan.meters):
        meter = configured.get(pm.meter)
        problems = ([f"no meter {pm.meter!r} is defined for this tenant"] if meter is None
                    else [e["message"] for e in rules.billable(meter)])
        errors += [{"field": f"meters.{i}.meter", "message": problem} for problem in problems]
    if errors:
        raise Refused(errors)


async def _lock(conn: asyncpg.Connection, *key: str) -> None:
    """Until the transaction ends: two writers of one plan or subscription (or of one tenant's count) take
    turns, so neither numbers a version the other took nor creates a row the other is creating."""
    await conn.execute("select pg_advisory_xact_lock($1, hashtext($2))", LOCK, "\x1f".join(key))


async def _within_quota(conn: asyncpg.Connection, tenant: str, table: str, bound: int | None, setting: str) -> None:
    """Inside the transaction that adds a row: the tenant lock makes the count and the insert one step."""
    if bound is None:
        return
    await _lock(conn, table, tenant)
    if await conn.fetchval(f"select count(*) from {table} where tenant = $1", tenant) >= bound:  # table: ours, not input
        raise QuotaExceeded(f"this tenant has {bound} {table}, the most {setting} allows")


async def save_plan(conn: asyncpg.Connection, tenant: str, plan: Plan, max_plans: int | None = None) -> int:
    """Create a plan or add a version of it (effective now); returns the version. Meters are replaced whole;
    saving the plan as it is adds no version."""
    meters = [m.model_dump(mode="json") for m in plan.meters]
    async with conn.transaction():
        await _lock(conn, "plan", tenant, plan.id)
        current = await conn.fetchrow(
            "select v.* from plans p join plan_versions v on v.tenant = p.tenant and v.plan_id = p.id"
            " and v.version = p.version where p.tenant = $1 and p.id = $2", tenant, plan.id)
        if current is not None and (current["name"], current["report"], orjson.loads(current["meters"])) == (
                plan.name, plan.report, meters):
            return current["version"]
        if current is None:
            await _within_quota(conn, tenant, "plans", max_plans, "TALLY_USAGE_MAX_PLANS")
        version = await conn.fetchval(
            "insert into plans (tenant, id, name, report) values ($1, $2, $3, $4) on conflict (tenant, id) do update"
            " set name = excluded.name, report = excluded.report, version = plans.version + 1, updated_at = now()"
            " returning version", tenant, plan.id, plan.name, plan.report)
        await conn.execute(
            "insert into plan_versions (tenant, plan_id, version, name, report, meters, effective_at)"
            " values ($1, $2, $3, $4, $5, $6::jsonb, case when $3 = 1 then '-infinity'::timestamptz else now() end)",
            tenant, plan.id, version, plan.name, plan.report, orjson.dumps(meters).decode())
        await conn.execute("delete from plan_meters where tenant = $1 and plan_id = $2", tenant, plan.id)
        await conn.executemany(
            "insert into plan_meters (tenant, plan_id, meter, included, limit_mode, overage_price, thresholds,"
            " stripe_event) values ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(tenant, plan.id, m.meter, m.included, m.limit_mode, m.overage_price, m.thresholds, m.stripe_event)
             for m in plan.meters])
        await notify(conn, tenant)
    return version


def plan_of(row: asyncpg.Record) -> Plan:
    """A plan version from its `plan_versions` row (trusted: validated when it was saved)."""
    return Plan.model_construct(id=row["plan_id"], name=row["name"], report=row["report"],
                                meters=[PlanMeter.model_construct(**{**m, "included": Decimal(m["included"]),
                                                                     "overage_price": Decimal(m["overage_price"])})
                                        for m in orjson.loads(row["meters"])])


async def load_plans(conn: asyncpg.Connection | asyncpg.Pool, tenant: str,
                     plan_id: str | None = None) -> list[tuple[int, Plan]]:
    """The current version of each plan (or of one), as (version, plan)."""
    rows = await conn.fetch(
        "select v.* from plans p join plan_versions v on v.tenant = p.tenant and v.plan_id = p.id"
        " and v.version = p.version where p.tenant = $1 and ($2::text is null or p.id = $2) order by p.id",
        tenant, plan_id)
    return [(r["version"], plan_of(r)) for r in rows]


async def plan_history(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, plan_id: str) -> list[dict[str, Any]]:
    """Every version of a plan, oldest first, as the API shows them."""
    rows = await conn.fetch("select * from plan_versions where tenant = $1 and plan_id = $2 order by version",
                            tenant, plan_id)
    return [{"version": r["version"], "effective_at": _instant(r["effective_at"]),
             "recorded_at": _instant(r["recorded_at"]), **plan_of(r).model_dump(mode="json")} for r in rows]


def _instant(at: datetime) -> str | None:
    """An ISO instant; None for '-infinity' (asyncpg's naive datetime.min): from the beginning."""
    return at.isoformat() if at.tzinfo is not None else None


def _periods_began(sub: Subscription, now: datetime) -> bool:
    try:
        period_at(sub.anchor(), now)
    except NotStarted:
        return False
    except PeriodError:
        return True  # a stored anchor that no longer computes: not to be moved by a change either
    return True


async def change_subscription(conn: asyncpg.Connection, tenant: str, subject: str, change: SubscriptionChange,
                              max_subscriptions: int | None = None) -> Subscription:
    """Create a subscription or apply a change to it; returns its new state.

    A different plan or customer is a new version, effective now. The anchor day, zone and start date
    define the periods, so once the first period has begun they can no longer change (docs/adr/0060)."""
    named = change.model_dump(exclude_unset=True)
    async with conn.transaction():
        await _lock(conn, "subscription", tenant, subject)
        row = await conn.fetchrow("select * from subscriptions where tenant = $1 and subject = $2",
                                  tenant, subject)
        now = await conn.fetchval("select now()")
        if row is None:
            if change.plan_id is None:
                raise Refused([{"field": "plan_id", "message": "required to create a subscription"}])
            await _within_quota(conn, tenant, "subscriptions", max_subscriptions, "TALLY_USAGE_MAX_SUBSCRIPTIONS")
            zone = change.time_zone or "UTC"
            current = None
            new = Subscription(subject=subject, plan_id=change.plan_id, stripe_customer_id=change.stripe_customer_id,
                               anchor_day=change.anchor_day or 1, time_zone=zone,
                               start_date=change.start_date or now.astimezone(ZoneInfo(zone)).date())
        else:
            current = subscription_of(row)
            new = current.model_copy(update=named)
            moved = [f for f in ("anchor_day", "time_zone", "start_date") if getattr(new, f) != getattr(current, f)]
            if moved and _periods_began(current, now):
                raise Refused([{"field": f, "message": f"{f} cannot change once the subscription's first period has"
                                " begun: it would re-label, re-open or skip billed periods (docs/adr/0060)"}
                               for f in moved])
        if current is None or new.plan_id != current.plan_id:
            if not await conn.fetchval("select true from plans where tenant = $1 and id = $2", tenant, new.plan_id):
                raise UnknownPlan(f"no plan {new.plan_id!r} for this tenant")
        await conn.execute(
            "insert into subscriptions (tenant, subject, plan_id, stripe_customer_id, anchor_day, time_zone,"
            " start_date) values ($1, $2, $3, $4, $5, $6, $7) on conflict (tenant, subject) do update set"
            " plan_id = excluded.plan_id, stripe_customer_id = excluded.stripe_customer_id,"
            " anchor_day = excluded.anchor_day, time_zone = excluded.time_zone, start_date = excluded.start_date,"
            " updated_at = now()",
            tenant, subject, new.plan_id, new.stripe_customer_id, new.anchor_day, new.time_zone, new.start_date)
        if current is None or (new.plan_id, new.stripe_customer_id) != (current.plan_id, current.stripe_customer_id):
            # The first version holds from the beginning; a change from now on (billed from the next hour).
            await conn.execute(
                "insert into subscription_plans (tenant, subject, version, plan_id, stripe_customer_id, effective_at)"
                " select $1, $2, coalesce(max(version), 0) + 1, $3, $4,"
                " case when count(*) = 0 then '-infinity'::timestamptz else now() end"
                " from subscription_plans where tenant = $1 and subject = $2",
                tenant, subject, new.plan_id, new.stripe_customer_id)
        await notify(conn, tenant)
    return new


async def subscribe(conn: asyncpg.Connection, tenant: str, sub: Subscription) -> Subscription:
    """Create or change a subscription naming every field."""
    change = SubscriptionChange(**sub.model_dump(exclude={"subject"}))
    return await change_subscription(conn, tenant, sub.subject, change)


def subscription_of(row: asyncpg.Record) -> Subscription:
    """A stored subscription, trusted (validated when written): a zone that no longer gives whole-hour
    midnights shows as a PeriodError where its periods are computed, for that subscription alone."""
    return Subscription.model_construct(subject=row["subject"], plan_id=row["plan_id"],
                                        stripe_customer_id=row["stripe_customer_id"], anchor_day=row["anchor_day"],
                                        time_zone=row["time_zone"], start_date=row["start_date"])


async def load_subscriptions(conn: asyncpg.Connection | asyncpg.Pool, tenant: str | None,
                             subject: str | None = None) -> list[tuple[str, Subscription]]:
    """(tenant, subscription) pairs; tenant None lists every tenant's (for jobs)."""
    rows = await conn.fetch(
        "select * from subscriptions where ($1::text is null or tenant = $1) and ($2::text is null or subject = $2)"
        " order by tenant, subject", tenant, subject)
    return [(r["tenant"], subscription_of(r)) for r in rows]


async def subscription_history(conn: asyncpg.Connection | asyncpg.Pool, tenant: str,
                               subject: str) -> list[dict[str, Any]]:
    """Every version of a subscription, oldest first, as the API shows them."""
    rows = await conn.fetch("select * from subscription_plans where tenant = $1 and subject = $2 order by version",
                            tenant, subject)
    return [{"version": r["version"], "plan_id": r["plan_id"], "stripe_customer_id": r["stripe_customer_id"],
             "effective_at": _instant(r["effective_at"]), "recorded_at": _instant(r["recorded_at"])} for r in rows]


async def plans_using(conn: asyncpg.Connection, tenant: str, meter: str) -> list[str]:
    """The plans with a version still in use that names the meter: the current version, or an earlier one a
    subscriber was on when it was superseded while that subscriber's period holding the change is not yet closed
    (it still bills the hours before the change)."""
    rows = await conn.fetch(
        "select distinct v.plan_id from plan_versions v left join plan_versions n on n.tenant = v.tenant"
        " and n.plan_id = v.plan_id and n.version = v.version + 1"
        " where v.tenant = $1 and v.meters @> jsonb_build_array(jsonb_build_object('meter', $2::text))"
        " and (n.version is null or exists (select from subscription_plans s where s.tenant = v.tenant"
        " and s.plan_id = v.plan_id and s.effective_at < n.effective_at and not exists (select from period_usage u"
        " where u.tenant = s.tenant and u.subject = s.subject and u.meter = $2 and u.period_end >= n.effective_at)))"
        " order by v.plan_id", tenant, meter)
    return [f"plan {r['plan_id']!r}" for r in rows]
