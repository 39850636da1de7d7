"""Usage alerts: when a subject's period usage crosses a threshold of an included quantity (80% and 100%
unless the plan says otherwise), one alert per subject, meter, period and threshold.

"Once" is a unique row in PostgreSQL, keyed by the period: re-reading usage after a processor restart,
a replay or a duplicate finds the row and adds nothing, and a new period is a new key. Delivery goes
from the row: to `tally.alerts.v1` keyed by the alert id (a re-publication after a crash carries the
same id), to the in-app list, and to the tenant's Slack incoming webhook with retries; a delivery
that keeps failing is marked `failed` with its error, visible in the list (docs/adr/0045).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

import asyncpg
import httpx
import orjson
import tenacity

from sinks.kafka import KafkaPublisher
from usage.periods import PeriodError, period_at
from usage.plans import Subscription
from usage.windows import WindowReader, combine

log = logging.getLogger("tally.usage.alerts")

SLACK_ATTEMPTS = 3  # tries per run; after this many runs' worth the alert's Slack delivery is failed
SLACK_MAX_ATTEMPTS = 9

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
insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used, included, slack_status)
values ($1, $2, $3, $4, $5, $6, $7, $8,
        case when exists (select 1 from usage_settings u where u.tenant = $1 and u.slack_webhook_url is not null)
             then 'pending' else 'none' end)
on conflict do nothing
returning id
"""


async def detect(pool: asyncpg.Pool, reader: WindowReader, now: datetime | None = None) -> int:
    """Record every threshold crossed in the current periods; returns how many alerts are new."""
    now = now or datetime.now(timezone.utc)
    rows = await pool.fetch(_CURRENT, now)
    by_subject: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for r in rows:
        by_subject.setdefault((r["tenant"], r["subject"]), []).append(r)
    new = 0
    for (tenant, subject), meters in by_subject.items():
        first = meters[0]
        sub = Subscription(subject=subject, plan_id=first["plan_id"], anchor_day=first["anchor_day"],
                           time_zone=first["time_zone"], start_date=first["start_date"])
        try:
            period = period_at(sub.anchor(), now)
        except PeriodError:
            continue
        windows = await reader.read(tenant, subject, [m["meter"] for m in meters], period.start, period.end, now)
        for m in meters:
            used = combine(list(windows[m["meter"]].values()))
            for threshold in m["thresholds"]:
                if used * 100 >= m["included"] * threshold:
                    if await pool.fetchval(_INSERT, tenant, subject, m["meter"], period.label, period.end, threshold,
                                           used, m["included"]):
                        new += 1
    return new


def message(row: asyncpg.Record) -> dict[str, Any]:
    """The alert as published on tally.alerts.v1 and listed by the API."""
    return {"id": str(row["id"]), "kind": "usage.threshold", "tenant": row["tenant"], "subject": row["subject"],
            "meter": row["meter"], "threshold": row["threshold"], "used": str(row["used"]),
            "included": str(row["included"]), "period_start": row["period_label"].isoformat(),
            "period_end": row["period_end"].isoformat(), "created_at": row["created_at"].isoformat(),
            "read": row["read_at"] is not None, "slack": row["slack_status"], "slack_error": row["slack_error"]}


def slack_blocks(row: asyncpg.Record) -> dict[str, Any]:
    """Slack Block Kit for one alert (an incoming webhook takes `text` as the notification fallback)."""
    text = (f"{row['subject']} used {row['threshold']}% of its included {row['meter']} "
            f"({row['used']} of {row['included']}) in the period ending {row['period_end']:%Y-%m-%d}")
    return {"text": text, "blocks": [
        {"type": "header",
         "text": {"type": "plain_text", "text": f"Usage alert: {row['threshold']}% of {row['meter']}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"tenant {row['tenant']} · alert {row['id']}"}]},
    ]}


async def publish(pool: asyncpg.Pool, publisher: KafkaPublisher, topic: str) -> int:
    """Publish alerts not yet on the topic, then mark them; a crash in between re-publishes the same ids."""
    rows = await pool.fetch("select * from usage_alerts where published_at is null order by id limit 1000")
    if not rows:
        return 0
    for row in rows:
        publisher.produce(topic, f"usage-alert:{row['id']}".encode(), orjson.dumps(message(row)))
    await asyncio.to_thread(publisher.flush)
    await pool.execute("update usage_alerts set published_at = now() where id = any($1::bigint[])",
                       [r["id"] for r in rows])
    return len(rows)


async def notify_slack(pool: asyncpg.Pool, client: httpx.AsyncClient) -> dict[str, int]:
    """Send pending Slack alerts to each tenant's webhook, retried; failures stay visible on the alert."""
    rows = await pool.fetch(
        "select a.*, u.slack_webhook_url from usage_alerts a join usage_settings u using (tenant)"
        " where a.slack_status = 'pending' order by a.id limit 100")
    outcome = {"sent": 0, "failed": 0}
    for row in rows:
        try:
            async for attempt in tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(SLACK_ATTEMPTS),
                                                        wait=tenacity.wait_exponential(multiplier=0.2, max=2),
                                                        reraise=True):
                with attempt:
                    answer = await client.post(row["slack_webhook_url"], json=slack_blocks(row), timeout=5)
                    answer.raise_for_status()
        except httpx.HTTPError as exc:
            attempts = row["slack_attempts"] + SLACK_ATTEMPTS
            status = "failed" if attempts >= SLACK_MAX_ATTEMPTS else "pending"
            await pool.execute("update usage_alerts set slack_status = $2, slack_attempts = $3, slack_error = $4"
                               " where id = $1", row["id"], status, attempts, f"{type(exc).__name__}: {exc}")
            outcome["failed"] += 1
            continue
        await pool.execute("update usage_alerts set slack_status = 'sent', slack_attempts = slack_attempts + 1,"
                           " slack_error = null where id = $1", row["id"])
        outcome["sent"] += 1
    return outcome
