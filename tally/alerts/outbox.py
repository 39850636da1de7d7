"""Transitions to tally.alerts.v1: published after they commit, marked once the broker acked. A crash between
the ack and the mark publishes the same transition again with the same id, which readers dedupe on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from tally.alerts.transitions import key, transition
from tally.sinks.kafka import KafkaPublisher

BACKLOG_CAP = 100_000  # counted up to this (from the index of unpublished rows): past it no decision changes


async def publish_pending(pool: asyncpg.Pool, publisher: KafkaPublisher, topic: str, limit: int = 500,
                          hook: Callable[[str], None] = lambda _point: None) -> int:
    rows = await pool.fetch("select * from alert_transitions where published_at is null order by id limit $1", limit)
    if not rows:
        return 0
    for row in rows:
        publisher.produce(topic, key(row), transition(row).model_dump_json().encode())
    await asyncio.to_thread(publisher.flush)
    hook("alerts_mid_publish")
    await pool.execute("update alert_transitions t set published_at = now()"
                       " from unnest($1::text[], $2::bigint[]) as p(tenant, id)"
                       " where t.tenant = p.tenant and t.id = p.id",
                       [r["tenant"] for r in rows], [r["id"] for r in rows])
    return len(rows)


async def backlog(pool: asyncpg.Pool) -> int:
    """Transitions recorded and not yet published (up to BACKLOG_CAP)."""
    return await pool.fetchval("select count(*) from (select 1 from alert_transitions where published_at is null"
                               " limit $1) unpublished", BACKLOG_CAP)
