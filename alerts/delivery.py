"""Delivery of alert transitions to their targets: Slack incoming webhooks and outgoing webhooks signed with
Standard Webhooks.

The evaluator writes one `alert_deliveries` row per transition and target in the transaction that decides the
transition; this drains them. A row is claimed (`for update skip locked`) in a transaction of its own that stays
open while the request is in flight and commits with the outcome, so a crash at any point leaves the row
pending and it is sent again with the same `webhook-id`: at least once, duplicated only by a crash between the
receiver's answer and the commit (docs/adr/0051). Failures wait in `next_attempt_at` (exponential, jittered),
so a restart keeps the schedule.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import asyncpg
import httpx
import orjson
from standardwebhooks import Webhook

from alerts import metrics, slack
from alerts.rounds import every
from alerts.transitions import transition

log = logging.getLogger("tally.alerts.delivery")

OUTCOMES = ("sent", "retried", "failed")
_ERROR_MAX = 500

# The oldest due row whose rule, group and target have no earlier transition still pending: a later
# transition never overtakes an earlier one waiting out its backoff.
_CLAIM = """
select d.target, d.kind as target_kind, d.url, d.secret, d.attempts, t.*
from alert_deliveries d join alert_transitions t on t.id = d.transition_id
where d.status = 'pending' and d.next_attempt_at <= $1
  and not exists (
      select 1 from alert_deliveries e join alert_transitions u on u.id = e.transition_id
      where e.status = 'pending' and e.transition_id < d.transition_id and e.kind = d.kind and e.url = d.url
        and u.tenant = t.tenant and u.rule_id = t.rule_id and u.group_key = t.group_key)
order by d.transition_id, d.target
limit 1
for update of d skip locked
"""

# Times count from the round's `now` or the clock, whichever is later (a test's `now` may be ahead of it).
_RECORD = """
update alert_deliveries
set status = $3, attempts = attempts + 1, last_status = $4, last_error = $5,
    sent_at = case when $3 = 'sent' then greatest($6, clock_timestamp()) else sent_at end,
    next_attempt_at = case when $7::float8 is null then next_attempt_at
                           else greatest($6, clock_timestamp()) + make_interval(secs => $7) end
where transition_id = $1 and target = $2
"""


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard to try (TALLY_ALERTS_DELIVERY_* settings)."""

    max_attempts: int = 8
    backoff_s: float = 15.0
    backoff_max_s: float = 900.0
    timeout_s: float = 5.0
    concurrency: int = 4
    poll_s: float = 1.0

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `attempts` failed tries: doubling, each wait cut by a random part of up to half
        so senders that failed together do not return together; never sooner than the receiver's Retry-After."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay


@dataclass(frozen=True)
class Attempt:
    """What one request came to: `error` is None when the receiver took it."""

    status: int | None = None
    error: str | None = None
    permanent: bool = False
    retry_after: float | None = None


def _retry_after(answer: httpx.Response) -> float | None:
    """Retry-After as seconds or an HTTP date; unreadable is ignored."""
    value = answer.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        return (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None


def _request(row: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Body and headers for one delivery row. A webhook is signed at each attempt (receivers refuse old
    timestamps); its `webhook-id` is the transition's, the same on every attempt, so receivers can dedupe."""
    alert = transition(row)
    if row["target_kind"] == "slack":
        return orjson.dumps(slack.message(alert)), {"content-type": "application/json"}
    body = alert.model_dump_json()
    at = datetime.now(timezone.utc)
    return body.encode(), {
        "content-type": "application/json",
        "webhook-id": alert.id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(row["secret"]).sign(alert.id, at, body),
    }


class Deliverer:
    """Drains due deliveries, a few at a time; any number of deliverers may run against one database."""

    def __init__(self, pool: asyncpg.Pool, client: httpx.AsyncClient, policy: DeliveryPolicy) -> None:
        self.pool = pool
        self.client = client
        self.policy = policy

    @classmethod
    async def open(cls, database_url: str, policy: DeliveryPolicy) -> "Deliverer":
        """With a pool of its own: each delivery in flight holds a connection, which must not starve the evaluator."""
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=policy.concurrency)
        return cls(pool, httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False), policy)

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set. A failed round (the database away) is logged and the next one tries again."""
        await every(self.policy.poll_s, stop, self.run_once, "alert delivery round", (Exception,))

    async def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Try every delivery due at `now` (the database's clock unless given) once; returns how many were sent,
        retried later and failed for good. A retry is due after `now`, so a round always ends."""
        if now is None:
            now = await self.pool.fetchval("select now()")
        outcome: Counter[str] = Counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(self.policy.concurrency):
                group.create_task(self._drain(now, outcome))
        return {name: outcome[name] for name in OUTCOMES}

    async def _drain(self, now: datetime, outcome: Counter[str]) -> None:
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_CLAIM, now)
                if row is None:
                    return
                result = await self._record(conn, row, await self._attempt(row), now)
            outcome[result] += 1
            metrics.DELIVERIES.labels(row["target_kind"], result).inc()

    async def _attempt(self, row: asyncpg.Record) -> Attempt:
        try:
            body, headers = _request(row)
        except Exception as exc:  # e.g. a secret that is not base64: no retry makes it sendable
            return Attempt(error=f"cannot sign or build the request: {type(exc).__name__}: {exc}", permanent=True)
        try:
            answer = await self.client.post(row["url"], content=body, headers=headers, timeout=self.policy.timeout_s)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            return Attempt(error=f"{type(exc).__name__}: {exc}", permanent=True)
        except httpx.HTTPError as exc:
            return Attempt(error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("alert-%d target %d: unexpected error delivering", row["id"], row["target"])
            return Attempt(error=f"{type(exc).__name__}: {exc}")
        code = answer.status_code
        if 200 <= code < 300:
            return Attempt(status=code)
        return Attempt(status=code, error=f"HTTP {code}: {answer.text}",
                       permanent=400 <= code < 500 and code not in (408, 429),
                       retry_after=_retry_after(answer) if code in (429, 503) else None)

    async def _record(self, conn: asyncpg.Connection, row: asyncpg.Record, attempt: Attempt, now: datetime) -> str:
        attempts = row["attempts"] + 1
        delay = None
        if attempt.error is None:
            result = "sent"
        elif attempt.permanent or attempts >= self.policy.max_attempts:
            result = "failed"
            log.warning("alert-%d target %d (%s) failed after %d attempt(s): %s", row["id"], row["target"],
                        row["target_kind"], attempts, attempt.error[:_ERROR_MAX])
        else:
            result = "retried"
            delay = self.policy.backoff(attempts, attempt.retry_after)
        status = "pending" if result == "retried" else result
        error = None if attempt.error is None else attempt.error[:_ERROR_MAX]
        await conn.execute(_RECORD, row["id"], row["target"], status, attempt.status, error, now, delay)
        return result


async def deliveries(conn: asyncpg.Connection | asyncpg.Pool, tenant: str,
                     transition_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """The delivery log of a tenant's transitions, by transition id then target: never the URL (a Slack URL is
    itself a credential) nor the secret."""
    rows = await conn.fetch(
        "select d.transition_id, d.target, d.kind, d.status, d.attempts, d.last_status, d.last_error, d.sent_at,"
        " case when d.status = 'pending' then d.next_attempt_at end as next_attempt_at"
        " from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
        " where t.tenant = $1 and d.transition_id = any($2::bigint[]) order by d.transition_id, d.target",
        tenant, list(transition_ids))
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        entry = dict(row)
        out.setdefault(entry.pop("transition_id"), []).append(entry)
    return out
