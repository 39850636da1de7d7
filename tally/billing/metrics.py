"""Metrics the jobs worker serves (`tally jobs`, on TALLY_JOBS_METRICS_PORT) for Stripe report rows, the Stripe
circuit breaker and hard-limit blocks (drift found: billing/reconcile.py; docs/adr/0130). Figures are totals over every tenant: a tenant id is never a label value.
Several workers read the same tables and report the same figures; dashboards and alert rules take their max."""

from __future__ import annotations

import asyncpg
import pybreaker
from prometheus_client import Counter, Gauge

# Statuses of rows still to be sent or waiting for a person: few, and counted from the partial indexes on unsent and
# on refused or held rows. Sent, superseded, cancelled and applied rows only accumulate: SENDS counts how they end.
SHOWN_STATUSES = ("pending", "deferred", "cancelling", "failed", "held")
ROWS_CAP = 10_000  # counted up to this per status: past it no decision changes

REPORT_ROWS = Gauge("tally_billing_report_rows", "Stripe report rows to send (pending, deferred, cancelling) or that "
                    "need a person (failed: refused by Stripe; held), by status, counted up to 10000", ["status"])
SENDS = Counter("tally_billing_report_sends", "Stripe report rows a sending run ended, by outcome (sent, deferred, "
                "failed, held, superseded, cancelled)", ["outcome"])
BREAKER = Gauge("tally_billing_stripe_breaker_state", "1 for the Stripe circuit breaker's present state (closed, open, "
                "half-open) in this worker, 0 for the others", ["state"])
BLOCKED_SUBJECTS = Gauge("tally_usage_blocked_subjects", "Subjects a hard limit blocks now, over every tenant")

# One statement, each status a literal so the planner takes the partial index that holds it.
_COUNT_ROWS = " union all ".join(
    f"select '{status}', (select count(*) from (select 1 from stripe_reports where status = '{status}' limit $1) r)"
    for status in SHOWN_STATUSES)


async def read_report_rows(pool: asyncpg.Pool) -> None:
    for status, count in await pool.fetch(_COUNT_ROWS, ROWS_CAP):
        REPORT_ROWS.labels(status).set(count)


def show_breaker(state: str) -> None:
    for name in (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN):
        BREAKER.labels(name).set(int(name == state))


class BreakerGauge(pybreaker.CircuitBreakerListener):
    """Moves BREAKER with the breaker, the moment it changes state."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: pybreaker.CircuitBreakerState
                     ) -> None:
        show_breaker(new_state.name)
