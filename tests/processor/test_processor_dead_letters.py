"""Poison mixed into good events: poison lands in the DLQ with its reason, the good ones are persisted,
and a replay after fixing the cause persists the fixed ones exactly once, however often it runs."""

from __future__ import annotations

import subprocess
import sys
import uuid

import asyncpg
import httpx
import orjson

from tally.schemas.deadletter import DeadLetter
from tally.settings import ROOT, Settings
from tests.processor.helpers import counter_counts, drained, envelope, event_count, expected_counts, produce, wait_for
from tests.support import env_for, free_port, read_topic, running

METERS = """
meters:
  - {slug: events, event_type: "*", group_by: {type: type}, windows: [hour, day]}
  - {slug: revenue, event_type: "order.*", aggregation: SUM, value_path: data.amount, windows: [day]}
"""


def tally(settings: Settings, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env_for(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_message(m.headers(), m.key(), m.value())
            for m in read_topic(settings.kafka_bootstrap, settings.topics.dlq)]


async def test_poison_goes_to_the_dlq_with_its_reason_and_a_replay_after_the_fix_persists_it_once(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"poison-{uuid.uuid4().hex[:8]}"
    port = free_port()
    strict = isolated.model_copy(update={"accept_types": "order.*", "meters": METERS, "processor_metrics_port": port})
    good = [envelope(tenant, n, data={"amount": n}) for n in range(100)]
    refunds = [envelope(tenant, 1000 + n, type_="refund.issued", data={"amount": 1}) for n in range(5)]
    unmeterable = [envelope(tenant, 2000 + n, data={"amount": "lots"}) for n in range(5)]
    schema_mismatch = [(b"k", orjson.dumps({"id": f"x{n}", "source": "shop", "type": "order.placed"})) for n in range(5)]
    not_json = [(b"k", b"{oops " + str(n).encode()) for n in range(5)]
    produce(strict, good[:50] + not_json + refunds + schema_mismatch + good[50:] + unmeterable)

    with running("processor", ["process"], strict):
        await wait_for(lambda: drained(strict, db), 60, "the processor to drain the topic")
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in ('tally_processor_consumed_total 120.0', 'tally_processor_persisted_total 100.0',
                 'tally_processor_dead_lettered_total{error_class="InvalidJSON",stage="decode"} 5.0',
                 'tally_processor_dead_lettered_total{error_class="MeterError",stage="meter"} 5.0'):
        assert line in scraped
    assert "tally_processor_consumer_lag{" in scraped and "tally_processor_end_to_end_seconds_count 100.0" in scraped
    assert await event_count(db, tenant) == 100

    reasons = sorted((d.stage, d.error_class, d.topic, d.attempts) for d in letters(strict))
    assert reasons == sorted(
        [("decode", "InvalidJSON", strict.topics.events, 1)] * 5 + [("decode", "SchemaMismatch", strict.topics.events, 1)] * 5
        + [("validate", "UnknownEventType", strict.topics.events, 1)] * 5 + [("meter", "MeterError", strict.topics.events, 1)] * 5
    )
    listing = tally(strict, "dlq", "list", "--error-class", "UnknownEventType")
    assert listing.count("UnknownEventType") == 5 and "5 dead letters" in listing
    first = listing.splitlines()[0].split()[0]
    shown = tally(strict, "dlq", "show", first)
    assert "tally.dlq.error_class: UnknownEventType" in shown and "refund.issued" in shown

    # The fix: refunds are an accepted type now. Replaying everything twice persists them once; what is still
    # poison comes back to the DLQ with its attempts counted.
    fixed = strict.model_copy(update={"accept_types": "order.*,refund.*"})
    with running("processor", ["process"], fixed):
        assert "replayed 20/20" in tally(fixed, "dlq", "replay")
        await wait_for(lambda: drained(fixed, db), 60, "the replayed letters to be processed")
        assert "replayed 5/5" in tally(fixed, "dlq", "replay", "--error-class", "UnknownEventType")
        await wait_for(lambda: drained(fixed, db), 60, "the second replay to be processed")

    assert await event_count(db, tenant) == 105
    assert await counter_counts(db, tenant) == expected_counts(good + refunds)
    revenue = await db.fetchval("select sum(value) from counters where tenant = $1 and meter = 'revenue'", tenant)
    assert revenue == sum(range(100))
    again = [d for d in letters(fixed) if d.attempts == 2]
    assert sorted(d.error_class for d in again) == ["InvalidJSON"] * 5 + ["MeterError"] * 5 + ["SchemaMismatch"] * 5


async def test_a_tenants_own_meter_dead_letters_only_that_tenants_unreadable_events(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    """A tenant's SUM meter that cannot read an event's value dead-letters that event, naming the meter; another
    tenant's events of the same shape are stored, and the worker goes on with both tenants' good events."""
    a, b = f"own-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"meters_poll_s": 0.2})
    async with db.transaction():
        vid = await db.fetchval("insert into meter_versions (tenant, slug, version, definition) values ($1, 'spend', 1,"
                                " $2::jsonb) returning id", a, orjson.dumps({
                                    "event_type": "order.*", "aggregation": "SUM", "value_path": "data.amount",
                                    "windows": ["hour"]}).decode())
        await db.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", a, vid)
    hostile = [envelope(a, 500 + n, data={"amount": "lots"}) for n in range(3)]
    same_shape = [envelope(b, 500 + n, data={"amount": "lots"}) for n in range(3)]
    good = [envelope(t, n, data={"amount": n}) for t in (a, b) for n in range(20)]
    produce(settings, good[:10] + hostile + same_shape + good[10:])
    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic")
    assert (await event_count(db, a), await event_count(db, b)) == (20, 23)
    dead = letters(settings)
    assert sorted((d.stage, d.error_class) for d in dead) == [("meter", "MeterError")] * 3
    assert all(d.value is not None and a.encode() in d.value and "spend" in d.message for d in dead)
    spent = await db.fetchval("select sum(value) from counters where tenant = $1 and meter = 'spend'", a)
    assert spent == sum(range(20))
