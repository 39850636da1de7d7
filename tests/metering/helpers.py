"""Helpers for usage and billing tests: a gateway and a processor with billable meters, keys, plans."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone

import asyncpg

from tally.billing.accounts import set_account
from tally.ingest.auth import create_key
from tally.schemas.envelope import Envelope
from tally.settings import ROOT, Settings
from tests.gateway.helpers import Gateway, start_gateway
from tests.processor.helpers import drained, produce, wait_for
from tests.support import env_for, running
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe

METERS = """
meters:
  - {slug: api_calls, event_type: "api.call", aggregation: COUNT, windows: [hour, day]}
  - {slug: tokens, event_type: "llm.*", aggregation: SUM, value_path: data.tokens, windows: [hour, day]}
"""


def metered(settings: Settings) -> Settings:
    return settings.model_copy(update={"meters": METERS, "batch_max_wait_ms": 50, "jobs_metrics_port": 0})


@contextmanager
def pipeline(settings: Settings, **env: str) -> Iterator[Gateway]:
    """A gateway and one processor on these settings."""
    with running("processor", ["process"], settings, **env), start_gateway("gateway", settings, **env) as gw:
        yield gw


async def tenant_keys(settings: Settings) -> tuple[str, str, str]:
    """(tenant, a key with every scope, a key that may only write events); the tenant's Stripe account is
    `account_of(tenant)`."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        await set_account(conn, tenant, account_of(tenant))
        _, admin = await create_key(conn, tenant, "admin", ["admin:write", "usage:read", "events:write"])
        _, writer = await create_key(conn, tenant, "writer", ["events:write"])
    finally:
        await conn.close()
    return tenant, admin, writer


def run_tally(args: list[str], settings: Settings, **env: str) -> tuple[int, str]:
    """Run one `tally` command to its end; (return code, output). A kill -9 returns -9."""
    result = subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env_for(settings, **env),
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    return result.returncode, result.stdout + result.stderr


async def billed_subject(db: asyncpg.Connection, tenant: str, subject: str, customer: str, included: int,
                         report: str = "overage") -> None:
    """A plan with api_calls (COUNT) soft-limited at `included`, and `subject` on it since 40 days ago; the
    tenant's Stripe account is `account_of(tenant)`."""
    await set_account(db, tenant, account_of(tenant))
    plan = Plan(id="metered", report=report, meters=[PlanMeter(meter="api_calls", included=included,
                                                               limit_mode="soft", stripe_event="api_calls")])
    await save_plan(db, tenant, plan)
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="metered", stripe_customer_id=customer,
                                             start_date=date.today() - timedelta(days=40)))


async def one_billed_subject(db: asyncpg.Connection, included: int, report: str = "overage") -> tuple[str, str, str]:
    """(tenant, subject, customer): a new tenant whose one subject is billed to a new customer (`billed_subject`)."""
    tenant, subject, customer = f"t-{uuid.uuid4().hex[:8]}", "acme", f"cus_{uuid.uuid4().hex[:10]}"
    await billed_subject(db, tenant, subject, customer, included, report)
    return tenant, subject, customer


async def counted(settings: Settings, db: asyncpg.Connection, events: list[Envelope]) -> None:
    """Produce the events and wait until the processor has stored, counted and published them."""
    produce(settings, events)
    await wait_for(lambda: drained(settings, db), 60, "the processor")


def account_of(tenant: str) -> str:
    """A Stripe connected account id of the tenant's own."""
    return "acct_" + "".join(c for c in tenant if c.isalnum())[:40]


def calls(tenant: str, subject: str, n: int, first: int = 0) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [Envelope(id=f"call-{first + i}", source="app", type="api.call", subject=subject,
                     time=now - timedelta(seconds=30), received_at=now, data={}, tenant=tenant) for i in range(n)]
