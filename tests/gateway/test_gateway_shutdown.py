"""At shutdown the gateway closes every connection it opened: once its lifespan ended after a usage read (which
opens the plan changes' listening connection to PostgreSQL and the usage figures' Redis client) and a stats read
(the answer cache's Redis client), this process holds no more connections to PostgreSQL or Redis than before the
gateway started."""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlsplit

import asyncpg

import tally.ingest.app
from tally.settings import Settings
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe
from tally.usage.plan_changes import CHANNEL
from tally.wiring import gateway_config, products
from tests.processor.helpers import wait_for
from tests.support import wait_until


def _established(port: int) -> int:
    """This process's established TCP connections to `port` (any address): its sockets' inodes met in the kernel's
    connection tables."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
                    count += 1
    return count


async def _get(app: Any, path: str, query: str, secret: str) -> int:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app({"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
               "headers": [(b"authorization", f"Bearer {secret}".encode())], "client": ("127.0.0.1", 1)},
              receive, send)
    return statuses[0]


async def test_the_gateway_leaves_no_postgres_or_redis_connection_open_at_shutdown(
        gateway_settings: Settings, new_key: Any, db: asyncpg.Connection) -> None:
    pg, rd = urlsplit(gateway_settings.database_url).port or 5432, urlsplit(gateway_settings.redis_url).port or 6379
    tenant, secret = await new_key(["usage:read", "events:read"])
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="api_calls", included=1)]))
    await subscribe(db, tenant, Subscription(subject="s-1", plan_id="p", start_date="2026-01-01"))
    listening = ("select count(*) from pg_stat_activity where datname = current_database()"
                 f" and query = 'LISTEN \"{CHANNEL}\"'")
    listeners = await db.fetchval(listening)
    before = {pg: _established(pg), rd: _established(rd)}

    async def listened() -> bool:
        return await db.fetchval(listening) > listeners

    app = tally.ingest.app.create_app(gateway_config(gateway_settings), products(gateway_settings))
    async with app.app.state.gateway.lifespan(app.app):
        assert await _get(app, "/v1/usage", "subject=s-1", secret) == 200
        await wait_for(listened, 30, "the plan changes to listen")  # opened in the background by the read
        assert await _get(app, "/v1/events/stats", "", secret) == 200
        assert _established(rd) > before[rd]

    def after() -> dict[int, int]:
        return {pg: _established(pg), rd: _established(rd)}

    try:
        await asyncio.to_thread(wait_until, lambda: after() == before, 10, 0.1, "the gateway's connections to close")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {before} before, {after()} after") from None
    assert not await listened()
