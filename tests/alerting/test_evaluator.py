"""The evaluator on counter windows the real processor made, on a clock the test moves: windows, `for`,
cooldown, group-by, value measures, and restarts that resume from PostgreSQL without a second transition."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from tally.alerts.evaluator import Evaluator
from tally.alerts.windows import MinuteWindows, minute_start
from tally.meters.fresh import LiveCatalog
from tally.meters.definitions import DEFAULT_METERS, load_meters
from tally.settings import Settings
from tests.alerting.helpers import BOX, add_rule, event, log_record, transitions
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running

WEBHOOK = {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "whsec_" + "A" * 32}


@pytest.fixture
async def pool(alone: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def new_transitions(evaluator: Evaluator, now: datetime, db: asyncpg.Connection, tenant: str) -> int:
    """Evaluate at `now`; how many transitions this tenant got (other tests' tenants share the database)."""
    before = len(await transitions(db, tenant))
    await evaluator.evaluate(now)
    return len(await transitions(db, tenant)) - before


def processed(settings: Settings, db: asyncpg.Connection, envelopes: list, **env: str):  # noqa: ANN201
    """Produce the envelopes and let a real processor count them."""
    produce(settings, envelopes)

    async def run() -> None:
        with running("processor", ["process"], settings, **env):
            await wait_for(lambda: drained(settings, db), 90, "the processor to drain")
    return run()


async def test_window_for_cooldown_and_restart(alone: Settings, alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    tenant, db = f"t-{uuid.uuid4().hex[:8]}", alone_db
    t0 = minute_start(datetime.now(timezone.utc)) - timedelta(minutes=30)
    await add_rule(db, tenant, id="api-errors", filter={"service": "api", "level": "error"}, comparison=">",
                   threshold=4, window="2m", **{"for": "30s"}, cooldown="2m", targets=[WEBHOOK])
    # 5 errors and a fatal for api (6 at error and above), warnings that do not count, errors of another service
    await processed(alone, db, [log_record(tenant, "api", "error", t0 + timedelta(seconds=s)) for s in range(5)]
                    + [log_record(tenant, "api", "fatal", t0 + timedelta(seconds=9)),
                       *[log_record(tenant, "api", "warn", t0) for _ in range(9)],
                       *[log_record(tenant, "db", "error", t0) for _ in range(9)]])

    def evaluator() -> Evaluator:
        return Evaluator(pool, LiveCatalog(DEFAULT_METERS), MinuteWindows(), BOX)

    first = evaluator()
    await first.load(t0 + timedelta(seconds=10))
    assert await new_transitions(first, t0 + timedelta(seconds=10), db, tenant) == 0  # breached, pending for 30 s
    assert await db.fetchval("select status from alert_states where tenant = $1", tenant) == "pending"

    restarted = evaluator()  # a new process: the pending breach's start comes back from PostgreSQL
    await restarted.load(t0 + timedelta(seconds=39))
    assert await new_transitions(restarted, t0 + timedelta(seconds=39), db, tenant) == 0
    assert await new_transitions(restarted, t0 + timedelta(seconds=40), db, tenant) == 0  # every 5 s: not due yet
    assert await new_transitions(restarted, t0 + timedelta(seconds=45), db, tenant) == 1
    assert await transitions(db, tenant) == [("api-errors", "{}", "firing")]

    again = evaluator()
    await again.load(t0 + timedelta(seconds=50))
    assert await new_transitions(again, t0 + timedelta(seconds=50), db, tenant) == 0  # still firing: nothing new
    # The window (2 whole minutes before the current one and the current one) still holds t0's minute at t0+2m55...
    assert await new_transitions(again, t0 + timedelta(minutes=2, seconds=55), db, tenant) == 0
    # ... and not at t0+3m: resolved
    assert await new_transitions(again, t0 + timedelta(minutes=3), db, tenant) == 1
    row = await db.fetchrow("select value, fired_at, at from alert_transitions where tenant = $1 and kind = 'resolved'",
                            tenant)
    assert (row["value"], row["fired_at"], row["at"]) == (0, t0 + timedelta(seconds=45), t0 + timedelta(minutes=3))
    assert await db.fetchval("select count(*) from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
                             " where t.tenant = $1 and d.kind = 'webhook'", tenant) == 2

    # A new breach at t0+4m lasts past `for` but waits out the 2-minute cooldown since the resolution (t0+3m).
    t1 = t0 + timedelta(minutes=4)
    await processed(alone, db, [log_record(tenant, "api", "error", t1) for _ in range(5)])
    await again.windows.recover(pool, t1)
    assert await new_transitions(again, t1 + timedelta(seconds=5), db, tenant) == 0
    assert await new_transitions(again, t1 + timedelta(seconds=40), db, tenant) == 0  # `for` is over, the cooldown is not
    assert await new_transitions(again, t1 + timedelta(seconds=60), db, tenant) == 1
    assert await transitions(db, tenant) == [("api-errors", "{}", "firing"), ("api-errors", "{}", "resolved"),
                                             ("api-errors", "{}", "firing")]


async def test_group_by_and_value_measure(alone: Settings, alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    tenant, db = f"t-{uuid.uuid4().hex[:8]}", alone_db
    now = datetime.now(timezone.utc)
    await add_rule(db, tenant, id="errors-by-service", filter={"level": "warn"}, group_by=["service"],
                   threshold=2, window="5m")
    await add_rule(db, tenant, id="payments", filter={"event_type": "payment.*"}, threshold=2, window="5m")
    await add_rule(db, tenant, id="big-spend", measure={"meter": "spend", "of": "value"}, comparison=">=",
                   threshold=100, window="5m")
    logs = ([log_record(tenant, "api", "error", now) for _ in range(3)] + [log_record(tenant, "db", "warn", now)]
            + [log_record(tenant, "web", "fatal", now) for _ in range(4)])
    payments = [event(tenant, "payment.captured", now) for _ in range(2)] + [event(tenant, "payment.refunded", now)] \
        + [event(tenant, "paymentless", now) for _ in range(5)]
    orders = [event(tenant, "order.paid", now).model_copy(update={"data": {"amount": 60}}) for _ in range(2)]
    meters = ("meters: [{slug: spend, event_type: order.paid, aggregation: SUM, value_path: data.amount,"
              " windows: [minute]}, {slug: event_types, event_type: '*', group_by: {type: type}, per_subject: false,"
              " windows: [minute]}]")
    await processed(alone, db, logs + payments + orders, TALLY_METERS=meters)

    evaluator = Evaluator(pool, LiveCatalog(load_meters(inline=meters)), MinuteWindows(), BOX)
    await evaluator.load(now)
    await evaluator.evaluate(now)
    got = sorted(await transitions(db, tenant))
    assert got == [("big-spend", "{}", "firing"), ("errors-by-service", '{"service":"api"}', "firing"),
                   ("errors-by-service", '{"service":"web"}', "firing"), ("payments", "{}", "firing")]
    value = await db.fetchval("select value from alert_transitions where tenant = $1 and rule_id = 'big-spend'", tenant)
    assert value == 120
