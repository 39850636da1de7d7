"""What the API shows of a notification target: a Slack webhook's path is its credential, so only its host is
shown; a webhook's URL without user info, query or fragment (where tokens hide), and its secret masked."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from schemas.alerts import AlertRule


def target_url(kind: str, url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if kind == "slack":
        return f"{parts.scheme}://{host}/…"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def rule(row: asyncpg.Record) -> dict[str, Any]:
    """A stored rule as the API shows it: the definition with its targets masked, its origin and version."""
    body = AlertRule.model_validate_json(row["definition"]).public()
    for target in body["targets"]:
        target["url"] = target_url(target["type"], target["url"])
    return {**body, "origin": row["origin"], "version": row["version"], "updated_at": row["updated_at"].isoformat()}
