"""Subscriptions and plans as history (billing review C1, H1, M2, L5; security review M4): a change keeps
what it does not name, never re-labels or re-opens a period, is billed from the next whole hour on
(docs/adr/0060), and an edited plan never re-bills a closed period."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tally.billing.accounts import set_account
from tally.billing.close import close_periods
from tally.billing.context import BillingConfig, JobContext
from tally.meters.definitions import load_meters
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.metering.helpers import METERS, account_of, metered, pipeline, run_tally, tenant_keys
from tests.metering.stripe_double import stripe_double
from tests.metering.test_usage_api import _zone_past_midnight
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running
from tally.usage.figures import Unreadable, UsageService
from tally.usage.limits import decide
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe

ZONE = "Europe/Berlin"
UNBILLABLE = """
  - {slug: visitors, event_type: "page.view", aggregation: UNIQUE_COUNT, value_path: data.user, windows: [hour]}
  - {slug: daily_calls, event_type: "api.call", windows: [day]}
  - {slug: calls_by_route, event_type: "api.call", group_by: {route: data.route}, windows: [hour]}
"""


def _calls(tenant: str, subject: str, at: datetime, n: int, first: int) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [Envelope(id=f"{subject}-{first + i}", source="app", type="api.call", subject=subject,
                     time=at + timedelta(seconds=i), received_at=now, data={}, tenant=tenant) for i in range(n)]


def _anchor() -> tuple[int, date]:
    """An anchor whose current period began at least three hours ago and runs for weeks more."""
    day = (datetime.now(timezone.utc) - timedelta(hours=3)).astimezone(ZoneInfo(ZONE)).date()
    return day.day, day - timedelta(days=60)


def _after_the_change() -> datetime:
    """A moment in the first whole hour a change made before now is billed from."""
    now = datetime.now(timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1, minutes=5)


def _plan(plan_id: str, included: int) -> dict:
    return {"id": plan_id, "meters": [{"meter": "api_calls", "included": included, "stripe_event": "api_calls"}]}


async def _sent(db: asyncpg.Connection, customer: str) -> list[asyncpg.Record]:
    return await db.fetch("select period_label, value, status from stripe_reports where stripe_customer_id = $1"
                          " order by seq", customer)


async def _report(settings: Settings, db: asyncpg.Connection, env: dict[str, str], tenant: str,
                  calls: dict[str, tuple[datetime, int, int]]) -> None:
    """Produce each subject's calls (at, how many, first number), let the processor count them, run the Stripe
    report job once."""
    produce(settings, [event for subject, (at, n, first) in calls.items()
                       for event in _calls(tenant, subject, at, n, first)])
    await wait_for(lambda: drained(settings, db), 60, "the processor")
    code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
    assert code == 0, out


async def test_upgrade_and_downgrade_through_the_api_keep_the_subscription_and_bill_per_the_adr(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant, admin, _ = await tenant_keys(settings)
    anchor_day, start = _anchor()
    up, down = f"up-{uuid.uuid4().hex[:6]}", f"down-{uuid.uuid4().hex[:6]}"
    with stripe_double() as double, pipeline(settings) as gw:
        env = {"TALLY_STRIPE_API_BASE": double.url}
        async with gw.client(admin) as api:
            for plan_id, included in (("basic", 10), ("pro", 20)):
                assert (await api.post("/v1/plans", json=_plan(plan_id, included))).status_code == 201
            for subject, plan_id in ((up, "basic"), (down, "pro")):
                answer = await api.put(f"/v1/subscriptions/{subject}", json={
                    "plan_id": plan_id, "stripe_customer_id": f"cus_{subject}", "anchor_day": anchor_day,
                    "time_zone": ZONE, "start_date": start.isoformat()})
                assert answer.status_code == 200, answer.text
            before = datetime.now(timezone.utc) - timedelta(minutes=2)
            await _report(settings, db, env, tenant, {up: (before, 18, 0), down: (before, 15, 0)})
            label = (await _sent(db, f"cus_{up}"))[0]["period_label"]
            assert [r["value"] for r in await _sent(db, f"cus_{up}")] == [8]

            # Only the plan is named: start_date is not required on a change, nothing else moves.
            for subject, plan_id in ((up, "pro"), (down, "basic")):
                answer = await api.put(f"/v1/subscriptions/{subject}", json={"plan_id": plan_id})
                assert answer.status_code == 200, answer.text
            await _report(settings, db, env, tenant, {up: (_after_the_change(), 5, 100),
                                                      down: (_after_the_change(), 5, 100)})

            shown = (await api.get(f"/v1/subscriptions/{up}")).json()
            usage = (await api.get("/v1/usage", params={"subject": up})).json()

    assert (shown["plan_id"], shown["stripe_customer_id"], shown["anchor_day"], shown["time_zone"],
            shown["start_date"]) == ("pro", f"cus_{up}", anchor_day, ZONE, start.isoformat())
    assert [v["plan_id"] for v in shown["versions"]] == ["basic", "pro"]
    assert {v["stripe_customer_id"] for v in shown["versions"]} == {f"cus_{up}"}
    # Upgrade: 8 billed under basic stays billed; after it, pro's 20 are free, then 3 more.
    assert {r["period_label"] for r in await _sent(db, f"cus_{up}")} == {label}
    assert sum(r["value"] for r in await _sent(db, f"cus_{up}")) == 8 + (23 - 20)
    # Downgrade: nothing over pro's 20 before it; every call after it is past basic's 10.
    assert {r["period_label"] for r in await _sent(db, f"cus_{down}")} == {label}
    assert sum(r["value"] for r in await _sent(db, f"cus_{down}")) == 5
    assert sum(Decimal(s.value) for s in double.for_customer(f"cus_{up}")) == 11
    figures = usage["meters"][0]
    assert (figures["used"], figures["included"], figures["overage"]) == ("23", "20", "11")


async def test_plan_changes_through_the_cli_keep_customer_zone_anchor_and_start(
        isolated: Settings, db: asyncpg.Connection, tmp_path) -> None:  # noqa: ANN001
    """Billing review C1 scenario A: `subscriptions set --plan` alone changes only the plan."""
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await set_account(db, tenant, account_of(tenant))
    anchor_day, start = _anchor()
    for plan_id, included in (("basic", 10), ("pro", 20)):
        path = tmp_path / f"{plan_id}.yaml"
        path.write_text(f"id: {plan_id}\nmeters:\n  - {{meter: api_calls, included: {included},"
                        " stripe_event: api_calls}\n")
        code, out = run_tally(["plans", "create", "--tenant", tenant, "--file", str(path)], settings)
        assert code == 0, out
    up, down = "cli-up", "cli-down"
    for subject, plan_id in ((up, "basic"), (down, "pro")):
        code, out = run_tally(["subscriptions", "set", "--tenant", tenant, "--subject", subject, "--plan", plan_id,
                               "--stripe-customer", f"cus_{tenant}_{subject}", "--anchor-day", str(anchor_day),
                               "--time-zone", ZONE, "--start-date", start.isoformat()], settings)
        assert code == 0, out
    with stripe_double() as double, running("processor", ["process"], settings):
        env = {"TALLY_STRIPE_API_BASE": double.url}
        before = datetime.now(timezone.utc) - timedelta(minutes=2)
        await _report(settings, db, env, tenant, {up: (before, 18, 0), down: (before, 15, 0)})
        label = (await _sent(db, f"cus_{tenant}_{up}"))[0]["period_label"]

        for subject, plan_id in ((up, "pro"), (down, "basic")):
            code, out = run_tally(["subscriptions", "set", "--tenant", tenant, "--subject", subject,
                                   "--plan", plan_id], settings)
            assert code == 0, out
        await _report(settings, db, env, tenant, {up: (_after_the_change(), 5, 100),
                                                  down: (_after_the_change(), 5, 100)})

    code, listed = run_tally(["subscriptions", "list", "--tenant", tenant], settings)
    assert code == 0, listed
    for subject in (up, down):
        line = next(x for x in listed.splitlines() if f" {subject} " in x)
        assert f"day {anchor_day:2}" in line and ZONE in line and f"from {start}" in line, line
        assert f"cus_{tenant}_{subject}" in line, line
    code, shown = run_tally(["subscriptions", "show", "--tenant", tenant, "--subject", up], settings)
    assert code == 0 and "v1" in shown and "v2" in shown and "basic" in shown and "pro" in shown, shown
    assert {r["period_label"] for r in await _sent(db, f"cus_{tenant}_{up}")} == {label}
    assert sum(r["value"] for r in await _sent(db, f"cus_{tenant}_{up}")) == 11
    assert sum(r["value"] for r in await _sent(db, f"cus_{tenant}_{down}")) == 5
    assert sum(Decimal(s.value) for s in double.for_customer(f"cus_{tenant}_{down}")) == 5


async def test_anchor_zone_or_start_change_is_refused_once_a_period_exists(isolated: Settings,
                                                                           db: asyncpg.Connection) -> None:
    """Billing review C1 scenario B: an anchor change cannot re-label periods, so it is refused."""
    settings = metered(isolated)
    tenant, admin, _ = await tenant_keys(settings)
    started = {"plan_id": "p", "stripe_customer_id": "cus_b", "anchor_day": 1, "time_zone": "UTC",
               "start_date": (date.today() - timedelta(days=60)).isoformat()}
    later = (date.today() + timedelta(days=10)).isoformat()
    with pipeline(settings) as gw:
        async with gw.client(admin) as api:
            assert (await api.post("/v1/plans", json=_plan("p", 10))).status_code == 201
            assert (await api.put("/v1/subscriptions/b", json=started)).status_code == 200
            refused = {}
            for field, value in (("anchor_day", 15), ("time_zone", "America/New_York"),
                                 ("start_date", date.today().isoformat())):
                refused[field] = await api.put("/v1/subscriptions/b", json={field: value})
            same = await api.put("/v1/subscriptions/b", json={"anchor_day": 1})
            shown = (await api.get("/v1/subscriptions/b")).json()
            # Before its first period a subscription's anchor may still change.
            assert (await api.put("/v1/subscriptions/f", json={"plan_id": "p", "start_date": later})).status_code == 200
            moved = await api.put("/v1/subscriptions/f", json={"anchor_day": 15})
            new = await api.put("/v1/subscriptions/n", json={"plan_id": "p"})
            missing = await api.put("/v1/subscriptions/m", json={"anchor_day": 3})
    for field, answer in refused.items():
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["errors"][0]["field"] == field
    assert same.status_code == 200, same.text
    assert (shown["anchor_day"], shown["time_zone"], shown["start_date"]) == (1, "UTC", started["start_date"])
    assert len(shown["versions"]) == 1
    assert moved.status_code == 200 and moved.json()["anchor_day"] == 15, moved.text
    assert new.status_code == 200 and new.json()["start_date"] == date.today().isoformat(), new.text
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "plan_id", missing.text


async def test_an_edited_plan_never_rebills_a_closed_period(isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review H1: the closed period keeps the plan version it was billed and closed under."""
    settings = metered(isolated)
    tenant, subject, customer = f"t-{uuid.uuid4().hex[:8]}", "acme", f"cus_{uuid.uuid4().hex[:10]}"
    await set_account(db, tenant, account_of(tenant))
    now = datetime.now(timezone.utc)
    zone = _zone_past_midnight(now)
    today = now.astimezone(ZoneInfo(zone)).date()
    boundary = datetime.combine(today, datetime.min.time(), tzinfo=ZoneInfo(zone)).astimezone(timezone.utc)
    basic = Plan(id="basic", meters=[PlanMeter(meter="api_calls", included=10)])
    await save_plan(db, tenant, basic)
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="basic", stripe_customer_id=customer,
                                             anchor_day=today.day, time_zone=zone,
                                             start_date=today - timedelta(days=40)))
    env = {"TALLY_CLOSE_GRACE_S": "60", "TALLY_LATE_HORIZON_S": "60"}
    with stripe_double() as double, running("processor", ["process"], settings):
        env["TALLY_STRIPE_API_BASE"] = double.url
        produce(settings, _calls(tenant, subject, boundary - timedelta(hours=2), 15, 0))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
        code, out = run_tally(["jobs", "run", "period_close"], settings, **env)
        assert code == 0, out
        closed = await db.fetchrow("select * from period_usage where tenant = $1 and period_end = $2", tenant,
                                   boundary)
        assert (closed["used"], closed["included"], closed["overage"]) == (15, 10, 5)

        await save_plan(db, tenant, basic.model_copy(update={"meters": [PlanMeter(meter="api_calls", included=8)]}))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out
        await save_plan(db, tenant, basic.model_copy(update={"report": "usage"}))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out

    rows = await db.fetch("select period_label, kind, value from stripe_reports where tenant = $1", tenant)
    assert [r["value"] for r in rows] == [5], rows  # usage, or an adjustment once Stripe's invoice is final
    assert sum(Decimal(s.value) for s in double.for_customer(customer)) == 5
    assert closed["plan_version"] == 1
    versions = await db.fetch("select version, report from plan_versions where tenant = $1 order by version", tenant)
    assert [(v["version"], v["report"]) for v in versions] == [(1, "overage"), (2, "overage"), (3, "usage")]


async def test_plan_meters_must_be_billable_configured_meters(isolated: Settings, tmp_path) -> None:  # noqa: ANN001
    """Billing review M2: a meter that is missing, not hourly, grouped or not additive is refused (422)."""
    settings = metered(isolated).model_copy(update={"meters": METERS + UNBILLABLE})
    _, admin, _ = await tenant_keys(settings)
    cases = {"nope": "no meter", "visitors": "UNIQUE_COUNT", "daily_calls": "hour", "calls_by_route": "group_by"}
    with pipeline(settings) as gw:
        async with gw.client(admin) as api:
            answers = {meter: await api.post("/v1/plans", json={"id": "x", "meters": [
                {"meter": "api_calls", "included": 1}, {"meter": meter, "included": 1}]}) for meter in cases}
            good = await api.post("/v1/plans", json={"id": "x", "meters": [{"meter": "tokens", "included": 1}]})
            listed = (await api.get("/v1/plans")).json()["plans"]
    for meter, problem in cases.items():
        answer = answers[meter]
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        [error] = answer.json()["errors"]
        assert error["field"] == "meters.1.meter" and problem in error["message"], answer.text
    assert good.status_code == 201, good.text
    assert [p["meters"][0]["meter"] for p in listed] == ["tokens"]

    path = tmp_path / "plan.yaml"
    path.write_text("id: y\nmeters:\n  - {meter: visitors, included: 1}\n")
    code, out = run_tally(["plans", "create", "--tenant", "cli-m2", "--file", str(path)], settings)
    assert code == 1 and "meters.0.meter" in out and "UNIQUE_COUNT" in out, out


async def test_plans_and_subscriptions_per_tenant_are_bounded(isolated: Settings) -> None:
    """Security review M4: past the configured bound a new plan or subscription is refused (409)."""
    settings = metered(isolated)
    _, admin, _ = await tenant_keys(settings)
    with pipeline(settings, TALLY_USAGE_MAX_PLANS="2", TALLY_USAGE_MAX_SUBSCRIPTIONS="2") as gw:
        async with gw.client(admin) as api:
            plans = [await api.post("/v1/plans", json=_plan(f"p{i}", 1)) for i in range(3)]
            edit = await api.post("/v1/plans", json=_plan("p0", 5))
            subs = [await api.put(f"/v1/subscriptions/s{i}", json={"plan_id": "p0"}) for i in range(3)]
            change = await api.put("/v1/subscriptions/s0", json={"plan_id": "p1"})
    assert [a.status_code for a in plans] == [201, 201, 409], plans[2].text
    assert plans[2].headers["content-type"] == "application/problem+json"
    assert "TALLY_USAGE_MAX_PLANS" in plans[2].json()["detail"]
    assert edit.status_code == 201
    assert [a.status_code for a in subs] == [200, 200, 409], subs[2].text
    assert change.status_code == 200, change.text


async def test_a_bad_subscription_is_logged_counted_and_never_stops_the_others(
        isolated: Settings, db: asyncpg.Connection, caplog) -> None:  # noqa: ANN001
    """Billing review L5: a stored zone that no longer gives whole-hour midnights fails that subscription
    alone; the good one is still closed and its hard limit still decided."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="api_calls", included=0, limit_mode="hard")]))
    await subscribe(db, tenant, Subscription(subject="good", plan_id="p", anchor_day=1,
                                             start_date=date.today() - timedelta(days=70)))
    await db.execute("insert into subscriptions (tenant, subject, plan_id, anchor_day, time_zone, start_date)"
                     " values ($1, 'bad', 'p', 1, 'Asia/Kolkata', $2)", tenant, date.today() - timedelta(days=70))
    await db.execute("insert into subscription_plans (tenant, subject, version, plan_id, effective_at)"
                     " values ($1, 'bad', 1, 'p', '-infinity')", tenant)
    config = BillingConfig(isolated.database_url, isolated.redis_url, isolated.redis_prefix,
                           isolated.redis_counter_ttl_s, load_meters(inline=METERS), close_grace_s=60)
    ctx = await JobContext.open(config)

    def errors(where: str) -> float:
        return REGISTRY.get_sample_value("tally_period_errors_total", {"where": where}) or 0

    try:
        before = errors("close"), errors("limits"), errors("figures")
        figures = await close_periods(ctx, datetime.now(timezone.utc))
        decision = await decide(ctx.pool, ctx.reader, await ctx.catalog())
        service = UsageService(ctx.pool, ctx.reader)
        assert (await service.usage(tenant, "good"))["plan"] == "p"
        with pytest.raises(Unreadable):
            await service.usage(tenant, "bad")
    finally:
        await ctx.close()
    assert figures["periods_closed"] >= 2
    assert await db.fetchval("select count(*) from period_usage where tenant = $1 and subject = 'good'", tenant) >= 2
    assert await db.fetchval("select count(*) from period_usage where tenant = $1 and subject = 'bad'", tenant) == 0
    assert "good" in decision[tenant]
    assert (errors("close"), errors("limits"), errors("figures")) == (before[0] + 1, before[1] + 1, before[2] + 1)
    assert any("bad" in r.getMessage() and "Asia/Kolkata" in r.getMessage() for r in caplog.records)


async def test_concurrent_writers_of_one_subscription_or_plan_take_turns(isolated: Settings) -> None:
    """Two requests creating one subscription (or one plan) at once: one creates it, the other applies to it;
    neither fails on a version number the other took."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(isolated.database_url, min_size=4, max_size=4)
    try:
        async with pool.acquire() as conn:
            await save_plan(conn, tenant, Plan(id="p", meters=[PlanMeter(meter="api_calls", included=1)]))

        async def create(subject: str) -> None:
            async with pool.acquire() as conn:
                await subscribe(conn, tenant, Subscription(subject=subject, plan_id="p", start_date=date.today()))

        async def edit(included: int) -> None:
            async with pool.acquire() as conn:
                await save_plan(conn, tenant, Plan(id="q", meters=[PlanMeter(meter="api_calls", included=included)]))

        for n in range(10):
            await asyncio.gather(create(f"s{n}"), create(f"s{n}"), edit(n), edit(n + 100))
        versions = await pool.fetch("select subject, count(*) from subscription_plans where tenant = $1"
                                    " group by subject", tenant)
        assert sorted(r["count"] for r in versions) == [1] * 10
        assert await pool.fetchval("select max(version) from plan_versions where tenant = $1 and plan_id = 'q'",
                                   tenant) == 20
        async with pool.acquire() as conn:  # the plan as it is: no new version
            await save_plan(conn, tenant, Plan(id="p", meters=[PlanMeter(meter="api_calls", included=1)]))
        assert await pool.fetchval("select count(*) from plan_versions where tenant = $1 and plan_id = 'p'",
                                   tenant) == 1
    finally:
        await pool.close()
