"""A database wait never outlives max.poll.interval.ms: a transaction that holds an event's key for longer
(a member whose host froze, say) makes the claim give up after lock_timeout and retry while the consumer
polls, so the member keeps its partitions and stores everything once the key is free."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tally.settings import Settings
from tests.processor.helpers import drained, envelope, event_count, produce, wait_for
from tests.support import running

SHORT = {"max_poll_interval_ms": 10000, "attempt_timeout_s": 5.0, "publish_timeout_ms": 3000,
         "pg_lock_timeout_ms": 1000, "pg_idle_in_transaction_timeout_ms": 5000, "retry_max_ms": 500}


async def test_a_key_held_longer_than_the_poll_interval_is_waited_out_without_losing_the_group(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"zombie-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update=SHORT)
    events = [envelope(tenant, n) for n in range(20)]
    zombie = await asyncpg.connect(settings.database_url)
    try:
        holder = zombie.transaction()
        await holder.start()
        await zombie.execute("insert into event_keys (tenant, source, id) values ($1, 'shop', 'evt-5')", tenant)
        produce(settings, events)
        with running("processor", ["process"], settings) as processor:
            await asyncio.sleep(15)  # longer than max.poll.interval.ms
            await holder.rollback()
            await wait_for(lambda: drained(settings, db), 60, "the processor to store everything once the key is free")
            log = processor.output()
        assert "LockNotAvailableError" in log and "lost [" not in log, log[-3000:]
        assert await event_count(db, tenant) == 20
    finally:
        await zombie.close()


async def test_every_pool_connection_carries_the_timeouts(settings: Settings) -> None:
    from tally.processors.service import pool_settings
    from tally.wiring import processor

    config = processor(settings.model_copy(update=SHORT))
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, **pool_settings(config))
    try:
        async with pool.acquire() as conn:
            shown = {name: await conn.fetchval(f"show {name}") for name in
                     ("lock_timeout", "idle_in_transaction_session_timeout", "tcp_keepalives_idle")}
    finally:
        await pool.close()
    assert shown == {"lock_timeout": "1s", "idle_in_transaction_session_timeout": "5s", "tcp_keepalives_idle": "30"}
