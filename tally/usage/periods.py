"""Billing periods: anchored per subscription on a day of the month, at local midnight in its time zone.

A period runs from one anchor to the next; a "reset" is simply the next period, nothing is reset in
place. The first period starts at the subscription's start date. Period usage is summed from UTC
hour windows, so every boundary must fall on a whole UTC hour: zones whose offset is not whole
hours are refused (docs/adr/0041). A period that cannot be computed for a stored subscription (a zone
whose rules changed) is skipped by the jobs for that subscription alone, logged and counted (`skipped`).
"""

from __future__ import annotations

import calendar
import logging
from dataclasses import dataclass
from functools import lru_cache
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prometheus_client import Counter

log = logging.getLogger("tally.usage.periods")

ERRORS = Counter("tally_period_errors", "subscriptions skipped because their period could not be computed",
                 ["where"])


class PeriodError(ValueError):
    """A billing anchor or a period that cannot be computed exactly from hour windows."""


class NotStarted(PeriodError):
    """A date before the subscription's start: not an error for a job, there is simply no period yet."""


def skipped(where: str, tenant: str, subject: str, exc: PeriodError) -> None:
    """A job skips one subscription whose period cannot be computed, and goes on with the others."""
    log.error("%s: subscription %s/%s skipped: %s", where, tenant, subject, exc)
    ERRORS.labels(where).inc()


@dataclass(frozen=True)
class Anchor:
    day: int
    zone: str
    start_date: date

    def tz(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise PeriodError(f"unknown time zone {self.zone!r}") from None


@dataclass(frozen=True)
class Period:
    """[start, end) in UTC; `label` is the local start date that names it (`period=<date>`)."""

    start: datetime
    end: datetime
    label: date


@lru_cache(maxsize=1024)
def check_zone(zone: str) -> None:
    """Refuse unknown zones and zones with an offset that is not whole hours (now or in 2000-2040).

    Memoised: every Subscription built from a row checks its zone."""
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(f"unknown time zone {zone!r}") from None
    for year in range(2000, 2041):
        for month in (1, 7):
            offset = datetime(year, month, 1, tzinfo=tz).utcoffset() or timedelta(0)
            if offset % timedelta(hours=1):
                raise PeriodError(f"time zone {zone} has an offset of {offset}; billing periods need whole-hour "
                                  "offsets (docs/adr/0041)")


def _anchor_date(anchor: Anchor, year: int, month: int) -> date:
    return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _prev_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def midnight(anchor: Anchor, day: date) -> datetime:
    """Local midnight of `day` as a UTC instant, which must be a whole UTC hour."""
    at = datetime.combine(day, time(0), tzinfo=anchor.tz()).astimezone(timezone.utc)
    if at.minute or at.second or at.microsecond:
        raise PeriodError(f"midnight of {day} in {anchor.zone} is {at:%H:%M} UTC, not a whole hour")
    return at


def period_of_date(anchor: Anchor, day: date) -> Period:
    """The period that contains the local date `day`."""
    if day < anchor.start_date:
        raise NotStarted(f"the subscription starts on {anchor.start_date}; there is no period on {day}")
    year, month = day.year, day.month
    start = _anchor_date(anchor, year, month)
    if start > day:
        year, month = _prev_month(year, month)
        start = _anchor_date(anchor, year, month)
    end = _anchor_date(anchor, *_next_month(year, month))
    label = max(start, anchor.start_date)
    return Period(midnight(anchor, label), midnight(anchor, end), label)


def period_at(anchor: Anchor, at: datetime) -> Period:
    return period_of_date(anchor, at.astimezone(anchor.tz()).date())


def previous(anchor: Anchor, period: Period) -> Period:
    return period_of_date(anchor, period.label - timedelta(days=1))


def days(anchor: Anchor, period: Period) -> list[tuple[date, datetime, datetime]]:
    """The local days of a period, each as (date, UTC start, UTC end)."""
    out = []
    day = period.label
    start = period.start
    while start < period.end:
        end = midnight(anchor, day + timedelta(days=1))
        out.append((day, start, end))
        day, start = day + timedelta(days=1), end
    return out


def hours(start: datetime, end: datetime) -> list[datetime]:
    """The UTC hour-window starts in [start, end)."""
    out = []
    at = start
    while at < end:
        out.append(at)
        at += timedelta(hours=1)
    return out
