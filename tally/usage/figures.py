"""A subscription's usage figures for one period: used, included, remaining, overage, percent, per meter.

Figures are decimal strings (exact, as counters are) and period bounds are given in the subscription's
time zone. `as_of` is the newest commit time of any window behind the figure: how fresh it is.

With a `SubjectChanges`, a period's figures are kept once computed and served again while the subject's
change counters, the selection, the meters' readable versions (tally/meters/fresh.py) and the hour are the
ones they were computed under, for `kept_s` (spread over its second half, so figures computed together are not
recomputed together; docs/adr/0046). Past that time alone they are still served while one background refresh per
kept value computes their successor, for at most `kept_s` more (docs/adr/0162).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from functools import partial
from typing import Any

import asyncpg
from prometheus_client import Counter

from tally.meters.definitions import DEFAULT_METERS
from tally.meters.fresh import LiveCatalog
from tally.usage.changes import Seen, SubjectChanges
from tally.usage.periods import Anchor, Period, PeriodError, check_zone, days, period_at, period_of_date, previous, skipped
from tally.usage.plan_changes import PlanChanges
from tally.usage.plans import Plan, PlanMeter, Subscription, load_subscriptions
from tally.usage.terms import Terms, terms_for
from tally.usage.windows import HourWindow, WindowReader, Windows, combine, hour_start

_NEVER = datetime.max.replace(tzinfo=timezone.utc)

log = logging.getLogger("tally.usage")

REFRESH_FAILURES = Counter("tally_usage_refresh_failures", "background refreshes of kept usage figures or selections "
                           "that failed (the kept value is then served until its hard bound, docs/adr/0162)")


class NotFound(LookupError):
    pass


class Unreadable(Exception):
    """A stored subscription whose periods cannot be computed (its zone's rules changed): logged and
    counted, and answered as such instead of as the caller's mistake."""


def resolve_period(anchor: Anchor, spec: str, now: datetime) -> Period:
    """`current`, `previous` or the local date of any day in the wanted period; a period before the
    subscription started is not found."""
    if spec in ("current", "previous"):
        day = now.astimezone(anchor.tz()).date()
    else:
        try:
            day = date.fromisoformat(spec)
        except ValueError:
            raise PeriodError("period is current, previous or a date (YYYY-MM-DD)") from None
        if day.year >= date.max.year:
            raise PeriodError(f"period is a date before {date.max.year}-01-01 (its period must end within the "
                              "calendar)")
    if day < anchor.start_date:
        raise NotFound(f"the subscription starts on {anchor.start_date}; there is no period on {day}")
    period = period_of_date(anchor, day)
    if spec == "previous":
        if period.label <= anchor.start_date:
            raise NotFound(f"the subscription starts on {anchor.start_date}; its first period has none before it")
        return previous(anchor, period)
    return period


def _text(value: Decimal) -> str:
    return format(value.normalize(), "f") if value == value.to_integral_value() else format(value, "f")


def meter_figures(pm: PlanMeter, windows: list[HourWindow], overage: Decimal, backfilling: bool) -> dict[str, Any]:
    """`included` is the plan's at the period's end (or now); `overage` follows the period's terms; `backfilling`:
    the meter is new and its past is still being counted, so `used` is short of it (ADR 0140)."""
    used = combine(windows)
    included = pm.included
    return {
        "meter": pm.meter,
        "used": _text(used),
        "included": _text(included),
        "remaining": _text(max(included - used, Decimal(0))),
        "overage": _text(overage),
        "percent": float(round(used * 100 / included, 2)) if included else None,
        "limit_mode": pm.limit_mode,
        "as_of": _as_of(windows),
        "backfilling": backfilling,
    }


def _as_of(windows: list[HourWindow]) -> str | None:
    newest = max((w.updated_at for w in windows), default=None)
    return newest.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if newest else None


@dataclass
class Selected:
    tenant: str
    subscription: Subscription
    anchor: Anchor
    period: Period
    terms: Terms
    meters: list[PlanMeter]
    figures_of: tuple = field(init=False)

    def __post_init__(self) -> None:
        """What a period's figures depend on besides the windows: a kept figure holds while this is equal."""
        self.figures_of = (self.terms.key, self.anchor, self.period, tuple(m.meter for m in self.meters))

    @property
    def plan(self) -> Plan:
        return self.terms.last.plan


@dataclass(frozen=True)
class Reading:
    """How a selection's meters are read: slug -> counter name, and the slugs whose past is still being counted."""

    counters: dict[str, str]
    backfilling: frozenset[str]


@dataclass
class _Selection:
    until: float
    epoch: tuple[int, int] | None
    turns: datetime  # when `current` and `previous` name other periods
    selected: Selected
    refreshing: bool = False  # its one background refresh has started (a failed one is not tried again)


@dataclass
class _Kept:
    until: float
    under: tuple
    figures: dict[str, Any]
    refreshing: bool = False  # as for `_Selection`


_Entry = _Selection | _Kept


class UsageService:
    """Usage figures. A selection (subscription, period, plan) is kept until its period turns and, with
    `PlanChanges` listening, until the tenant's plans or subscriptions change (`kept_s` at most); without,
    `select_ttl_s`, so a plan change shows in reads within that time. Kept figures and selections whose time alone
    passed are refreshed in the background, `refreshes` at a time, so the reads of many subjects kept together do not
    all wait on the pool together (docs/adr/0162)."""

    def __init__(self, pool: asyncpg.Pool, reader: WindowReader, select_ttl_s: float = 5.0,
                 changes: SubjectChanges | None = None, kept_s: float = 60.0,
                 plans: PlanChanges | None = None, catalog: LiveCatalog | None = None, refreshes: int = 2) -> None:
        self._pool = pool
        # Only the tenants' own meters matter to reads (their counter names), so the built-ins need not be the
        # configured ones.
        self._catalog = catalog or LiveCatalog(DEFAULT_METERS)
        self._reader = reader
        self._select_ttl_s = select_ttl_s
        self._plans = plans
        self._selected: dict[tuple, _Selection] = {}
        self._changes = changes
        self._kept_s = kept_s
        self._kept: dict[tuple, _Kept] = {}
        # Half the gateway's default read pool of 4: reads that must recompute find a connection free.
        self._refresh_slots = asyncio.Semaphore(refreshes)
        self._refreshes: set[asyncio.Task[None]] = set()  # held here until done, so none is collected mid-run

    async def close(self) -> None:
        """Cancels the refreshes under way and waits for them: they read through the pool, which closes next."""
        running = list(self._refreshes)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _served_stale(self, entry: _Entry, what: str, refresh: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Whether `entry`, whose time bound alone has passed, may still be served: until `kept_s` past that bound,
        while its one refresh (started here) computes its successor. Past that, reads recompute and so surface
        what keeps the refresh failing."""
        if time.monotonic() >= entry.until + self._kept_s:
            return False
        if not entry.refreshing:
            entry.refreshing = True
            task = asyncio.create_task(self._refresh(what, refresh))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
        return True

    async def _refresh(self, what: str, refresh: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            async with self._refresh_slots:
                await refresh()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the kept value stays until its hard bound
            REFRESH_FAILURES.inc()
            log.warning("kept usage %s not refreshed, served at most %.0f s more: %r", what, self._kept_s, exc)

    async def select(self, tenant: str, subject: str, meter: str | None, spec: str,
                     now: datetime | None = None) -> Selected:
        now = now or datetime.now(timezone.utc)
        key = (tenant, subject, meter, spec)
        epoch = self._plans.epoch(tenant) if self._plans is not None else None
        hit = self._selected.get(key)
        if hit is not None and hit.epoch == epoch and now < hit.turns:
            # Without notifications (epoch None) nothing vouches for a selection past its time.
            if hit.until > time.monotonic() or (epoch is not None and self._served_stale(
                    hit, f"selection of {tenant}/{subject}", partial(self._reselect, key, hit, now))):
                return hit.selected
        selected = await self._select(tenant, subject, meter, spec, now)
        self._keep_selection(key, epoch, selected, now)
        return selected

    async def _reselect(self, key: tuple, hit: _Selection, now: datetime) -> None:
        selected = await self._select(*key, now)
        if self._selected.get(key) is hit:  # not replaced meanwhile by a read that had to recompute
            self._keep_selection(key, hit.epoch, selected, now)

    def _keep_selection(self, key: tuple, epoch: tuple[int, int] | None, selected: Selected, now: datetime) -> None:
        if len(self._selected) >= 100_000:
            self._selected.clear()
        ttl_s = self._select_ttl_s if epoch is None else self._kept_s
        turns = period_at(selected.anchor, now).end if key[3] in ("current", "previous") else _NEVER
        # Spread over half the TTL, so entries filled together do not expire (and hit the database) together.
        self._selected[key] = _Selection(time.monotonic() + ttl_s * random.uniform(0.5, 1.0), epoch, turns,
                                         selected)

    async def _select(self, tenant: str, subject: str, meter: str | None, spec: str,
                      now: datetime | None = None) -> Selected:
        now = now or datetime.now(timezone.utc)
        async with self._pool.acquire() as conn:
            found = await load_subscriptions(conn, tenant, subject)
            if not found:
                raise NotFound(f"subject {subject!r} has no subscription")
            sub = found[0][1]
            anchor = sub.anchor()
            try:
                check_zone(anchor.zone)
            except PeriodError as exc:
                skipped("figures", tenant, subject, exc)
                raise Unreadable(f"the subscription of {subject!r} cannot be read: {exc}") from None
            period = resolve_period(anchor, spec, now)
            terms = await terms_for(conn, tenant, subject, period)
        if terms is None:
            raise NotFound(f"subject {subject!r} had no plan in that period")
        meters = [m for m in terms.last.plan.meters if meter is None or m.meter == meter]
        if not meters:
            raise NotFound(f"plan {terms.last.plan.id} has no meter {meter!r}")
        return Selected(tenant, sub, anchor, period, terms, meters)

    async def reading(self, s: Selected) -> Reading:
        """The counters the selected meters are read under now and which of them are still backfilling."""
        catalog = await self._catalog.current(self._pool)
        slugs = [m.meter for m in s.meters]
        return Reading(catalog.counters(s.tenant, slugs), catalog.backfilling(s.tenant) & frozenset(slugs))

    async def windows(self, s: Selected, reading: Reading, buckets: list[tuple[datetime, datetime]] | None = None,
                      seen: Seen | None = None) -> Windows:
        return await self._reader.read(s.tenant, s.subscription.subject, [m.meter for m in s.meters],
                                       s.period.start, s.period.end, buckets=buckets,
                                       ended=seen[1] if seen else b"", counters=reading.counters)

    async def _seen(self, tenant: str, subject: str) -> Seen | None:
        return await self._changes.seen(tenant, subject) if self._changes is not None else None

    async def usage(self, tenant: str, subject: str, meter: str | None = None, spec: str = "current",
                    now: datetime | None = None) -> dict[str, Any]:
        """The period's figures per meter. Kept ones are shared between reads: callers do not change them."""
        now = now or datetime.now(timezone.utc)
        s = await self.select(tenant, subject, meter, spec, now)
        seen = await self._seen(tenant, subject)
        reading = await self.reading(s)
        key = (tenant, subject, meter, spec)
        under = (s.figures_of, hour_start(now), seen, reading)
        kept = self._kept.get(key)
        if seen is not None and kept is not None and kept.under == under:
            if kept.until > time.monotonic() or self._served_stale(
                    kept, f"figures of {tenant}/{subject}", partial(self._recompute, key, kept, s, reading, seen)):
                return kept.figures
        figures = await self._usage(s, reading, seen)
        if seen is not None:
            self._keep(key, under, figures)
        return figures

    async def _recompute(self, key: tuple, kept: _Kept, s: Selected, reading: Reading, seen: Seen) -> None:
        figures = await self._usage(s, reading, seen)
        if self._kept.get(key) is kept:  # not replaced meanwhile by a read that had to recompute
            self._keep(key, kept.under, figures)

    def _keep(self, key: tuple, under: tuple, figures: dict[str, Any]) -> None:
        if len(self._kept) >= 100_000:
            self._kept.clear()
        self._kept[key] = _Kept(time.monotonic() + self._kept_s * random.uniform(0.5, 1.0), under, figures)

    async def _usage(self, s: Selected, reading: Reading, seen: Seen | None) -> dict[str, Any]:
        windows = await self.windows(s, reading, seen=seen)
        head = _head(s)
        bounds = {"period_start": head["period_start"], "period_end": head["period_end"]}
        return {**head, "meters": [{**meter_figures(pm, list(windows[pm.meter].values()),
                                                    s.terms.overage(pm.meter, windows[pm.meter]),
                                                    pm.meter in reading.backfilling), **bounds}
                                   for pm in s.meters]}

    async def history(self, tenant: str, subject: str, meter: str | None = None, spec: str = "current",
                      now: datetime | None = None) -> dict[str, Any]:
        """Per local day of the period: each meter's usage that day and the running total."""
        s = await self.select(tenant, subject, meter, spec, now)
        local_days = days(s.anchor, s.period)
        reading = await self.reading(s)
        windows = await self.windows(s, reading, [(start, end) for _, start, end in local_days],
                                     await self._seen(tenant, subject))
        out = []
        for pm in s.meters:
            by_hour = windows[pm.meter]
            running: list[HourWindow] = []
            rows = []
            for day, start, end in local_days:
                today = [w for at, w in by_hour.items() if start <= at < end]
                running += today
                rows.append({"date": day.isoformat(), "used": _text(combine(today)),
                             "cumulative": _text(combine(running))})
            out.append({"meter": pm.meter, "included": _text(pm.included), "days": rows,
                        "backfilling": pm.meter in reading.backfilling})
        return {**_head(s), "meters": out}


def _head(s: Selected) -> dict[str, Any]:
    tz = s.anchor.tz()
    return {"subject": s.subscription.subject, "plan": s.plan.id,
            "period_start": s.period.start.astimezone(tz).isoformat(),
            "period_end": s.period.end.astimezone(tz).isoformat()}
