"""Delivery of alert transitions to their targets: Slack incoming webhooks and outgoing webhooks signed with
Standard Webhooks.

The evaluator writes one `alert_deliveries` row per transition and target in the transaction that decides the
transition; this drains them. A row is claimed with a lease (`lease`, `lease_until`) in a short transaction of
its own, committed before the request goes out; the outcome is recorded afterwards under the same lease. No
transaction stays open across a network call, and a crash leaves the row pending until its lease runs out, when
it is sent again with the same `webhook-id`: at least once, duplicated only by a crash between the receiver's
answer and the record (docs/adr/0051). Failures wait in `next_attempt_at` (exponential, jittered), so a restart
keeps the schedule.

One tenant's target cannot hold up another's (security review H3): each request has a total deadline (not one
per read), the answer's body is never read (its status is all that counts, and an internal service's error page
is not echoed to a tenant), at most `per_target` requests are in flight to one target, and each worker claims,
sends and records on its own, so a slow target occupies one worker for at most the deadline. The URL is checked
again before each request and the address at connect time (egress/); a target that may not be called, or a
stored row that cannot be read, is recorded `refused` with the reason, counted and logged, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import asyncpg
import httpx
import orjson
from standardwebhooks import Webhook

import tally.egress.client
from tally.alerts import metrics, slack
from tally.alerts.transitions import transition
from tally.egress import EgressPolicy, Refused, check_url
from tally.sealed import SecretBox, Unreadable

log = logging.getLogger("tally.alerts.delivery")

OUTCOMES = ("sent", "retried", "failed", "refused")
LEASE_MARGIN_S = 30.0  # beyond the request deadline, before a claimed row is taken to be orphaned

# The oldest due row whose rule, group and target have no earlier transition still pending (a later transition
# never overtakes an earlier one waiting out its backoff or in flight), and whose target has fewer than $2
# requests in flight; leased for the request's deadline and a margin. $1: the round's time, or the clock.
_CLAIM = """
with at as (select coalesce($1::timestamptz, clock_timestamp()) as now),
due as (
  select d.tenant, d.transition_id, d.target
  from alert_deliveries d join alert_transitions t on t.tenant = d.tenant and t.id = d.transition_id, at
  where d.status = 'pending' and d.next_attempt_at <= at.now and (d.lease_until is null or d.lease_until <= at.now)
    and not exists (
      select 1 from alert_deliveries e join alert_transitions u on u.tenant = e.tenant and u.id = e.transition_id
      where e.status = 'pending' and e.transition_id < d.transition_id and e.target_digest = d.target_digest
        and u.tenant = t.tenant and u.rule_id = t.rule_id and u.group_key = t.group_key)
    and (select count(*) from alert_deliveries f
         where f.status = 'pending' and f.target_digest = d.target_digest and f.lease_until > at.now) < $2
  order by d.transition_id, d.target
  limit 1
  for update of d skip locked)
update alert_deliveries d
set lease = nextval('alert_delivery_leases'),
    lease_until = greatest($1, clock_timestamp()) + make_interval(secs => $3)
from due, alert_transitions t
where d.tenant = due.tenant and d.transition_id = due.transition_id and d.target = due.target
  and t.tenant = d.tenant and t.id = d.transition_id
returning d.target, d.kind as target_kind, d.url, d.secret, d.attempts, d.lease, t.*
"""

# Times count from the round's time or the clock, whichever is later (a test's time may be ahead of it). A settled
# row keeps no URL or secret.
_RECORD = """
update alert_deliveries
set status = $4, attempts = attempts + 1, last_status = $5, last_error = $6, lease = null, lease_until = null,
    sent_at = case when $4 = 'sent' then greatest($7, clock_timestamp()) else sent_at end,
    next_attempt_at = case when $8::float8 is null then next_attempt_at
                           else greatest($7, clock_timestamp()) + make_interval(secs => $8) end,
    url = case when $4 = 'pending' then url end, secret = case when $4 = 'pending' then secret end
where tenant = $9 and transition_id = $1 and target = $2 and lease = $3
"""


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard to try (TALLY_ALERTS_DELIVERY_* settings). `timeout_s` bounds a whole request."""

    max_attempts: int = 8
    backoff_s: float = 15.0
    backoff_max_s: float = 900.0
    timeout_s: float = 5.0
    concurrency: int = 4
    per_target: int = 2
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
    """What one request came to: `error` is None when the receiver took it; `refused`: the target may not be
    called at all."""

    status: int | None = None
    error: str | None = None
    permanent: bool = False
    refused: bool = False
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


def _request(row: Mapping[str, Any], secret: str | None) -> tuple[bytes, dict[str, str]]:
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
        "webhook-signature": Webhook(secret).sign(alert.id, at, body),
    }


class Deliverer:
    """Drains due deliveries, a few at a time; any number of deliverers may run against one database."""

    def __init__(self, pool: asyncpg.Pool, client: httpx.AsyncClient, policy: DeliveryPolicy, egress: EgressPolicy,
                 box: SecretBox) -> None:
        self.pool = pool
        self.client = client
        self.policy = policy
        self.egress = egress
        self.box = box

    @classmethod
    async def open(cls, database_url: str, policy: DeliveryPolicy, egress_policy: EgressPolicy,
                   box: SecretBox) -> "Deliverer":
        """With a pool of its own (connections are held only to claim and to record, never across a request)
        and a client that checks each address it connects to."""
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        return cls(pool, tally.egress.client.client(egress_policy), policy, egress_policy, box)

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set: `concurrency` workers, each claiming, sending and recording on its own, so
        none waits for another's request. A failed claim or record (the database away) is logged and retried."""
        await asyncio.gather(*(self._worker(stop) for _ in range(self.policy.concurrency)))

    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                done = await self._one(None)
            except Exception:
                log.exception("alert delivery failed; trying again in %.1f s", self.policy.poll_s)
                done = None
            if done is None:
                try:
                    await asyncio.wait_for(stop.wait(), self.policy.poll_s)
                except TimeoutError:
                    pass

    async def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Try every delivery due at `now` (the clock unless given) once; returns how many were sent, retried
        later, failed and refused for good. A retry is due after `now`, so a round always ends."""
        outcome: Counter[str] = Counter()

        async def drain() -> None:
            while (result := await self._one(now)) is not None:
                outcome[result] += 1

        await asyncio.gather(*(drain() for _ in range(self.policy.concurrency)))
        return {name: outcome[name] for name in OUTCOMES}

    async def _one(self, now: datetime | None) -> str | None:
        """Claim one due delivery, send it, record the outcome; None when nothing is due."""
        row = await self.pool.fetchrow(_CLAIM, now, self.policy.per_target, self.policy.timeout_s + LEASE_MARGIN_S)
        if row is None:
            return None
        result = await self._record(row, await self._attempt(row), now)
        metrics.DELIVERIES.labels(row["target_kind"], result).inc()
        return result

    async def _attempt(self, row: asyncpg.Record) -> Attempt:
        try:
            url = check_url(self.box.open(row["url"] or ""), row["target_kind"], self.egress)
            secret = row["secret"] and self.box.open(row["secret"])
        except (Refused, Unreadable) as exc:
            return Attempt(error=str(exc), refused=True)
        try:
            body, headers = _request(row, secret)
        except Exception as exc:  # noqa: BLE001 - e.g. a secret that is not base64: no retry makes it sendable
            return Attempt(error=f"cannot sign or build the request: {type(exc).__name__}", permanent=True)
        deadline = self.policy.timeout_s
        try:
            async with asyncio.timeout(deadline):
                async with self.client.stream("POST", url, content=body, headers=headers,
                                              timeout=httpx.Timeout(deadline)) as answer:
                    code = answer.status_code
                    retry_after = _retry_after(answer) if code in (429, 503) else None
        except TimeoutError:
            return Attempt(error=f"no answer within {deadline:g} s")
        except Refused as exc:  # the name resolved to an address a tenant may not reach
            return Attempt(error=str(exc), refused=True)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            return Attempt(error=type(exc).__name__, permanent=True)
        except httpx.HTTPError as exc:  # the exception's text can describe our network: its kind only
            return Attempt(error=type(exc).__name__)
        except OSError:
            return Attempt(error="the target's host name does not resolve")
        except Exception as exc:  # a fault of ours: logged whole, the row retried with backoff like an outage
            log.exception("%s alert-%d target %d: unexpected error delivering", row["tenant"], row["id"], row["target"])
            return Attempt(error=type(exc).__name__)
        if 200 <= code < 300:
            return Attempt(status=code)
        return Attempt(status=code, error=f"HTTP {code}", permanent=400 <= code < 500 and code not in (408, 429),
                       retry_after=retry_after)

    async def _record(self, row: asyncpg.Record, attempt: Attempt, now: datetime | None) -> str:
        attempts = row["attempts"] + 1
        delay = None
        where = f"{row['tenant']} alert-{row['id']} target {row['target']} ({row['target_kind']})"
        if attempt.error is None:
            result = "sent"
        elif attempt.refused:
            result = "refused"
            log.warning("%s refused: %s", where, attempt.error)
        elif attempt.permanent or attempts >= self.policy.max_attempts:
            result = "failed"
            log.warning("%s failed after %d attempt(s): %s", where, attempts, attempt.error)
        else:
            result = "retried"
            delay = self.policy.backoff(attempts, attempt.retry_after)
        status = "pending" if result == "retried" else result
        if await self.pool.execute(_RECORD, row["id"], row["target"], row["lease"], status, attempt.status,
                                   attempt.error, now, delay, row["tenant"]) == "UPDATE 0":
            log.warning("%s: the lease ran out before the outcome was recorded; it is sent again", where)
        return result
