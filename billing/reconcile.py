"""Reconciliation: recompute counter windows from the raw events with the processor's own meter code and
compare them with `counters`, the Redis cache and the latest state on the counter topic; compare each
period's Stripe rows with its billable quantity. Every difference is a `drift_reports` row.

`--fix` repairs every drifting window through the pipeline's own path: the absolute recomputed value is
written with its outbox row in one transaction (revision + 1), then the outbox relay publishes it to the
counter topic and the cache, exactly as after a processor batch. Stripe differences are not fixed here: an
under-report is sent by the next report run, an over-report is not taken back (docs/adr/0044).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from prometheus_client import Counter

from billing.context import JobContext
from processors.decode import Event
from processors.meters import MeterSet
from schemas.counters import CounterDelta, CounterState
from sinks.base import Record
from sinks.counter_topic import CounterTopicSink
from sinks.kafka import KafkaPublisher
from sinks.outbox import OutboxRelay
from sinks.redis_cache import RedisCounterCache, cache_key
from usage.periods import Anchor, period_of_date
from usage.terms import terms_for
from usage.windows import from_postgres

DRIFT = Counter("tally_reconcile_drift", "counter windows or Stripe periods found drifting", ["place"])

TopicStates = Callable[[str | None], dict[str, CounterState]]  # tenant (None: all) -> key -> latest state


@dataclass
class Drift:
    key: str
    tenant: str
    meter: str
    place: str
    expected: Decimal | None
    found: Decimal | None


@dataclass
class ReconcileReport:
    since: datetime
    until: datetime
    windows: int = 0
    drift: list[Drift] = field(default_factory=list)
    fixed: int = 0

    def figures(self) -> dict[str, Any]:
        places: dict[str, int] = {}
        for d in self.drift:
            places[d.place] = places.get(d.place, 0) + 1
        return {"since": self.since.isoformat(), "until": self.until.isoformat(), "windows": self.windows,
                "drift": places, "fixed": self.fixed}


_EVENTS = """
select tenant, source, id, type, subject, time, received_at, data::text as data from events
where counted and time >= $1 and time < $2 and ($3::text is null or tenant = $3)
"""
_COUNTERS = """
select key, tenant, meter, value, count from counters
where window_start >= $1 and window_end <= $2 and ($3::text is null or tenant = $3)
"""


def _inside(delta: CounterDelta, lo: datetime, hi: datetime) -> bool:
    return delta.key.window_start >= lo and delta.window_end <= hi


async def recompute(ctx: JobContext, lo: datetime, hi: datetime, tenant: str | None) -> dict[str, CounterDelta]:
    """The windows wholly inside [lo, hi), as the processor would have counted the stored events."""
    rows = await ctx.pool.fetch(_EVENTS, lo, hi, tenant)
    records = [Record(Event(r["tenant"], r["source"], r["id"], r["type"], r["subject"], r["time"], r["received_at"],
                             None if r["data"] is None else orjson.loads(r["data"])), 0, 0, True) for r in rows]
    return {key: d for key, d in MeterSet(ctx.config.meters).aggregate(records) if _inside(d, lo, hi)}


async def reconcile(ctx: JobContext, since: datetime, until: datetime | None = None, tenant: str | None = None,
                    fix: bool = False, topic_states: TopicStates | None = None) -> ReconcileReport:
    """Windows wholly inside [start of since's UTC day, until); until defaults to the end of today (UTC),
    so the windows still open are compared too (a processor writing meanwhile can show as drift)."""
    lo = _day(since)
    hi = until or _day(datetime.now(timezone.utc)) + timedelta(days=1)
    report = ReconcileReport(lo, hi)
    expected = await recompute(ctx, lo, hi, tenant)
    stored = {r["key"]: r for r in await ctx.pool.fetch(_COUNTERS, lo, hi, tenant)}
    keys = sorted(expected.keys() | stored.keys())
    report.windows = len(keys)

    def want(key: str) -> Decimal:
        return expected[key].value if key in expected else Decimal(0)

    for key in keys:
        row = stored.get(key)
        found = row["value"] if row is not None else None
        if found != want(key) or (row is not None and row["count"] != (expected[key].count if key in expected else 0)):
            report.drift.append(_drift(key, expected, row, "counters", found))

    cached = await _redis_values(ctx, keys)
    for key, value in cached.items():
        if value != want(key):
            report.drift.append(_drift(key, expected, stored.get(key), "redis", value))
    if topic_states is not None:
        latest = await asyncio.to_thread(topic_states, tenant)  # a Kafka read: off the event loop
        for key in keys:
            state = latest.get(key)
            if state is not None and Decimal(state.value) != want(key):
                report.drift.append(_drift(key, expected, stored.get(key), "topic", Decimal(state.value)))
    report.drift += await _stripe_drift(ctx, lo, tenant)

    if fix:
        # Any place out of step is repaired the same way: the recomputed value with a new revision,
        # which the outbox relay then carries to the topic and the cache.
        windows = {d.key: d for d in report.drift if d.place != "stripe"}
        report.fixed = await _fix(ctx, list(windows.values()), expected)
    await _record(ctx, report, fix)
    for d in report.drift:
        DRIFT.labels(d.place).inc()
    return report


def _day(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def _drift(key: str, expected: dict[str, CounterDelta], row: Any, place: str, found: Decimal | None) -> Drift:
    tenant, meter = (row["tenant"], row["meter"]) if row is not None else (expected[key].key.tenant,
                                                                          expected[key].key.meter)
    return Drift(key, tenant, meter, place, expected[key].value if key in expected else Decimal(0), found)


async def _redis_values(ctx: JobContext, keys: list[str]) -> dict[str, Decimal]:
    """The cached value of each window the cache still holds."""
    pipe = ctx.redis.pipeline(transaction=False)
    for key in keys:
        pipe.hget(cache_key(ctx.config.redis_prefix, key), "state")
    return {key: Decimal(orjson.loads(raw)["value"]) for key, raw in zip(keys, await pipe.execute()) if raw}


async def _stripe_drift(ctx: JobContext, lo: datetime, tenant: str | None) -> list[Drift]:
    """Ended periods (after `lo`) whose Stripe rows do not sum to the billable quantity of the counters."""
    out = []
    rows = await ctx.pool.fetch(
        "select r.tenant, r.subject, r.meter, r.period_label, r.period_end, s.time_zone, s.anchor_day,"
        " s.start_date, sum(r.value) as reported from stripe_reports r"
        " join subscriptions s using (tenant, subject)"
        " where r.period_end > $1 and r.period_end <= now() and ($2::text is null or r.tenant = $2)"
        " group by 1, 2, 3, 4, 5, 6, 7, 8", lo, tenant)
    for r in rows:
        period = period_of_date(Anchor(r["anchor_day"], r["time_zone"], r["start_date"]), r["period_label"])
        terms = await terms_for(ctx.pool, r["tenant"], r["subject"], period)
        if terms is None or r["meter"] not in terms.meters():
            continue
        windows = await from_postgres(ctx.pool, r["tenant"], r["subject"], [r["meter"]], period.start, period.end)
        quantity = terms.billable(r["meter"], windows[r["meter"]])
        if quantity != r["reported"]:
            out.append(Drift(f"{r['tenant']}/{r['subject']}/{r['meter']}/{r['period_label']}", r["tenant"],
                             r["meter"], "stripe", quantity, r["reported"]))
    return out


_FIX = """
insert into counters as c (key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp,
                           value, count, latest_time)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12)
on conflict (key) do update set value = excluded.value, count = excluded.count, latest_time = excluded.latest_time,
    revision = c.revision + 1, updated_at = now()
"""


async def _fix(ctx: JobContext, drift: list[Drift], expected: dict[str, CounterDelta]) -> int:
    """Write the recomputed absolute values with their outbox rows in one transaction, then relay them."""
    if not drift:
        return 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        for d in sorted(drift, key=lambda d: d.key):  # the processor's lock order
            if d.key in expected:
                e = expected[d.key]
                k = e.key
                await conn.execute(_FIX, d.key, k.tenant, k.meter, e.aggregation.value, k.window, k.window_start,
                                   e.window_end, k.subject, orjson.dumps(dict(k.group)).decode(), e.value, e.count,
                                   e.latest_time)
            else:
                await conn.execute("update counters set value = 0, count = 0, revision = revision + 1,"
                                   " updated_at = now() where key = $1", d.key)
            await conn.execute("insert into counter_outbox (key) values ($1)"
                               " on conflict (key) do update set queued_at = now()", d.key)
    c = ctx.config
    publisher = KafkaPublisher(c.kafka_bootstrap)
    cache = RedisCounterCache(c.redis_url, c.redis_prefix, c.redis_counter_ttl_s)
    try:
        states = await OutboxRelay(ctx.pool, CounterTopicSink(publisher, c.counters_topic)).publish_all()
        await cache.write(states)
        await cache.flush()
    finally:
        await cache.close()
        publisher.close()
    return len(drift)


async def _record(ctx: JobContext, report: ReconcileReport, fixed: bool) -> None:
    await ctx.pool.executemany(
        "insert into drift_reports (key, tenant, meter, place, expected, found, fixed) values ($1, $2, $3, $4, $5, $6,"
        " $7)", [(d.key, d.tenant, d.meter, d.place, d.expected, d.found, fixed and d.place != "stripe")
                 for d in report.drift])


def default_since(now: datetime) -> datetime:
    """The daily job's range: the last two UTC days, which covers every window still open to late events."""
    return now - timedelta(days=2)
