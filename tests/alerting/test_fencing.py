"""One firing per incident (billing review M5) and resolutions that go where the firing went (M6), against the
real database: two evaluators on one rule, a commit whose answer was lost, a deposed leader's commit, a rule
whose targets or group_by change while it fires."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from tally.alerts import ledger
from tally.alerts.evaluator import Evaluator
from tally.alerts.windows import MinuteWindows
from tally.meters.fresh import LiveCatalog
from tally.meters.definitions import DEFAULT_METERS
from tally.settings import Settings
from tests.alerting.helpers import BOX, add_rule, event, transitions
from tests.alerting.test_evaluator import processed

HOOK = {"type": "webhook", "secret": "whsec_" + "A" * 32}


@pytest.fixture
async def pool(alone: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def evaluator(pool: asyncpg.Pool, epoch: int | None = None) -> Evaluator:
    return Evaluator(pool, LiveCatalog(DEFAULT_METERS), MinuteWindows(), BOX, epoch)


async def test_two_evaluators_fire_an_incident_once(alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    """(a) Both read the rule as ok and both decide it fires: the second commit finds the standing moved."""
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=3)
    first, second = evaluator(pool), evaluator(pool)
    await first.load(now)
    await second.load(now)
    await first.evaluate(now)
    await second.evaluate(now)
    await second.evaluate(now + timedelta(seconds=5))  # having read the standings again, it sees it firing
    assert await transitions(db, tenant) == [("quiet", "{}", "firing")]


async def test_a_commit_whose_answer_was_lost_fires_once(alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    """(b) Pending is committed; the firing commits but the evaluator never hears it, so its memory still says
    pending (the evaluator loaded before the firing stands for it) and it decides the firing again."""
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=3,
                   **{"for": "30s"})
    committed = evaluator(pool)
    await committed.load(now)
    await committed.evaluate(now)
    assert await db.fetchval("select status from alert_states where tenant = $1", tenant) == "pending"
    unanswered = evaluator(pool)
    await unanswered.load(now)
    await committed.evaluate(now + timedelta(seconds=30))
    await unanswered.evaluate(now + timedelta(seconds=30))
    assert await transitions(db, tenant) == [("quiet", "{}", "firing")]


async def test_a_deposed_leader_s_commit_is_refused(alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=3)
    old = evaluator(pool, await ledger.lead(db))
    await old.load(now)
    new = evaluator(pool, await ledger.lead(db))  # the lock passed on while `old` was slow
    await new.load(now)
    with pytest.raises(ledger.Fenced):
        await old.evaluate(now)
    assert await transitions(db, tenant) == []
    await new.evaluate(now)
    assert await transitions(db, tenant) == [("quiet", "{}", "firing")]


async def _endpoints(db: asyncpg.Connection, tenant: str, kind: str) -> list[str]:
    return [r["endpoint"] for r in await db.fetch(
        "select d.endpoint from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
        " where t.tenant = $1 and t.kind = $2 order by d.transition_id, d.target", tenant, kind)]


async def test_a_rule_edited_while_firing_resolves_where_it_fired(alone: Settings, alone_db: asyncpg.Connection,
                                                                 pool: asyncpg.Pool) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    rule = {"id": "quiet", "filter": {"event_type": "heartbeat"}, "comparison": "<", "threshold": 3}
    await add_rule(db, tenant, **rule, targets=[{**HOOK, "url": "http://old.example/hook"}])
    e = evaluator(pool)
    await e.load(now)
    await e.evaluate(now)
    await add_rule(db, tenant, **rule, targets=[{**HOOK, "url": "http://new.example/hook"}])
    await e.reload_rules(now)
    await processed(alone, db, [event(tenant, "heartbeat", now) for _ in range(3)])
    await e.windows.recover(pool, now)
    await e.evaluate(now + timedelta(seconds=5))
    assert await transitions(db, tenant) == [("quiet", "{}", "firing"), ("quiet", "{}", "resolved")]
    assert await _endpoints(db, tenant, "firing") == ["http://old.example"]
    assert await _endpoints(db, tenant, "resolved") == ["http://old.example"]


async def test_a_group_by_change_resolves_the_old_group(alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    rule = {"id": "quiet", "filter": {"event_type": "heartbeat*"}, "comparison": "<", "threshold": 3}
    await add_rule(db, tenant, **rule)
    e = evaluator(pool)
    await e.load(now)
    await e.evaluate(now)
    await add_rule(db, tenant, **rule, group_by=["type"])
    await e.reload_rules(now)
    for n in range(1, 4):
        await e.evaluate(now + timedelta(seconds=5 * n))
    assert await transitions(db, tenant) == [("quiet", "{}", "firing"), ("quiet", "{}", "resolved")]
    assert await db.fetchval("select count(*) from alert_states where tenant = $1", tenant) == 0
