"""Reconciliation finds a counter row changed by hand and a cached state changed by hand, and `--fix`
repairs both through the outbox, so the counter topic and the cache follow; a second run finds nothing. A tenant's
meter versions are recounted each below its successor's starts."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
import pytest
import redis
from confluent_kafka import Producer

from tally.billing import jobs
from tally.billing.context import BillingConfig, JobContext
from tally.billing.reconcile import reconcile
from tally.billing.registry import RECONCILE
from tally.meters.definitions import load_meters
from tally.schemas.envelope import Envelope
from tally.sinks.counter_topic import CounterTopicSink
from tally.sinks.kafka import KafkaPublisher
from tally.sinks.outbox import OutboxRelay
from tally.sinks.redis_cache import cache_key
from tally.settings import Settings
from tests.metering.helpers import METERS, billed_subject, calls, metered, run_tally
from tests.metering.meters_helpers import (DEFINITIONS, backfilled, counters_of, events_for, expected_windows,
                                           meter_test, new_version)
from tests.processor.helpers import assert_topic_matches_postgres, drained, latest_counter_states, produce, wait_for
from tests.support import running
from tally.usage.periods import period_at, previous
from tally.usage.plans import load_subscriptions


async def test_reconcile_finds_injected_drift_and_fix_repairs_it_through_the_outbox(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    since = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    with running("processor", ["process"], settings):
        produce(settings, calls(tenant, "acme", 12) + calls(tenant, "other", 3, first=50))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
    args = ["reconcile", "--since", since, "--tenant", tenant]
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out

    key, revision = await db.fetchrow("select key, revision from counters where tenant = $1 and subject = 'acme'"
                                      " and window_name = 'hour' and meter = 'api_calls'", tenant)
    await db.execute("update counters set value = value + 5, count = count + 5 where key = $1", key)
    other = await db.fetchval("select key from counters where tenant = $1 and subject = 'other'"
                              " and window_name = 'day' and meter = 'api_calls'", tenant)
    cache = redis.Redis.from_url(settings.redis_url)
    state = orjson.loads(cache.hget(cache_key(settings.redis_prefix, other), "state"))
    cache.hset(cache_key(settings.redis_prefix, other), "state", orjson.dumps({**state, "value": "30"}))
    code, out = run_tally(args, settings)
    assert code == 1, out
    assert f"drift counters {key}  expected 12  found 17" in out
    assert f"drift redis    {other}  expected 3  found 30" in out
    drift = await db.fetch("select place, expected, found, fixed from drift_reports where key = $1", key)
    assert [(d["place"], d["expected"], d["found"], d["fixed"]) for d in drift] == [("counters", 12, 17, False)]

    code, out = run_tally([*args, "--fix"], settings)
    assert code == 0 and "2 counter window(s) fixed" in out, out
    assert orjson.loads(cache.hget(cache_key(settings.redis_prefix, other), "state"))["value"] == "3"
    row = await db.fetchrow("select value, count, revision from counters where key = $1", key)
    assert (row["value"], row["count"], row["revision"]) == (12, 12, revision + 1)
    assert await db.fetchval("select count(*) from counter_outbox where key = $1", key) == 0
    await assert_topic_matches_postgres(settings, db, tenant)
    assert (await asyncio.to_thread(latest_counter_states, settings))[key].revision == revision + 1
    cached = cache.hget(cache_key(settings.redis_prefix, key), "state")
    assert orjson.loads(cached)["revision"] == revision + 1
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out


RATE = 150  # events per second, about the rate of issue 18


def _produce_steadily(settings: Settings, tenant: str, stop: threading.Event) -> int:
    """Produce api.call events for two subjects at RATE a second until `stop`; returns how many."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5, "enable.idempotence": True})
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        now = datetime.now(timezone.utc)
        due = int((time.monotonic() - start) * RATE)
        while n < due:
            e = Envelope(id=f"call-{n}", source="app", type="api.call", subject="other" if n % 3 == 0 else "acme",
                         time=now - timedelta(seconds=30), received_at=now, data={}, tenant=tenant)
            producer.produce(settings.topics.events, e.to_bytes(), e.key())
            n += 1
        producer.poll(0)
        time.sleep(0.02)
    assert producer.flush(30) == 0
    return n


_EARLIER_TODAY = """
insert into events (tenant, source, id, type, subject, time, received_at, data, kafka_partition, kafka_offset, counted)
select $1, 'app', 'earlier-' || n, 'api.call', 'earlier', t, t, '{}', 0, n, true
from generate_series(1, $2) n, greatest(date_trunc('day', now()), now() - make_interval(secs => 60 + n % 3600)) t
"""


async def _counted_by_hand(db: asyncpg.Connection, tenant: str) -> dict[tuple[str, str, datetime], int]:
    """(subject, window, start) -> counted api.call events, counted from the stored events in SQL."""
    rows = await db.fetch(
        "select subject, w, date_trunc(w, time at time zone 'UTC') at time zone 'UTC' as start, count(*) as n"
        " from events, unnest(array['hour', 'day']) as w where tenant = $1 and counted and type = 'api.call'"
        " group by 1, 2, 3", tenant)
    return {(r["subject"], r["w"], r["start"]): r["n"] for r in rows}


async def test_fix_while_the_processor_counts_loses_no_counted_event(isolated: Settings,
                                                                    db: asyncpg.Connection) -> None:
    """Billing review H4: `reconcile --fix` run while events flow, with windows corrupted by hand so that
    there is drift to repair, leaves every window equal to its stored events, and the topic and the cache
    equal to PostgreSQL. The tenant's earlier calls today (stored, their windows still to repair) make the
    recomputation take the seconds a busy tenant's does."""
    settings = metered(isolated)
    tenant = f"live-{uuid.uuid4().hex[:8]}"
    await db.execute(_EARLIER_TODAY, tenant, 150_000)
    args = ["reconcile", "--since", datetime.now(timezone.utc).date().isoformat(), "--tenant", tenant]
    stop = threading.Event()
    with running("processor", ["process"], settings):
        producing = asyncio.create_task(asyncio.to_thread(_produce_steadily, settings, tenant, stop))
        await wait_for(lambda: _has_windows(db, tenant), 60, "the first windows")
        fixes = []
        for _ in range(3):
            # Drift to repair: a window counted 7 too many, another whose row was lost.
            hour = await db.fetchval("select key from counters where tenant = $1 and subject = 'acme' and"
                                     " meter = 'api_calls' and window_name = 'hour' order by window_start desc limit 1",
                                     tenant)
            await db.execute("update counters set value = value + 7, count = count + 7 where key = $1", hour)
            await db.execute("delete from counters where tenant = $1 and subject = 'other' and meter = 'api_calls'"
                             " and window_name = 'day'", tenant)
            code, out = await asyncio.to_thread(run_tally, [*args, "--fix"], settings)
            assert code == 0, out
            fixes.append(out)
        await asyncio.sleep(3)  # events still flow after the last fix
        stop.set()
        produced = await producing
        await wait_for(lambda: drained(settings, db), 120, "the processor")
    assert all(" fixed" in out and " 0 counter window(s)" not in out for out in fixes), fixes
    assert await db.fetchval("select count(*) from events where tenant = $1 and counted and subject <> 'earlier'",
                             tenant) == produced
    counters = await db.fetch("select subject, window_name, window_start, value, count from counters"
                              " where tenant = $1 and meter = 'api_calls'", tenant)
    assert {(r["subject"], r["window_name"], r["window_start"]): (int(r["value"]), r["count"]) for r in counters} == {
        k: (n, n) for k, n in (await _counted_by_hand(db, tenant)).items()}
    await assert_topic_matches_postgres(settings, db, tenant, "api_calls")
    cache = redis.Redis.from_url(settings.redis_url)
    for r in await db.fetch("select key, value::text as value, revision from counters where tenant = $1", tenant):
        state = orjson.loads(cache.hget(cache_key(settings.redis_prefix, r["key"]), "state"))
        assert (state["value"], state["revision"]) == (r["value"], r["revision"]), r["key"]
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out


async def _has_windows(db: asyncpg.Connection, tenant: str) -> bool:
    return await db.fetchval("select count(distinct subject) = 2 from counters where tenant = $1", tenant)


async def _counted_once(settings: Settings, db: asyncpg.Connection, tenant: str, batches: int) -> str:
    """Each batch of calls for `acme` counted and published in turn (a revision per batch); the hour key."""
    with running("processor", ["process"], settings):
        for b in range(batches):
            produce(settings, calls(tenant, "acme", 4, first=10 * b))
            await wait_for(lambda: drained(settings, db), 60, "the processor")
    return await db.fetchval("select key from counters where tenant = $1 and subject = 'acme' and meter = 'api_calls'"
                             " and window_name = 'hour'", tenant)


async def test_a_fix_committed_while_a_relay_publishes_is_not_dropped(isolated: Settings,
                                                                      db: asyncpg.Connection) -> None:
    """Billing review M1: a relay reads revision R of a window and publishes it; during its flush a fix
    commits R + 1. The relay then forgets only what it published, so the fix reaches the topic."""
    settings = metered(isolated)
    tenant = f"race-{uuid.uuid4().hex[:8]}"
    key = await _counted_once(settings, db, tenant, 1)
    # A processor batch gone wrong: revision R counts 5 calls that were never stored, queued to publish.
    revision = await db.fetchval("update counters set value = value + 5, count = count + 5, revision = revision + 1"
                                 " where key = $1 returning revision", key)
    await db.execute("insert into counter_outbox (tenant, key, revision) values ($1, $2, $3)", tenant, key, revision)
    fixes: list[tuple[int, str]] = []

    def fix_during_the_flush() -> None:
        fixes.append(run_tally(["reconcile", "--since", datetime.now(timezone.utc).date().isoformat(), "--tenant",
                                tenant, "--fix"], settings))

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    publisher = KafkaPublisher(settings.kafka_bootstrap)
    try:
        relay = OutboxRelay(pool, CounterTopicSink(publisher, settings.topics.counters), on_published=fix_during_the_flush)
        published = await relay.publish_once()
        assert [(s.key, s.revision) for s in published if s.tenant == tenant] == [(key, revision)]
        assert fixes and fixes[0][0] == 0 and "1 counter window(s) fixed" in fixes[0][1], fixes
        assert await db.fetchval("select revision from counter_outbox where key = $1", key) == revision + 1
        await OutboxRelay(pool, CounterTopicSink(publisher, settings.topics.counters)).publish_all()
    finally:
        publisher.close()
        await pool.close()
    assert await db.fetchval("select value from counters where key = $1", key) == 4
    await assert_topic_matches_postgres(settings, db, tenant, "api_calls")


async def test_a_lost_counter_row_comes_back_above_the_topics_revision(isolated: Settings,
                                                                       db: asyncpg.Connection) -> None:
    """Billing review M1: a window whose row was lost is re-inserted by the fix with a revision above the
    one the topic and the cache hold, so readers that keep the newest revision take it."""
    settings = metered(isolated)
    tenant = f"lost-{uuid.uuid4().hex[:8]}"
    key = await _counted_once(settings, db, tenant, 3)
    published = (await asyncio.to_thread(latest_counter_states, settings))[key].revision
    assert published == 3
    await db.execute("delete from counters where key = $1", key)
    code, out = run_tally(["reconcile", "--since", datetime.now(timezone.utc).date().isoformat(), "--tenant", tenant,
                           "--fix"], settings)
    assert code == 0 and "1 counter window(s) fixed" in out, out
    row = await db.fetchrow("select value, count, revision from counters where key = $1", key)
    assert (row["value"], row["count"]) == (12, 12) and row["revision"] > published
    await assert_topic_matches_postgres(settings, db, tenant, "api_calls")
    cached = orjson.loads(redis.Redis.from_url(settings.redis_url).hget(cache_key(settings.redis_prefix, key), "state"))
    assert (cached["value"], cached["revision"]) == ("12", row["revision"])


async def test_a_fix_over_its_budget_writes_nothing_and_says_so(isolated: Settings, db: asyncpg.Connection) -> None:
    """A fix holds a subject's windows at most its budget (below the processor's lock timeout): over it,
    the fix rolls back, leaves the window as it was and reports it drifting and not fixed."""
    settings = metered(isolated)
    tenant = f"budget-{uuid.uuid4().hex[:8]}"
    key = await _counted_once(settings, db, tenant, 1)
    await db.execute("update counters set value = value + 5, count = count + 5 where key = $1", key)
    config = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                           settings.redis_counter_ttl_s, load_meters(inline=METERS))
    ctx = await JobContext.open(config)
    today = datetime.now(timezone.utc)
    try:
        report = await reconcile(ctx, today, tenant=tenant, fix=True, fix_budget_s=0.001)
        assert key in report.unfixed and not report.fixed
        assert await db.fetchval("select value from counters where key = $1", key) == 9
        assert await db.fetchval("select fixed from drift_reports where key = $1 and place = 'counters'", key) is False
        report = await reconcile(ctx, today, tenant=tenant, fix=True)
        assert report.fixed == {key} and not report.unfixed
        assert await db.fetchval("select value from counters where key = $1", key) == 4
    finally:
        await ctx.close()


MIXED = METERS + """
  - {slug: latency, event_type: "api.call", aggregation: AVG, value_path: data.ms, windows: [hour, day]}
  - {slug: users, event_type: "api.call", aggregation: UNIQUE_COUNT, value_path: data.user, windows: [hour, day]}
"""


async def test_average_and_unique_count_windows_are_not_rewritten(isolated: Settings, db: asyncpg.Connection) -> None:
    """An AVG window is compared by its exact sum, not its quotient, and a UNIQUE_COUNT window (state the events
    alone do not give) is not compared: a correct pipeline shows no drift and `--fix` writes nothing."""
    settings = metered(isolated).model_copy(update={"meters": MIXED})
    tenant = f"mixed-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    with running("processor", ["process"], settings):
        produce(settings, [Envelope(id=f"call-{n}", source="app", type="api.call", subject="acme",
                                    time=now - timedelta(seconds=30), received_at=now,
                                    data={"ms": n, "user": f"u{n % 3}"}, tenant=tenant) for n in range(1, 8)])
        await wait_for(lambda: drained(settings, db), 60, "the processor")
    before = {r["key"]: (r["value"], r["revision"]) for r in await db.fetch(
        "select key, value, revision from counters where tenant = $1", tenant)}
    args = ["reconcile", "--since", now.date().isoformat(), "--tenant", tenant]
    code, out = run_tally([*args, "--fix"], settings)
    assert code == 0 and "0 drift(s), 0 counter window(s) fixed" in out, out
    after = {r["key"]: (r["value"], r["revision"]) for r in await db.fetch(
        "select key, value, revision from counters where tenant = $1", tenant)}
    assert after == before and sorted(v for v, _ in after.values()) == [3, 3, 4, 4, 7, 7]


EVENTS = 800_000
_MANY_EVENTS = """
insert into events (tenant, source, id, type, subject, time, received_at, data, kafka_partition, kafka_offset, counted)
select $1, 'app', 'e-' || n, 'api.call', 's-' || (n % 40), now() - make_interval(mins => n % 1200), now(), '{}', 0, n,
       true
from generate_series(1, $2) n
"""


async def test_the_daily_reconcile_never_stalls_the_hard_limit_refresh(
        settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Billing review M4: the jobs worker refreshes hard limits every 0.5 s while its daily reconcile
    recomputes the windows of many events; the refresh never waits more than a few seconds."""
    tenant = f"many-{uuid.uuid4().hex[:8]}"
    # Another test's worker may have run today's reconcile in this session's database: this one must run it.
    await db.execute("delete from job_runs where job = 'reconcile'")
    await db.execute(_MANY_EVENTS, tenant, EVENTS)
    config = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                           settings.redis_counter_ttl_s, load_meters(inline=METERS), tick_s=0.2)
    ctx = await JobContext.open(config)
    refreshed: list[float] = []
    refresh = jobs.refresh_limits

    async def timed(ctx_: JobContext) -> int:
        refreshed.append(time.monotonic())
        return await refresh(ctx_)

    monkeypatch.setattr(jobs, "refresh_limits", timed)
    stop = asyncio.Event()
    try:
        worker = asyncio.create_task(jobs.work(ctx, [RECONCILE], stop))
        await wait_for(lambda: _reconciled(db), 600, "the daily reconcile")
        refreshed.append(time.monotonic())  # the gap before the run ended counts too
        stop.set()
        await worker
    finally:
        await ctx.close()
    figures = orjson.loads(await db.fetchval("select figures from job_runs where job = 'reconcile' and status = 'ok'"))
    assert figures["windows"] >= 40 * 20
    gaps = [b - a for a, b in zip(refreshed, refreshed[1:])]
    assert max(gaps) < 5, f"{len(gaps)} refreshes, the longest gap {max(gaps):.1f} s"


async def _reconciled(db: asyncpg.Connection) -> bool:
    return await db.fetchval("select count(*) from job_runs where job = 'reconcile' and status in ('ok', 'failed')") > 0


async def test_stripe_drift_counts_only_rows_that_count_as_billed(isolated: Settings, db: asyncpg.Connection) -> None:
    """A row Stripe refused bills nothing: an ended period whose only rows were refused has not drifted,
    and one with a sent row beyond its billable quantity has."""
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await billed_subject(db, tenant, "acme", "cus_acme", included=0)
    sub = (await load_subscriptions(db, tenant, "acme"))[0][1]
    ended = previous(sub.anchor(), period_at(sub.anchor(), datetime.now(timezone.utc)))
    insert = ("insert into stripe_reports (identifier, tenant, subject, meter, period_label, period_end, seq, kind,"
              " event_name, stripe_customer_id, value, event_time, status) values ($1, $2, 'acme', 'api_calls', $3,"
              " $4, $5, 'usage', 'api_calls', 'cus_acme', $6, $4::timestamptz - interval '1 second', $7)")
    await db.execute(insert, f"refused-{tenant}", tenant, ended.label, ended.end, 1, 5, "failed")
    args = ["reconcile", "--since", (ended.end - timedelta(days=1)).date().isoformat(), "--tenant", tenant]
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out

    await db.execute(insert, f"sent-{tenant}", tenant, ended.label, ended.end, 2, 3, "sent")
    code, out = run_tally(args, settings)
    assert code == 1 and f"drift stripe   {tenant}/acme/api_calls/{ended.label}  expected 0  found 3" in out, out


async def test_reconcile_recounts_each_tenant_version_below_its_successors_starts(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, base, now = meter_test(isolated)
    with running("processor", ["process"], settings):
        produce(settings, events_for(a, base, now, 60, 0))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        v1 = await new_version(db, a, "tokens", 1, DEFINITIONS["tokens"])
        produce(settings, events_for(a, base, now, 60, 60))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        await backfilled(settings, db, a, [v1])
        v2 = await new_version(db, a, "tokens", 2, {**DEFINITIONS["tokens"], "windows": ["day"]})
        produce(settings, events_for(a, base, now, 60, 120))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        await backfilled(settings, db, a, [v2])
    # v1 stopped where v2 took over: its counters hold a part of the events, v2's all of them.
    stored = await db.fetch("select type, subject, time, data::text as data, kafka_partition, kafka_offset from events"
                            " where tenant = $1", a)
    assert 0 < len(await counters_of(db, a, "tokens")) and await counters_of(db, a, "tokens") != {
        k: v for k, v in expected_windows(stored, "tokens").items() if k[0] == "hour"}
    await new_version(db, a, "calls", 1, DEFINITIONS["calls"])  # its backfill not run: not compared, and said so

    args = ["reconcile", "--since", base.date().isoformat(), "--tenant", a]
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out
    assert f"not compared: {a}/calls (its backfill is not done)" in out, out

    old = await db.fetchval("select key from counters where tenant = $1 and meter = 'tokens' and window_name = 'hour'"
                            " order by key limit 1", a)
    new = await db.fetchval("select key from counters where tenant = $1 and meter = 'tokens@2' order by key limit 1", a)
    await db.execute("update counters set value = value + 5 where key = any($1::text[])", [old, new])
    code, out = run_tally(args, settings)
    assert code == 1, out
    assert f"drift counters {old}" in out and f"drift counters {new}" in out and "2 drift(s)" in out, out
    code, out = run_tally([*args, "--fix"], settings)
    assert code == 0 and "2 counter window(s) fixed" in out, out
    code, out = run_tally(args, settings)
    assert code == 0 and "0 drift(s)" in out, out
