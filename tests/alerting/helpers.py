"""Helpers for alert tests: log records as the gateway makes them, and rules saved as the API saves them."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from typing import Any

import asyncpg

from tally.alerts import stored
from tally.egress import EgressPolicy
from tally.schemas.alerts import AlertRule
from tally.sealed import SecretBox
from tally.schemas.envelope import LOG_EVENT_TYPE, Envelope
from tests.processor.helpers import envelope

_ids = itertools.count()

BOX = SecretBox()  # the development key, as the processes the tests start use
# Test receivers listen on loopback: the tests allow it, as an operator would for a receiver of its own.
LOCAL_TARGETS = {"alerts_allow_private_targets": "127.0.0.0/8", "alerts_slack_hosts": "hooks.slack.com,127.0.0.1"}
LOCAL = EgressPolicy.parse(LOCAL_TARGETS["alerts_allow_private_targets"], LOCAL_TARGETS["alerts_slack_hosts"])


def log_record(tenant: str, service: str, level: str, at: datetime, message: str = "boom") -> Envelope:
    n = next(_ids)
    return envelope(tenant, n, type_=LOG_EVENT_TYPE, subject=service, source=f"logs/{service}", time_=at,
                    data={"service": service, "level": level, "message": f"{message} {n}"})


def event(tenant: str, type_: str, at: datetime | None = None) -> Envelope:
    return envelope(tenant, next(_ids), type_=type_, time_=at or datetime.now(timezone.utc))


async def add_rule(db: asyncpg.Connection, tenant: str, **definition: Any) -> AlertRule:
    rule = AlertRule.model_validate({"name": definition.get("id", "rule"), **definition})
    await stored.save(db, tenant, rule, BOX)
    return rule


async def transitions(db: asyncpg.Connection, tenant: str) -> list[tuple[str, str, str]]:
    """(rule, group, kind) in the order they were recorded."""
    rows = await db.fetch("select rule_id, group_key, kind from alert_transitions where tenant = $1 order by id", tenant)
    return [(r["rule_id"], r["group_key"], r["kind"]) for r in rows]
