"""Helpers for usage and billing tests: a gateway and a processor with billable meters, keys, plans."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from ingest.auth import create_key
from tally.settings import Settings
from tests.gateway.helpers import Gateway, start_gateway
from tests.support import running

METERS = """
meters:
  - {slug: api_calls, event_type: "api.call", aggregation: COUNT, windows: [hour, day]}
  - {slug: tokens, event_type: "llm.*", aggregation: SUM, value_path: data.tokens, windows: [hour, day]}
"""


def metered(settings: Settings) -> Settings:
    return settings.model_copy(update={"meters": METERS, "batch_max_wait_ms": 50})


@contextmanager
def pipeline(settings: Settings, **env: str) -> Iterator[Gateway]:
    """A gateway and one processor on these settings."""
    with running("processor", ["process"], settings, **env), start_gateway("gateway", settings, **env) as gw:
        yield gw


async def tenant_keys(settings: Settings) -> tuple[str, str, str]:
    """(tenant, a key with every scope, a key that may only write events)."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        _, admin = await create_key(conn, tenant, "admin", ["admin:write", "usage:read", "events:write"])
        _, writer = await create_key(conn, tenant, "writer", ["events:write"])
    finally:
        await conn.close()
    return tenant, admin, writer
