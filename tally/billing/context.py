"""What every job is handed: connections and the settings jobs read (billing imports no settings module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as redis

from tally.meters.backfill import BackfillConfig
from tally.meters.catalog import Catalog
from tally.meters.definitions import MetersConfig
from tally.meters.fresh import LiveCatalog
from tally.sinks.counter_topic import CounterTopicSink
from tally.sinks.kafka import KafkaPublisher
from tally.sinks.outbox import OutboxRelay, pending
from tally.sinks.redis_cache import RedisCounterCache
from tally.usage.windows import WindowReader

MAX_INVOICE_GRACE_S = 72 * 3600  # Stripe's longest invoice finalisation grace (docs/adr/0065)


@dataclass(frozen=True)
class BillingConfig:
    database_url: str
    redis_url: str
    redis_prefix: str
    redis_counter_ttl_s: int
    meters: MetersConfig  # the deploy-time meters; each tenant's own come from the meter catalog
    limits_refresh_s: float = 0.5
    limits_ttl_s: int = 300
    tick_s: float = 5.0
    close_grace_s: int = 86400
    late_horizon_s: int = 86400
    stripe_invoice_grace_s: int = 3600
    stripe_api_key: str = "sk_test_123"
    stripe_api_base: str = "http://127.0.0.1:12111"
    stripe_max_attempts: int = 4
    stripe_breaker_fail_max: int = 5
    stripe_breaker_reset_s: float = 30.0
    kafka_bootstrap: str = "127.0.0.1:9092"
    counters_topic: str = "tally.counters.v1"
    alerts_refresh_s: float = 5.0
    hook: Callable[[str], None] = lambda _point: None  # tests: kill the job at a named point
    topic_states: Callable[[str | None], dict[str, Any]] | None = None  # the counter topic's latest states
    backfill: BackfillConfig = BackfillConfig()
    meters_poll_s: float = 1.0  # how often the meter catalog is looked at (tally/meters/fresh.py)
    job_runs_retention_days: int = 90  # runs of jobs that move no money go this long after they started; 0 keeps

    def problems(self) -> list[str]:
        """Settings that would let usage go unbilled without a word; the jobs refuse to start on any."""
        out = []
        if self.close_grace_s < self.late_horizon_s:
            out.append(f"TALLY_CLOSE_GRACE_S ({self.close_grace_s}) is shorter than TALLY_LATE_HORIZON_S "
                       f"({self.late_horizon_s}): periods would be frozen while late events still count for them;"
                       f" set TALLY_CLOSE_GRACE_S to at least {self.late_horizon_s}")
        if not 0 < self.stripe_invoice_grace_s <= MAX_INVOICE_GRACE_S:
            out.append(f"TALLY_STRIPE_INVOICE_GRACE_S ({self.stripe_invoice_grace_s}) must be your Stripe account's"
                       f" invoice finalisation grace: 1 to {MAX_INVOICE_GRACE_S} s (Stripe: 1 hour by default, at"
                       " most 72 hours)")
        return out


@dataclass
class JobContext:
    config: BillingConfig
    pool: asyncpg.Pool
    redis: redis.Redis
    shared: dict[str, Any] = field(default_factory=dict)  # what lives as long as the worker (the Stripe breaker)
    live: LiveCatalog | None = None

    async def catalog(self) -> Catalog:
        """Every tenant's meters, fresh within `meters_poll_s`: jobs take a tenant's meters from here."""
        if self.live is None:
            self.live = LiveCatalog(self.config.meters, self.config.meters_poll_s)
        return await self.live.current(self.pool)

    @property
    def reader(self) -> WindowReader:
        c = self.config
        return WindowReader(self.pool, self.redis, c.redis_prefix, c.redis_counter_ttl_s)

    @classmethod
    async def open(cls, config: BillingConfig) -> "JobContext":
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4)
        client = redis.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        return cls(config, pool, client)

    async def relay_counters(self) -> None:
        """Publish the counter windows queued in the outbox to the counter topic and the cache, as a processor
        does after its batches: what a job wrote follows there even while no processor runs. Nothing queued, no
        publisher is opened."""
        if not await pending(self.pool):
            return
        c = self.config
        publisher = KafkaPublisher(c.kafka_bootstrap)
        cache = RedisCounterCache(c.redis_url, c.redis_prefix, c.redis_counter_ttl_s)
        try:
            states = await OutboxRelay(self.pool, CounterTopicSink(publisher, c.counters_topic)).publish_all()
            await cache.write(states)
            await cache.flush()
        finally:
            await cache.close()
            publisher.close()

    async def close(self) -> None:
        await self.redis.aclose()
        await self.pool.close()
