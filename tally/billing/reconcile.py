"""Reconciliation: recompute counter windows from the raw events with the processor's own meter code and
compare them with `counters`, the Redis cache and the latest state on the counter topic; compare each
period's Stripe rows with its billable quantity. Every difference is a `drift_reports` row.

It runs beside a live processor, open windows included (docs/adr/0070). The processor commits a batch's
events and their counter updates in one transaction, so the comparison reads both in one REPEATABLE READ
snapshot: what it finds is drift, never events counted meanwhile. A cached or published state is compared
only at the revision the snapshot holds (a newer one is past the snapshot, an older one still queued is on
its way).

`--fix` never writes a value from that snapshot. It locks the drifting windows' counter rows (inserting a
missing one) in key order, as the processor's upsert does, recounts their events in a statement that
starts once it holds them, and writes that absolute value: a processor transaction that committed before
is in the recount, one that had not waits on the lock and adds its delta to the fixed value. The written
revision is above the row's, the topic's and the cache's, and the outbox entry is raised to it, so a relay
publishing an older state meanwhile keeps it queued (sinks.outbox.queue); then the relay publishes it to
the counter topic and the cache, exactly as after a processor batch. Stripe differences are not fixed
here: an under-report is sent by the next report run, an over-report is not taken back (docs/adr/0044).

A tenant's meter version is compared once its backfill is done (one still backfilling is named in the report, not
compared): its counters hold exactly the tenant's events below its successor's starts (`meter_starts`; all of them
for the newest version), the backfill having counted those below its own starts and live counting the rest, so its
recount is the same recount over those events, keyed by `Meter.counter` (docs/adr/0152). The catalog and the starts
are read in the comparison's snapshot.

Events are streamed through a server-side cursor and folded chunk by chunk in a thread, so memory holds
windows, not events, and the jobs worker's event loop (the hard-limit refresh every 0.5 s) never waits for
more than one chunk. UNIQUE_COUNT and WEIGHTED_SUM windows depend on state the events alone do not give
(tally/meters/stateful.py) and are not compared.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, Inexact
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter

from tally.billing.context import JobContext
from tally.billing.stripe_report import COUNTED
from tally.meters.catalog import Catalog
from tally.meters.definitions import STATEFUL, MetersConfig
from tally.meters.meterset import MeterSet
from tally.schemas.counters import Aggregation, CounterDelta, CounterState
from tally.sinks.base import EVENT_COLUMNS, Record, stored_event
from tally.sinks.outbox import queue
from tally.sinks.redis_cache import cache_key
from tally.usage.periods import Anchor, period_of_date
from tally.usage.terms import terms_for
from tally.usage.windows import from_postgres

log = logging.getLogger("tally.billing.reconcile")

DRIFT = Counter("tally_reconcile_drift", "counter windows or Stripe periods found drifting", ["place"])

TopicStates = Callable[[str | None], dict[str, CounterState]]  # tenant (None: all) -> key -> latest state

_CHUNK = 5000  # events read and folded per step: bounds the memory and each step's time away from the loop
# How long a fix may hold a subject's windows: below the processor's lock_timeout (TALLY_PG_LOCK_TIMEOUT_MS,
# 20 s by default), so a processor batch waiting on them is never failed for it.
FIX_BUDGET_S = 10.0
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact])  # sums of chunks, never rounded


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
    fixed: set[str] = field(default_factory=set)  # the windows a fix wrote
    skipped: list[str] = field(default_factory=list)  # tenant/counter of versions not compared: backfill not done

    @property
    def unfixed(self) -> set[str]:
        """Drifting windows a fix did not write (over its budget, or no fix asked)."""
        return {d.key for d in self.drift if d.place != "stripe"} - self.fixed

    def figures(self) -> dict[str, Any]:
        places: dict[str, int] = {}
        for d in self.drift:
            places[d.place] = places.get(d.place, 0) + 1
        return {"since": self.since.isoformat(), "until": self.until.isoformat(), "windows": self.windows,
                "drift": places, "fixed": len(self.fixed), "skipped": self.skipped}


_EVENTS = f"""
select {EVENT_COLUMNS} from events
where counted and time >= $1 and time < $2 and ($3::text is null or tenant = $3)
  and ($4::text is null or subject = $4)
  and ($5::bigint[] is null or kafka_offset < coalesce(($5::bigint[])[kafka_partition + 1], {2 ** 63 - 1}))
  and tenant <> all($6::text[])
"""
# The starts of the version that took over from version $2 of the tenant's meter (the next one of its slug).
_SUCCESSOR_STARTS = """
select kafka_partition, start_offset from meter_starts
where tenant = $1 and version_id = (select min(n.id) from meter_versions v join meter_versions n
                                    on n.tenant = v.tenant and n.slug = v.slug and n.id > v.id
                                    where v.tenant = $1 and v.id = $2)
"""
# AVG is compared by its exact sum (`total`): its value is the quotient PostgreSQL rounds.
_COUNTERS = """
select key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp::text as grp,
       case when aggregation = 'AVG' then total else value end as value, count, revision from counters
where window_start >= $1 and window_end <= $2 and ($3::text is null or tenant = $3) and meter = any($4::text[])
"""
_QUEUED = "select key from counter_outbox join unnest($1::text[], $2::text[]) as u(tenant, key) using (tenant, key)"


@dataclass(frozen=True)
class _Scope:
    """What one recount covers: the deploy-time meters over every tenant's events (`tenant` None) or one tenant's,
    or one version of a tenant's meter (`version`) over its tenant's events below its successor's starts."""

    meters: MeterSet
    tenant: str | None
    version: int | None = None  # the version's id
    leave_out: frozenset[str] = frozenset()  # tenants whose own meters shadow deploy-time ones: recounted apart

    async def until(self, conn: asyncpg.Connection) -> list[int | None] | None:
        """The successor's start per partition, as the transaction sees them (None where it has none: every
        event); None for the deploy-time meters."""
        if self.version is None:
            return None
        starts = {r[0]: r[1] for r in await conn.fetch(_SUCCESSOR_STARTS, self.tenant, self.version)}
        return [starts.get(p) for p in range(max(starts, default=-1) + 1)]


def _scopes(catalog: Catalog, tenant: str | None) -> tuple[list[_Scope], list[str]]:
    """The recounts to compare: the deploy-time meters (less those a tenant shadows, ADR 0153), and each tenant
    version whose backfill is done; and the tenant/counter of the versions left out (their backfill is not done:
    their counters are not whole yet)."""
    shadowed = catalog.shadowed()
    if tenant is None:
        scopes = [_Scope(MeterSet(catalog.built_ins), None, leave_out=frozenset(shadowed))]
        scopes += [_Scope(MeterSet(catalog.built_ins_for(t)), t) for t in sorted(shadowed)]
    else:
        scopes = [_Scope(MeterSet(catalog.built_ins_for(tenant)), tenant)]
    skipped: list[str] = []
    for t in sorted(catalog.tenants()) if tenant is None else [tenant]:
        for v in catalog.versions(t):
            if v.meter is None:
                continue
            if catalog.backfill(t, v.id) != "done":
                skipped.append(f"{t}/{v.meter.counter}")
                continue
            scopes.append(_Scope(MeterSet(MetersConfig(meters=[v.meter])), t, v.id))
    return scopes, skipped


class _Recount:
    """The windows the stored counted events make, folded from a stream of events in bounded chunks."""

    def __init__(self, scope: _Scope) -> None:
        self._scope = scope
        self.windows: dict[str, CounterDelta] = {}

    async def read(self, conn: asyncpg.Connection, lo: datetime, hi: datetime, tenant: str | None,
                   subject: str | None = None, deadline: float | None = None) -> None:
        """Fold the counted events of [lo, hi) (of one tenant, one subject; none of a tenant the scope leaves out) in,
        below the scope's successor's starts; inside a transaction. Past `deadline` (time.monotonic) it raises
        TimeoutError."""
        cursor = await conn.cursor(_EVENTS, lo, hi, tenant, subject, await self._scope.until(conn),
                                   sorted(self._scope.leave_out))
        while rows := await cursor.fetch(_CHUNK):
            await asyncio.to_thread(self._fold, rows)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the recount took longer than its budget")

    def _fold(self, rows: Iterable[asyncpg.Record]) -> None:
        records, refused = self._scope.meters.readable([Record(stored_event(r), 0, 0, True) for r in rows])
        if refused:
            log.warning("the recount of %s leaves out %d stored events its meters cannot read, as their backfill "
                        "did (first: %s)", self._scope.tenant or "every tenant", len(refused), refused[0][1])
        for key, delta in self._scope.meters.aggregate(records):
            seen = self.windows.get(key)
            self.windows[key] = delta if seen is None else _merge(seen, delta)


def _merge(a: CounterDelta, b: CounterDelta) -> CounterDelta:
    """Two chunks' deltas of one window as one."""
    if a.aggregation in (Aggregation.COUNT, Aggregation.SUM, Aggregation.AVG):
        value = _EXACT.add(a.value, b.value)
    elif a.aggregation is Aggregation.MAX:
        value = max(a.value, b.value)
    elif a.aggregation is Aggregation.MIN:
        value = min(a.value, b.value)
    else:  # LATEST: the later event's value
        value = b.value if b.latest_time >= a.latest_time else a.value
    total = None if a.total is None else _EXACT.add(a.total, b.total)
    return replace(a, value=value, count=a.count + b.count, latest_time=max(a.latest_time, b.latest_time), total=total)


def _inside(delta: CounterDelta, lo: datetime, hi: datetime) -> bool:
    return delta.key.window_start >= lo and delta.window_end <= hi


def _compared(meters: MeterSet) -> list[str]:
    """The counters whose windows the events alone determine."""
    return [m.counter for m in meters.meters if m.aggregation not in STATEFUL]


async def _recounts(ctx: JobContext, conn: asyncpg.Connection, lo: datetime, hi: datetime, tenant: str | None,
                    subject: str | None = None) -> tuple[list[_Scope], list[str], dict[str, CounterDelta]]:
    """Inside a transaction: the scopes compared, the versions left out, and the windows wholly inside [lo, hi)
    as the processors and the backfills counted the stored events, the catalog read in the same transaction."""
    catalog = Catalog(ctx.config.meters)
    await catalog.refresh(conn)
    scopes, skipped = _scopes(catalog, tenant)
    expected: dict[str, CounterDelta] = {}
    for scope in scopes:
        recount = _Recount(scope)
        await recount.read(conn, lo, hi, scope.tenant, subject)
        expected.update((k, d) for k, d in recount.windows.items() if _inside(d, lo, hi))
    return scopes, skipped, expected


async def recompute(ctx: JobContext, lo: datetime, hi: datetime, tenant: str,
                    subject: str | None = None) -> dict[str, CounterDelta]:
    """The windows wholly inside [lo, hi) as the processor would count the stored events, keyed by counter: the
    deploy-time meters and each of the tenant's versions whose backfill is done (billing explain)."""
    async with ctx.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return (await _recounts(ctx, conn, lo, hi, tenant, subject))[2]


@dataclass
class _Snapshot:
    expected: dict[str, CounterDelta]
    stored: dict[str, asyncpg.Record]
    queued: set[str]
    scopes: list[_Scope]
    skipped: list[str]


async def _snapshot(ctx: JobContext, lo: datetime, hi: datetime, tenant: str | None) -> _Snapshot:
    """The recomputed windows, the stored ones and the queued keys, as of one instant."""
    async with ctx.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        scopes, skipped, expected = await _recounts(ctx, conn, lo, hi, tenant)
        stored = {r["key"]: r for scope in scopes
                  for r in await conn.fetch(_COUNTERS, lo, hi, scope.tenant, _compared(scope.meters))}
        queued = {r[0] for r in await conn.fetch(_QUEUED, [r["tenant"] for r in stored.values()], list(stored))}
    return _Snapshot(expected, stored, queued, scopes, skipped)


async def reconcile(ctx: JobContext, since: datetime, until: datetime | None = None, tenant: str | None = None,
                    fix: bool = False, topic_states: TopicStates | None = None,
                    fix_budget_s: float = FIX_BUDGET_S) -> ReconcileReport:
    """Windows wholly inside [start of since's UTC day, until); until defaults to the end of today (UTC),
    so the windows still open are compared too."""
    lo = _day(since)
    hi = until or _day(datetime.now(timezone.utc)) + timedelta(days=1)
    snap = await _snapshot(ctx, lo, hi, tenant)
    report = ReconcileReport(lo, hi, skipped=snap.skipped)
    expected, stored = snap.expected, snap.stored
    keys = sorted(expected.keys() | stored.keys())
    report.windows = len(keys)

    def want(key: str) -> Decimal:
        return expected[key].value if key in expected else Decimal(0)

    for key in keys:
        row = stored.get(key)
        found = row["value"] if row is not None else None
        if found != want(key) or (row is not None and row["count"] != (expected[key].count if key in expected else 0)):
            report.drift.append(_drift(key, expected, row, "counters", found))

    outside: dict[str, int] = {}  # the highest revision the cache or the topic holds of each window

    def compare(place: str, key: str, revision: int, value: Decimal) -> None:
        outside[key] = max(outside.get(key, 0), revision)
        row = stored.get(key)
        at = None if row is None else row["revision"]
        if at is not None and (revision > at or (revision < at and key in snap.queued)):
            return  # newer than the snapshot, or an older state whose newer one is on its way
        if value != want(key) or (at is not None and revision < at):
            report.drift.append(_drift(key, expected, row, place, value))

    for key, (revision, value) in (await _redis_states(ctx, keys)).items():
        compare("redis", key, revision, value)
    if topic_states is not None:
        latest = await asyncio.to_thread(topic_states, tenant)  # a Kafka read: off the event loop
        for key in keys:
            state = latest.get(key)
            if state is not None:
                compare("topic", key, state.revision, _compared_value(state))
    report.drift += await _stripe_drift(ctx, lo, tenant)

    if fix:
        # Any place out of step is repaired the same way: the recounted value with a new revision,
        # which the outbox relay then carries to the topic and the cache.
        windows = sorted({d.key for d in report.drift if d.place != "stripe"})
        report.fixed = await _fix(ctx, [_columns(k, expected, stored) for k in windows], outside, fix_budget_s,
                                  snap.scopes)
    await _record(ctx, report)
    for d in report.drift:
        DRIFT.labels(d.place).inc()
    return report


def _compared_value(state: CounterState) -> Decimal:
    """What `counters` compares of a published state (AVG: its exact sum)."""
    return Decimal(state.sum if state.aggregation == Aggregation.AVG and state.sum is not None else state.value)


def _day(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def _drift(key: str, expected: dict[str, CounterDelta], row: Any, place: str, found: Decimal | None) -> Drift:
    tenant, meter = (row["tenant"], row["meter"]) if row is not None else (expected[key].key.tenant,
                                                                          expected[key].key.meter)
    return Drift(key, tenant, meter, place, expected[key].value if key in expected else Decimal(0), found)


async def _redis_states(ctx: JobContext, keys: list[str]) -> dict[str, tuple[int, Decimal]]:
    """The cached (revision, value) of each window the cache still holds."""
    out = {}
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i:i + _CHUNK]
        pipe = ctx.redis.pipeline(transaction=False)
        for key in chunk:
            pipe.hget(cache_key(ctx.config.redis_prefix, key), "state")
        for key, raw in zip(chunk, await pipe.execute()):
            if raw:
                state = CounterState.from_bytes(raw)
                out[key] = (state.revision, _compared_value(state))
    return out


async def _stripe_drift(ctx: JobContext, lo: datetime, tenant: str | None) -> list[Drift]:
    """Ended periods (after `lo`) whose rows that count as billed (not refused, superseded or cancelled ones)
    do not sum to the billable quantity of the counters."""
    out = []
    rows = await ctx.pool.fetch(
        "select r.tenant, r.subject, r.meter, r.period_label, r.period_end, s.time_zone, s.anchor_day,"
        " s.start_date, coalesce(sum(r.value) filter (where r.status = any($3::text[])), 0) as reported"
        " from stripe_reports r join subscriptions s using (tenant, subject)"
        " where r.period_end > $1 and r.period_end <= now() and ($2::text is null or r.tenant = $2)"
        " group by 1, 2, 3, 4, 5, 6, 7, 8", lo, tenant, list(COUNTED))
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


# The drifting windows' rows, locked in key order as the processor's upsert locks them; a missing row is
# inserted empty and held the same way (a processor inserting it meanwhile waits for this transaction).
_LOCK = """
insert into counters as c (key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp,
                           value, count, latest_time)
select k, t, m, a, w, ws, we, s, g::jsonb, 0, 0, ws
from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
            $8::text[], $9::text[]) as u(k, t, m, a, w, ws, we, s, g)
order by k
on conflict (tenant, key) do update set revision = c.revision
"""

# The recounted absolute values, at a revision above the row's and any the cache or the topic holds.
_WRITE = """
update counters c set
    value = case when c.aggregation = 'AVG' then coalesce(u.tot / nullif(u.n, 0), 0) else u.v end,
    count = u.n, total = u.tot, latest_time = coalesce(u.lt, c.latest_time),
    revision = greatest(c.revision, u.outside) + 1, updated_at = now()
from unnest($1::text[], $2::text[], $3::numeric[], $4::bigint[], $5::timestamptz[], $6::numeric[], $7::bigint[])
     as u(t, k, v, n, lt, tot, outside)
where c.tenant = u.t and c.key = u.k
returning c.tenant, c.key, c.revision
"""


@dataclass(frozen=True)
class _Window:
    key: str
    tenant: str
    meter: str
    aggregation: str
    window: str
    start: datetime
    end: datetime
    subject: str | None
    grp: str


def _columns(key: str, expected: dict[str, CounterDelta], stored: dict[str, asyncpg.Record]) -> _Window:
    if key in expected:
        d = expected[key]
        k = d.key
        return _Window(key, k.tenant, k.meter, d.aggregation.value, k.window, k.window_start, d.window_end, k.subject,
                       orjson.dumps(dict(k.group)).decode())
    r = stored[key]
    return _Window(key, r["tenant"], r["meter"], r["aggregation"], r["window_name"], r["window_start"],
                   r["window_end"], r["subject"], r["grp"])


def _scope_of(scopes: list[_Scope], w: _Window) -> int:
    """The index of the scope that counts the window's counter for its tenant."""
    return next(i for i, s in enumerate(scopes) if s.tenant in (None, w.tenant) and w.meter in _compared(s.meters))


async def _fix(ctx: JobContext, windows: list[_Window], outside: dict[str, int], budget_s: float,
               scopes: list[_Scope]) -> set[str]:
    """Fix the windows a tenant's subject (or a tenant-wide meter) and scope at a time, then relay them; the keys
    fixed."""
    groups: dict[tuple[str, str | None, int], list[_Window]] = {}
    for w in windows:
        groups.setdefault((w.tenant, w.subject, _scope_of(scopes, w)), []).append(w)
    fixed: set[str] = set()
    for (tenant, subject, scope), group in groups.items():
        try:
            fixed |= await _fix_group(ctx, scopes[scope], group, outside, budget_s)
        except (TimeoutError, asyncpg.QueryCanceledError):
            log.warning("reconcile: the windows of %s/%s not fixed, their recount took over %.0f s",
                        tenant, subject, budget_s)
    if fixed:
        await ctx.relay_counters()
    return fixed


async def _fix_group(ctx: JobContext, scope: _Scope, windows: list[_Window], outside: dict[str, int],
                     budget_s: float) -> set[str]:
    """One transaction: lock the windows, recount their events, write the values with their outbox entries.
    Over the budget it rolls back, so a processor batch waiting on these rows never waits longer."""
    deadline = time.monotonic() + budget_s
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"set local statement_timeout = {max(1, int(budget_s * 1000))}")
        await conn.execute(_LOCK, *map(list, zip(*((w.key, w.tenant, w.meter, w.aggregation, w.window, w.start,
                                                        w.end, w.subject, w.grp) for w in windows))))
        # Recounted once the locks are held: every transaction that counted into these windows has committed.
        recount = _Recount(scope)
        await recount.read(conn, min(w.start for w in windows), max(w.end for w in windows), windows[0].tenant,
                           windows[0].subject, deadline)
        now = [recount.windows.get(w.key) for w in windows]
        written = await conn.fetch(_WRITE, [w.tenant for w in windows], [w.key for w in windows],
                                   [Decimal(0) if d is None else d.value for d in now],
                                   [0 if d is None else d.count for d in now],
                                   [None if d is None else d.latest_time for d in now],
                                   [None if d is None else d.total for d in now],
                                   [outside.get(w.key, 0) for w in windows])
        await queue(conn, {(r["tenant"], r["key"]): r["revision"] for r in written})
    return {r["key"] for r in written}


async def _record(ctx: JobContext, report: ReconcileReport) -> None:
    await ctx.pool.executemany(
        "insert into drift_reports (key, tenant, meter, place, expected, found, fixed) values ($1, $2, $3, $4, $5, $6,"
        " $7)", [(d.key, d.tenant, d.meter, d.place, d.expected, d.found, d.key in report.fixed)
                 for d in report.drift])


def default_since(now: datetime) -> datetime:
    """The daily job's range: the last two UTC days, which covers every window still open to late events."""
    return now - timedelta(days=2)
