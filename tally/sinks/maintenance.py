"""Storage upkeep: monthly events partitions and retention of event keys, counter windows (with the distinct values
and level changes their UNIQUE_COUNT and WEIGHTED_SUM meters keep beside them) and alert history.

The processor runs it at start and every few hours; `tally maintenance` runs it once. Each part is
safe to run from several places at once: partitions are created under an advisory lock, and pruning
deletes in small batches, oldest first, so it never holds many row locks or runs one long statement.
The processor gives pruning a time budget (its batches wait meanwhile) and carries on next time;
the command prunes until done (docs/adr/0011, docs/adr/0017).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import asyncpg

_BATCH = 5000


def _prune(table: str, key: str, where: str, order: str, limit: str = "$2", then: str = "",
           returning: str | None = None, answer: str = "count(*)") -> str:
    """A statement that deletes one batch of `table`, oldest first, and answers how many rows went; `then`
    names what goes with the deleted rows (`gone`, holding the `returning` columns). `key` is a column the rows
    are found by alone: the row's ctid where the primary key is (tenant, ...)."""
    return (f"with gone as (delete from {table} where {key} = any(array("
            f"select t.{key} from {table} t where {where} order by {order} limit {limit}))"
            f" returning {returning or key}){then}\nselect {answer} from gone")


_PRUNE_KEYS = _prune("event_keys", "ctid", "t.first_seen < $1", "t.first_seen")
# Counter windows of one size that ended before a moment go a batch at a time, oldest first, with what stands beside
# them: their queue entries (the relay also forgets a key whose counter row is gone) and the distinct values of the
# UNIQUE_COUNT ones. A window may hold up to its meter's max_distinct values, too many for one statement, so the
# values of the next batch of windows go first, a batch of values at a time (_PRUNE_DISTINCT), then the windows;
# those claimed meanwhile (none unless a backfill counted into a window that old) go with their windows: no value
# outlives its window. _PRUNE_COUNTERS answers the windows and the values that went.
_EXPIRED, _OLDEST_FIRST = "t.window_name = $1 and t.window_end < $2", "t.window_end, t.tenant, t.key"
_PRUNE_DISTINCT = f"""
with oldest as (select t.tenant, t.key, t.aggregation from counters t where {_EXPIRED} order by {_OLDEST_FIRST}
                limit $3),
gone as (delete from counter_distinct where ctid = any(array(
    select d.ctid from oldest o join counter_distinct d on d.tenant = o.tenant and d.window_id = tally_window_id(o.key)
    where o.aggregation = 'UNIQUE_COUNT' limit $3)) returning 1)
select count(*) from gone
"""
_PRUNE_COUNTERS = _prune("counters", "ctid", _EXPIRED, _OLDEST_FIRST, "$3",
                         ", unqueued as (delete from counter_outbox"
                         " where (tenant, key) in (select tenant, key from gone)),"
                         " undistinct as (delete from counter_distinct where (tenant, window_id) in"
                         " (select tenant, tally_window_id(key) from gone where aggregation = 'UNIQUE_COUNT')"
                         " returning 1)",
                         returning="tenant, key, aggregation", answer="count(*), (select count(*) from undistinct)")
# WEIGHTED_SUM level changes no window kept can need (Retention says why): per series, with p* its latest change
# before $1, every change before the UTC month holding p* but the latest of them, the level carried into that month.
# A tenant with a backfill not done keeps all: it writes changes older than $1.
_PRUNE_POINTS = """
with gone as (delete from weighted_points where ctid = any(array(
    select t.ctid from weighted_points t
    cross join lateral (select date_trunc('month', max(l.at), 'UTC') as month from weighted_points l
                        where l.tenant = t.tenant and l.series = t.series and l.at < $1) m
    where t.at < $1 and t.at < m.month
      and exists (select 1 from weighted_points r where r.tenant = t.tenant and r.series = t.series
                  and r.at < m.month and (r.at, r.source, r.id) > (t.at, t.source, t.id))
      and not exists (select 1 from meter_backfills b where b.tenant = t.tenant and b.state <> 'done')
    order by t.at limit $2)) returning 1)
select count(*) from gone
"""
# A usage alert goes once its period's alert is resolved (or it never fired); one still firing stays.
_PRUNE_USAGE_ALERTS = _prune(
    "usage_alerts", "ctid",
    "t.created_at < $1 and t.taken_up and (t.fired_transition is null or t.resolved_transition is not null)", "t.id")
# A transition goes with its deliveries (on delete cascade) once published, delivered or given up, and no
# longer named by a usage alert.
_PRUNE_TRANSITIONS = _prune(
    "alert_transitions", "ctid",
    "t.at < $1 and t.published_at is not null"
    " and not exists (select 1 from alert_deliveries d"
    "                 where d.tenant = t.tenant and d.transition_id = t.id and d.status = 'pending')"
    " and not exists (select 1 from usage_alerts u"
    "                 where u.tenant = t.tenant and (u.fired_transition = t.id or u.resolved_transition = t.id))",
    "t.id")
# A usage link is of no use a day after it expired (the day: a page open at the expiry still says why).
_PRUNE_LINKS = _prune("usage_links", "id", "t.expires_at < $1", "t.expires_at")

# Creating a month attaches it beside the default partition under an exclusive lock on that partition:
# give up quickly rather than queue every writer behind the lock request; the next run tries again.
_PARTITION_LOCK_TIMEOUT = "set local lock_timeout = '5s'"


@dataclass(frozen=True)
class Retention:
    """How long to keep what; zero keeps for ever. Counter windows are kept per window size, counted from
    the window's end; the distinct values of a UNIQUE_COUNT window go with it.

    WEIGHTED_SUM level changes are pruned from `weighted_points_days` on (the wiring sets the longest counter
    retention, and zero while any window size is kept for ever), by _PRUNE_POINTS: per series, with p* its latest
    change before the cutoff C, every change before the UTC month M holding p* but the latest of them (the level
    carried into M). That is safe because every change still to be written is later than C (a counted event is
    within the late horizon, shorter than every retention: processors.service; a tenant whose backfill is not done,
    which writes older changes, keeps all), and windows nest in UTC months: every window kept ends after C, so it
    lies in M or later. A re-integration (meters.weighted) then reads the same as it would unpruned: the new
    changes' predecessor is p* or later; the windows it integrates hold that predecessor or a later change, so lie
    in M or later, whose changes are all kept; the level entering any of them is a change in M or later or the
    one carried into M. The same holds for every kept window's integral; pruned changes shaped only windows gone.
    """

    months_back: int = 1
    months_ahead: int = 2
    event_keys_days: int = 0
    counter_days: dict[str, int] = field(default_factory=dict)
    alert_transitions_days: int = 0  # with their deliveries, counted from the transition
    usage_alerts_days: int = 0
    weighted_points_days: int = 0  # counted from the level change


@dataclass
class Upkeep:
    partitions: int = 0
    event_keys: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    distinct_values: int = 0
    weighted_points: int = 0
    usage_alerts: int = 0
    alert_transitions: int = 0
    usage_links: int = 0

    def summary(self) -> str:
        counters = ", ".join(f"{n} {window}" for window, n in self.counters.items()) or "none"
        return (f"partitions created: {self.partitions}; event keys pruned: {self.event_keys};"
                f" counter windows pruned: {counters}; distinct values pruned: {self.distinct_values};"
                f" weighted points pruned: {self.weighted_points}; usage alerts pruned: {self.usage_alerts};"
                f" alert transitions pruned: {self.alert_transitions}; usage links pruned: {self.usage_links}")


class Maintenance:
    def __init__(self, pool: asyncpg.Pool, retention: Retention) -> None:
        self._pool = pool
        self._retention = retention

    async def run(self, budget_s: float | None = None) -> Upkeep:
        """Partitions, then pruning until done or, with a budget, until `budget_s` seconds have passed."""
        now = datetime.now(timezone.utc)
        deadline = None if budget_s is None else time.monotonic() + budget_s
        r = self._retention
        upkeep = Upkeep()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(_PARTITION_LOCK_TIMEOUT)
                upkeep.partitions = await conn.fetchval("select tally_ensure_event_partitions($1, $2)",
                                                        r.months_back, r.months_ahead)
            async with conn.transaction():
                await conn.execute(_PARTITION_LOCK_TIMEOUT)
                upkeep.partitions += await conn.fetchval("select tally_partition_default_months()")
            if r.event_keys_days > 0:
                upkeep.event_keys = await _batches(conn, deadline, _PRUNE_KEYS, now - timedelta(days=r.event_keys_days))
            for window, days in r.counter_days.items():
                if days > 0:
                    upkeep.counters[window], values = await _windows(conn, deadline, window, now - timedelta(days=days))
                    upkeep.distinct_values += values
            if r.weighted_points_days > 0:
                upkeep.weighted_points = await _batches(conn, deadline, _PRUNE_POINTS,
                                                        now - timedelta(days=r.weighted_points_days))
            # Usage alerts first: a transition is kept while a usage alert names it.
            if r.usage_alerts_days > 0:
                upkeep.usage_alerts = await _batches(conn, deadline, _PRUNE_USAGE_ALERTS,
                                                     now - timedelta(days=r.usage_alerts_days))
            if r.alert_transitions_days > 0:
                upkeep.alert_transitions = await _batches(conn, deadline, _PRUNE_TRANSITIONS,
                                                          now - timedelta(days=r.alert_transitions_days))
            upkeep.usage_links = await _batches(conn, deadline, _PRUNE_LINKS, now - timedelta(days=1))
        return upkeep


async def _windows(conn: asyncpg.Connection, deadline: float | None, window: str, before: datetime) -> tuple[int, int]:
    """A window size's windows that ended before `before`, and their distinct values: the values of the next batch
    of windows a batch at a time, then those windows; until done or the deadline passed. (windows, values) gone."""
    windows = values = 0
    while True:
        deleted = await conn.fetchval(_PRUNE_DISTINCT, window, before, _BATCH)
        values += deleted
        if deleted < _BATCH:
            deleted, with_them = await conn.fetchrow(_PRUNE_COUNTERS, window, before, _BATCH)
            windows += deleted
            values += with_them
            if deleted < _BATCH:
                return windows, values
        if deadline is not None and time.monotonic() > deadline:
            return windows, values


async def _batches(conn: asyncpg.Connection, deadline: float | None, statement: str, *args: object) -> int:
    """Run a batched delete until it deletes less than a batch or the deadline passed; how many rows went."""
    total = 0
    while True:
        deleted = await conn.fetchval(statement, *args, _BATCH)
        total += deleted
        if deleted < _BATCH or (deadline is not None and time.monotonic() > deadline):
            return total
