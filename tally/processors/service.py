"""`tally process`: assemble a processor from plain configuration values (pool, sinks, meters) and run it until
a signal (tally/running.py). tally/wiring.py builds ServiceConfig from settings; nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import asyncpg

from tally.meters import stateful
from tally.meters.definitions import load_meters
from tally.meters.live import LiveMeters
from tally.processors import metrics
from tally.processors.batch import Validator
from tally.processors.checkpoint import Sinks
from tally.processors.consumer import Processor, ProcessorConfig
from tally.processors.faults import crash_point
from tally.running import run_until_signal
from tally.sinks.counter_topic import CounterTopicSink
from tally.sinks.dlq_topic import DeadLetterSink
from tally.sinks.kafka import KafkaPublisher
from tally.sinks.maintenance import Maintenance, Retention
from tally.sinks.outbox import OutboxRelay, backlog
from tally.sinks.postgres import PostgresSink
from tally.sinks.redis_cache import RedisCounterCache

log = logging.getLogger("tally.processor")

BACKLOG_EVERY_S = 5.0  # how often the outbox backlog gauge is read


@dataclass(frozen=True)
class ServiceConfig:
    processor: ProcessorConfig
    database_url: str
    redis_url: str
    redis_prefix: str
    counters_topic: str
    dlq_topic: str
    meters_file: str = ""
    meters_inline: str = ""
    meters_poll_s: float = 1.0  # how often the tenants' meter catalog is polled between batches
    accept_types: str = "*"
    late_horizon_s: int = 86400
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    publish_timeout_ms: int = 30000
    redis_counter_ttl_s: int = 7 * 24 * 3600
    pg_writers: int = 2  # transactions per batch, side by side (sinks.postgres)
    pg_command_timeout_s: float = 60.0
    pg_lock_timeout_ms: int = 20000
    pg_idle_in_transaction_timeout_ms: int = 90000
    pg_keepalives_idle_s: int = 30
    retention: Retention = Retention()

    def __post_init__(self) -> None:
        # The relay waits for Kafka acks inside its transaction, and an attempt must outlast that wait: a
        # relay given up while its messages are in flight could let an older state land after a newer one.
        if not self.publish_timeout_ms < self.pg_idle_in_transaction_timeout_ms:
            raise ValueError("pg_idle_in_transaction_timeout_ms must be longer than publish_timeout_ms")
        if not self.publish_timeout_ms < self.processor.attempt_timeout_s * 1000:
            raise ValueError("attempt_timeout_s must be longer than publish_timeout_ms")
        # A window pruned while late events may still count in it would come back holding only those; a level change
        # pruned while one may still be written before it would leave its neighbours integrated wrongly.
        kept = [*self.retention.counter_days.values(), self.retention.weighted_points_days]
        if any(0 < days * 86400 <= self.late_horizon_s for days in kept):
            raise ValueError("a counter retention must be longer than the late-event horizon")


def pool_settings(config: ServiceConfig) -> dict:
    """Bounds on every database wait: a statement, a row lock, a transaction whose client went quiet (the
    relay's waits for Kafka acks stay inside it), and keepalives so the server drops a vanished client's
    locks in about a minute rather than two hours."""
    return {
        "command_timeout": config.pg_command_timeout_s,
        "server_settings": {
            "lock_timeout": str(config.pg_lock_timeout_ms),
            "idle_in_transaction_session_timeout": str(config.pg_idle_in_transaction_timeout_ms),
            "tcp_keepalives_idle": str(config.pg_keepalives_idle_s),
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
        },
    }


def validator_for(config: ServiceConfig) -> Validator:
    meters = load_meters(Path(config.meters_file) if config.meters_file else None, config.meters_inline)
    accept = [p.strip() for p in config.accept_types.split(",") if p.strip()]
    return Validator(LiveMeters(meters, config.meters_poll_s), accept, timedelta(seconds=config.late_horizon_s))


async def watch_outbox(pool: asyncpg.Pool, every_s: float = BACKLOG_EVERY_S) -> None:
    """The outbox backlog gauge, read on a clock of its own: a relay retrying a publish holds the batch loop, and
    that is when the figure matters."""
    while True:
        try:
            metrics.OUTBOX_BACKLOG.set(await backlog(pool))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.debug("outbox backlog not read: %s", exc)
        await asyncio.sleep(every_s)


def run(config: ServiceConfig) -> int:
    return run_until_signal(partial(serve, config), config.metrics_host, config.metrics_port)


async def serve(config: ServiceConfig, stop: asyncio.Event) -> None:
    """One consumer-group member until `stop`."""
    validator = validator_for(config)
    live = validator.live
    log.info("meters: %s", ", ".join(m.slug for m in validator.meters.meters) or "none")
    # One connection per writer, one for the outbox relay, one for partition upkeep, one for the backlog gauge.
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=config.pg_writers + 3,
                                     **pool_settings(config))
    publisher = KafkaPublisher(config.processor.kafka_bootstrap, config.publish_timeout_ms)
    cache = RedisCounterCache(config.redis_url, config.redis_prefix, config.redis_counter_ttl_s)
    sinks = Sinks(
        store=PostgresSink(pool, live.aggregate, config.pg_writers,
                           partial(crash_point, "after_share_commit", config.processor.crash_at),
                           partial(stateful.apply, live), live),
        relay=OutboxRelay(pool, CounterTopicSink(publisher, config.counters_topic),
                          on_published=partial(crash_point, "mid_relay", config.processor.crash_at)),
        dead_letters=DeadLetterSink(publisher, config.dlq_topic),
        maintenance=Maintenance(pool, config.retention),
        cache=cache,
    )
    processor = Processor(config.processor, validator, sinks, partial(live.refresh, pool))
    stopping = asyncio.create_task(_stop_on(stop, processor))
    # What exists now (modules, meters, clients) lives as long as the process: kept out of the collector's
    # scans, which then look at the batches' objects alone (docs/adr/0113).
    gc.freeze()
    watching = asyncio.create_task(watch_outbox(pool))
    try:
        await processor.run()
    finally:
        stopping.cancel()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await cache.close()
        publisher.close()
        await pool.close()


async def _stop_on(stop: asyncio.Event, processor: Processor) -> None:
    await stop.wait()
    processor.stop()
