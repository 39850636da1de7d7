"""A transition row as the message everyone sees: tally.alerts.v1, outgoing webhooks, Slack and the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from tally.schemas.alerts import AlertTransition


def transition(row: Mapping[str, Any]) -> AlertTransition:
    """From an `alert_transitions` row (asyncpg returns jsonb as text unless a codec is set)."""
    grp, detail = row["grp"], row["detail"]
    return AlertTransition(
        id=f"alert-{row['id']}", type=f"alert.{row['kind']}", tenant=row["tenant"],
        rule={"id": row["rule_id"], "name": row["rule_name"]},
        group=orjson.loads(grp) if isinstance(grp, str) else grp,
        value=None if row["value"] is None else str(row["value"]), threshold=str(row["threshold"]),
        comparison=row["comparison"], window_s=row["window_s"], at=row["at"], fired_at=row["fired_at"],
        detail=orjson.loads(detail) if isinstance(detail, str) else detail)


def key(row: Mapping[str, Any]) -> bytes:
    """The message key: one rule and group, so its transitions keep their order in one partition."""
    return orjson.dumps([row["tenant"], row["rule_id"], row["group_key"]])
