"""`tally alerts` as a process, on the clock: transitions recorded, published and delivered once across kill -9
of the evaluator at its crash points and at a random moment, and a kill -9 and restart of the processor; a Slack
double and a webhook receiver that verifies the Standard Webhooks signature get exactly the transitions."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime, timezone

import asyncpg
import orjson
from confluent_kafka import Producer

from tally.settings import Settings
from tests.alerting.helpers import add_rule, event, log_record, transitions
from tests.alerting.receivers import Receiver, receiver
from tests.processor.helpers import produce, wait_for
from tests.support import TallyProcess, read_topic, wait_until


async def published(db: asyncpg.Connection, tenant: str) -> bool:
    return not await db.fetchval("select count(*) from alert_transitions where tenant = $1 and published_at is null",
                                 tenant)


def crashed(process: TallyProcess) -> None:
    wait_until(lambda: not process.alive(), 60, what="the evaluator to reach its crash point")
    assert process.proc.returncode == -9, process.output()


SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtYWxlcnQtdGVzdA=="


async def test_each_transition_once_across_kills(alone: Settings, alone_db: asyncpg.Connection) -> None:
    with receiver() as targets:
        targets.secrets["/hook"] = SECRET
        await _kills(alone, alone_db, targets)


async def _kills(alone: Settings, db: asyncpg.Connection, targets: Receiver) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    to = [{"type": "webhook", "url": f"{targets.url}/hook", "secret": SECRET},
          {"type": "slack", "url": f"{targets.url}/slack"}]
    await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=3,
                   window="5m", every="1s", targets=to)
    await add_rule(db, tenant, id="api-errors", filter={"service": "api", "level": "error"}, threshold=4,
                   window="2m", every="1s", targets=to)
    processor = TallyProcess("processor", ["process"], alone)
    alerts: TallyProcess | None = None
    try:
        # No heartbeat yet: `quiet` fires at once. The first evaluator dies after committing the firing...
        crashed(TallyProcess("alerts", ["alerts"], alone, TALLY_CRASH_AT="alerts_after_commit"))
        assert await transitions(db, tenant) == [("quiet", "{}", "firing")]
        assert not await published(db, tenant)
        # ... the next after Kafka acked it and before marking it published ...
        crashed(TallyProcess("alerts", ["alerts"], alone, TALLY_CRASH_AT="alerts_mid_publish"))
        assert not await published(db, tenant)
        # ... and the third publishes it again and goes on, with nothing decided twice.
        alerts = TallyProcess("alerts", ["alerts"], alone)
        await wait_for(lambda: published(db, tenant), 60, "the firing to be published")

        # Messages on the counter topic that are no counter state are skipped, never a stop.
        junk = Producer({"bootstrap.servers": alone.kafka_bootstrap})
        for value in (b"not json", b'{"window": "minute", "meter": "logs"}'):
            junk.produce(alone.topics.counters, value, b"junk")
        assert junk.flush(10) == 0
        produce(alone, [event(tenant, "heartbeat") for _ in range(3)])
        processor.kill9()
        processor = TallyProcess("processor", ["process"], alone)
        now = datetime.now(timezone.utc)
        produce(alone, [log_record(tenant, "api", level, now) for level in ["error"] * 4 + ["fatal", "info"]])
        await asyncio.sleep(1.5)
        alerts.kill9()
        alerts = TallyProcess("alerts", ["alerts"], alone)

        expected = [("quiet", "{}", "firing"), ("quiet", "{}", "resolved"), ("api-errors", "{}", "firing")]

        async def all_there() -> bool:
            return sorted(await transitions(db, tenant)) == sorted(expected) and await published(db, tenant)

        await wait_for(all_there, 90, "quiet to resolve and api-errors to fire, published")

        async def delivered() -> bool:
            return not await db.fetchval("select count(*) from alert_deliveries where status <> 'sent'")

        await wait_for(delivered, 60, "every delivery to be sent")
        await asyncio.sleep(3)  # a few more evaluations decide nothing new
        assert sorted(await transitions(db, tenant)) == sorted(expected)
    finally:
        processor.stop()
        if alerts is not None:
            alerts.stop()

    rows = await db.fetch("select id from alert_transitions where tenant = $1", tenant)
    on_topic = Counter(m.value() for m in await asyncio.to_thread(read_topic, alone.kafka_bootstrap,
                                                                  alone.topics.alerts))
    ids = Counter(orjson.loads(value)["id"] for value in on_topic.elements())
    assert set(ids) == {f"alert-{r['id']}" for r in rows}
    # The firing acked before the kill mid-publish was published again, byte for byte: readers dedupe by id.
    assert ids[f"alert-{min(r['id'] for r in rows)}"] == 2
    assert len(on_topic) == len(ids)

    # Delivered: every transition to both targets, signatures verified. A re-send would carry the same
    # webhook-id (ADR 0051); only a kill between a receiver's 2xx and the row's commit could cause one.
    hooks = targets.at("/hook")
    assert all(r.verified for r in hooks)
    assert set(targets.ids("/hook")) == {f"alert-{r['id']}" for r in rows}
    slack_ids = [r.json()["blocks"][-1]["elements"][0]["text"].split(" · ")[1] for r in targets.at("/slack")]
    assert set(slack_ids) == set(targets.ids("/hook"))
    assert len(hooks) - len(rows) <= 1 and len(slack_ids) - len(rows) <= 1


async def test_a_standby_takes_over_after_a_kill_without_repeating(alone: Settings,
                                                                   alone_db: asyncpg.Connection) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=2,
                   window="5m", every="1s")
    processor = TallyProcess("processor", ["process"], alone)
    active = TallyProcess("alerts", ["alerts"], alone, TALLY_ALERTS_METRICS_PORT="0")
    standby: TallyProcess | None = None
    try:
        async def fired() -> bool:
            return await transitions(db, tenant) == [("quiet", "{}", "firing")]

        await wait_for(fired, 60, "the first evaluator to fire")
        standby = TallyProcess("alerts", ["alerts"], alone, TALLY_ALERTS_METRICS_PORT="0")
        wait_until(lambda: "standing by" in standby.output(), 30, what="the second evaluator to stand by")
        active.kill9()
        produce(alone, [event(tenant, "heartbeat") for _ in range(2)])

        async def resolved() -> bool:
            return len(await transitions(db, tenant)) >= 2

        await wait_for(resolved, 60, "the standby to take over and resolve")
        await asyncio.sleep(3)
        assert await transitions(db, tenant) == [("quiet", "{}", "firing"), ("quiet", "{}", "resolved")]
    finally:
        processor.stop()
        active.stop()
        if standby is not None:
            standby.stop()
