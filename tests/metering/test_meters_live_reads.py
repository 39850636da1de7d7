"""Meters as data, read side (issue 21, ADR 0140): the gateway, the jobs worker and the alert evaluator read each
tenant's meters from the live catalog. A meter row inserted while they run is, within seconds and without a
restart, billable in a plan, read by `GET /v1/usage`, enforced as a hard limit and evaluated by an alert rule;
another tenant never sees it; reads stay on the newest version whose backfill is done; an outage of PostgreSQL
leaves the last catalog in place."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg
import orjson

from tally.ingest.auth import create_key
from tally.meters.definitions import DEFAULT_METERS
from tally.meters.fresh import LiveCatalog
from tally.settings import Settings
from tally.usage.figures import UsageService
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe
from tally.usage.windows import WindowReader
from tests.gateway.helpers import start_gateway
from tests.metering.helpers import metered, tenant_keys
from tests.processor.helpers import wait_for
from tests.processor.scratch_pg import ScratchPostgres, scratch_postgres
from tests.support import running

CALLS = {"event_type": "api.call", "windows": ["minute", "hour"]}


async def _version(db: asyncpg.Connection, tenant: str, slug: str, version: int, definition: dict,
                   backfill: str) -> int:
    """A meter version and its backfill, in one transaction as whoever creates versions writes them."""
    async with db.transaction():
        version_id = await db.fetchval(
            "insert into meter_versions (tenant, slug, version, definition) values ($1, $2, $3, $4) returning id",
            tenant, slug, version, orjson.dumps(definition).decode())
        await db.execute("insert into meter_backfills (tenant, version_id, state) values ($1, $2, $3)",
                         tenant, version_id, backfill)
    return version_id


def _call(subject: str) -> dict:
    return {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "app", "type": "api.call", "subject": subject}


async def test_a_meter_row_is_read_billed_limited_and_alerted_on_without_a_restart(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated).model_copy(update={"jobs_tick_s": 1.0, "alerts_metrics_port": 0,
                                                    "alerts_min_every_s": 1})
    tenant, admin, writer = await tenant_keys(settings)
    _, other_admin, _ = await tenant_keys(settings)
    _, alerting = await create_key(db, tenant, "alerting", ["alerts:write", "alerts:read"])
    subject = "live-customer"
    plan = {"id": "live", "meters": [{"meter": "calls", "included": 3, "limit_mode": "hard"}]}
    rule = {"id": "busy", "name": "busy", "measure": {"meter": "calls"}, "threshold": 2, "window": "5m",
            "every": "1s"}
    with running("processor", ["process"], settings), start_gateway("gateway", settings) as gw, \
            running("jobs", ["jobs"], settings), running("alerts", ["alerts"], settings):
        async with gw.client(admin) as api, gw.client(writer) as writes, gw.client(other_admin) as others, \
                gw.client(alerting) as rules:
            refused = await api.post("/v1/plans", json=plan)
            assert refused.status_code == 422, refused.text  # no meter `calls` yet
            await _version(db, tenant, "calls", 1, CALLS, "done")

            async def plan_taken() -> bool:
                return (await api.post("/v1/plans", json=plan)).status_code == 201
            await wait_for(plan_taken, 15, "the gateway to take the new meter up")
            assert (await others.post("/v1/plans", json=plan)).status_code == 422  # tenant B never sees A's meter
            created = await rules.post("/v1/alert-rules", json=rule)
            assert created.status_code == 201, created.text
            start = (date.today() - timedelta(days=40)).isoformat()
            assert (await api.put(f"/v1/subscriptions/{subject}", json={"plan_id": "live", "start_date": start})
                    ).status_code == 200
            for _ in range(3):
                assert (await writes.post("/v1/events", json=_call(subject))).status_code == 202

            async def used_up() -> bool:
                answer = await api.get("/v1/usage", params={"subject": subject})
                figures = answer.json()["meters"][0] if answer.status_code == 200 else {}
                return figures.get("used") == "3" and figures.get("backfilling") is False

            await wait_for(used_up, 60, "the usage read of the new meter")

            async def refused_at_intake() -> bool:
                return (await writes.post("/v1/events", json=_call(subject))).status_code == 429

            await wait_for(refused_at_intake, 30, "the hard limit on the new meter")

            async def fired() -> bool:
                return bool(await db.fetchval("select count(*) from alert_transitions where tenant = $1 and"
                                              " rule_id = 'busy' and kind = 'firing'", tenant))

            await wait_for(fired, 30, "the alert rule on the new meter to fire")


async def test_reads_stay_on_the_newest_version_whose_backfill_is_done(isolated: Settings,
                                                                       db: asyncpg.Connection) -> None:
    tenant, subject = f"v-{uuid.uuid4().hex[:8]}", "s1"
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="calls", included=100)]))
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="p",
                                             start_date=date.today() - timedelta(days=40)))
    for counter, value in (("calls", 7), ("calls@2", 11)):  # each version's counters, as their counting left them
        await db.execute(
            "insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end, subject,"
            " grp, value, count, latest_time, revision) values ($1, $2, $3, 'COUNT', 'hour', $4, $5, $6, '{}', $7, $8,"
            " $4, 1)", f"{tenant}|{counter}|{hour.isoformat()}", tenant, counter, hour, hour + timedelta(hours=1),
            subject, value, value)
    pool = await asyncpg.create_pool(isolated.database_url, min_size=1, max_size=2)
    try:
        live = LiveCatalog(DEFAULT_METERS, poll_s=0.05)
        service = UsageService(pool, WindowReader(pool, None, isolated.redis_prefix, isolated.redis_counter_ttl_s),
                               select_ttl_s=0, catalog=live)

        async def figures() -> dict:
            await asyncio.sleep(0.1)
            return (await service.usage(tenant, subject))["meters"][0]

        first = await _version(db, tenant, "calls", 1, CALLS, "running")
        assert {k: (await figures())[k] for k in ("used", "backfilling")} == {"used": "7", "backfilling": True}
        await db.execute("update meter_backfills set state = 'done' where tenant = $1 and version_id = $2",
                         tenant, first)
        await db.execute("update meter_catalog set revision = revision + 1")  # as the backfill does when it ends
        assert {k: (await figures())[k] for k in ("used", "backfilling")} == {"used": "7", "backfilling": False}
        second = await _version(db, tenant, "calls", 2, {**CALLS, "event_type": "api.*"}, "running")
        assert (await figures())["used"] == "7"  # v2 is still backfilling: reads stay on v1
        assert (await live.current(pool)).counters(tenant, ["calls"]) == {"calls": "calls"}
        await db.execute("update meter_backfills set state = 'done' where tenant = $1 and version_id = $2",
                         tenant, second)
        await db.execute("update meter_catalog set revision = revision + 1")
        assert {k: (await figures())[k] for k in ("used", "backfilling")} == {"used": "11", "backfilling": False}
        assert (await live.current(pool)).counters(f"other-{tenant}", ["calls"]) == {"calls": "calls"}
        assert "calls" not in {m.slug for m in (await live.current(pool)).readable(f"other-{tenant}").meters}
    finally:
        await pool.close()


def test_an_outage_of_postgresql_keeps_the_last_catalog(isolated: Settings) -> None:
    with scratch_postgres(isolated) as pg:  # migrates with a loop of its own, so the test runs its own after
        asyncio.run(_outage(pg, f"o-{uuid.uuid4().hex[:8]}"))


async def _outage(pg: ScratchPostgres, tenant: str) -> None:
    conn = await asyncpg.connect(pg.url)
    await _version(conn, tenant, "calls", 1, CALLS, "done")
    await conn.close()
    pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
    live = LiveCatalog(DEFAULT_METERS, poll_s=0.05, timeout_s=2)
    try:
        assert "calls" in {m.slug for m in (await live.current(pool)).readable(tenant).meters}
        pg.stop()
        for _ in range(3):  # each try fails, none raises: the caller goes on with the last catalog
            await asyncio.sleep(0.1)
            assert "calls" in {m.slug for m in (await live.current(pool)).readable(tenant).meters}
        pg.start()
        conn = await asyncpg.connect(pg.url)
        await _version(conn, tenant, "tokens", 1, {"event_type": "llm.*", "aggregation": "SUM",
                                                   "value_path": "data.tokens", "windows": ["hour"]}, "done")
        await conn.close()

        async def caught_up() -> bool:
            return "tokens" in {m.slug for m in (await live.current(pool)).readable(tenant).meters}

        await wait_for(caught_up, 30, "the catalog to be refreshed after the outage")
    finally:
        await pool.close()
