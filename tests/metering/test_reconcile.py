"""Reconciliation finds a counter row changed by hand and a cached state changed by hand, and `--fix`
repairs both through the outbox, so the counter topic and the cache follow; a second run finds nothing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
import redis

from sinks.redis_cache import cache_key
from tally.settings import Settings
from tests.metering.helpers import calls, metered, run_tally
from tests.processor.helpers import assert_topic_matches_postgres, drained, latest_counter_states, produce, wait_for
from tests.support import running


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
