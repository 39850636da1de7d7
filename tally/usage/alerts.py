"""Usage alerts: when a subject's period usage crosses a threshold of an included quantity (80% and 100%
unless the plan says otherwise), one alert per subject, meter, period and threshold.

"Once" is a unique row in PostgreSQL, keyed by the period and the included quantity: re-reading usage after a
processor restart, a replay or a duplicate finds the row and adds nothing; a new period, or a plan change that
moves the included quantity, is a new key (docs/adr/0045). The previous period is read too while late events can
still count into it, so a threshold crossed only by events processed after the period ended still alerts
(billing review L2).
The row is the in-app list's; `tally alerts` takes it up as an alert transition, published to
`tally.alerts.v1` and sent to the tenant's Slack like any rule's (tally/alerts/usage.py, docs/adr/0052).
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg

from tally.meters.catalog import Catalog
from tally.usage.periods import PeriodError, period_at
from tally.usage.plans import Subscription
from tally.usage.windows import WindowReader, combine

log = logging.getLogger("tally.usage.alerts")

_CURRENT = """
select s.tenant, s.subject, s.anchor_day, s.time_zone, s.start_date, s.plan_id, pm.meter, pm.included, pm.thresholds
from subscriptions s
join lateral (select plan_id from subscription_plans p where p.tenant = s.tenant and p.subject = s.subject
              and p.effective_at <= $1 order by effective_at desc limit 1) cur on true
join plan_meters pm on pm.tenant = s.tenant and pm.plan_id = cur.plan_id
where pm.included > 0 and cardinality(pm.thresholds) > 0
order by s.tenant, s.subject
"""

_INSERT = """
insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used, included)
values ($1, $2, $3, $4, $5, $6, $7, $8)
on conflict do nothing
returning id
"""


async def detect(pool: asyncpg.Pool, reader: WindowReader, catalog: Catalog, late_s: int,
                 now: datetime | None = None) -> int:
    """Record every threshold crossed in the current periods, and in the periods that were current `late_s` ago
    (TALLY_LATE_HORIZON_S: events that old still count), each under the plan then; returns how many alerts
    are new."""
    now = now or datetime.now(timezone.utc)
    new, seen = 0, set()
    for at in (now, now - timedelta(seconds=late_s)):
        new += await _detect_at(pool, reader, catalog, now, at, seen)
    return new


async def _detect_at(pool: asyncpg.Pool, reader: WindowReader, catalog: Catalog, now: datetime, at: datetime,
                     seen: set[tuple[str, str, date]]) -> int:
    """The thresholds crossed by `now` in the periods current at `at`, those in `seen` left out (and added)."""
    rows = await pool.fetch(_CURRENT, at)
    by_subject: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for r in rows:
        by_subject.setdefault((r["tenant"], r["subject"]), []).append(r)
    new = 0
    for (tenant, subject), meters in by_subject.items():
        first = meters[0]
        sub = Subscription(subject=subject, plan_id=first["plan_id"], anchor_day=first["anchor_day"],
                           time_zone=first["time_zone"], start_date=first["start_date"])
        try:
            period = period_at(sub.anchor(), at)
        except PeriodError:
            continue
        if (tenant, subject, period.label) in seen:
            continue
        seen.add((tenant, subject, period.label))
        slugs = [m["meter"] for m in meters]
        windows = await reader.read(tenant, subject, slugs, period.start, period.end, now,
                                    counters=catalog.counters(tenant, slugs))
        for m in meters:
            used = combine(list(windows[m["meter"]].values()))
            for threshold in m["thresholds"]:
                if used * 100 >= m["included"] * threshold:
                    if await pool.fetchval(_INSERT, tenant, subject, m["meter"], period.label, period.end, threshold,
                                           used, m["included"]):
                        new += 1
    return new


def message(row: asyncpg.Record) -> dict[str, Any]:
    """The alert as the in-app list shows it; `alert` names its transition in `GET /v1/alerts` (with its
    deliveries) once `tally alerts` took it up."""
    return {"id": str(row["id"]), "kind": "usage.threshold", "tenant": row["tenant"], "subject": row["subject"],
            "meter": row["meter"], "threshold": row["threshold"], "used": str(row["used"]),
            "included": str(row["included"]), "period_start": row["period_label"].isoformat(),
            "period_end": row["period_end"].isoformat(), "created_at": row["created_at"].isoformat(),
            "read": row["read_at"] is not None,
            "alert": f"alert-{row['fired_transition']}" if row["fired_transition"] else None}
