"""Assemble a processor from plain configuration values: pool, sinks, meters, metrics, signals.

The CLI maps settings onto ServiceConfig and calls `run`; nothing here reads the environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import asyncpg

from processors import metrics
from processors.batch import Validator
from processors.consumer import Processor, ProcessorConfig, Sinks
from processors.faults import crash_point
from processors.meters import MeterSet, load_meters
from sinks.counter_topic import CounterTopicSink
from sinks.dlq_topic import DeadLetterSink
from sinks.kafka import KafkaPublisher
from sinks.outbox import OutboxRelay
from sinks.postgres import PostgresSink
from sinks.redis_cache import RedisCounterCache

log = logging.getLogger("tally.processor")


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
    accept_types: str = "*"
    late_horizon_s: int = 86400
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    publish_timeout_ms: int = 30000
    redis_counter_ttl_s: int = 7 * 24 * 3600
    pg_writers: int = 2  # transactions per batch, side by side (sinks.postgres)


def validator_for(config: ServiceConfig) -> Validator:
    meters = load_meters(Path(config.meters_file) if config.meters_file else None, config.meters_inline)
    accept = [p.strip() for p in config.accept_types.split(",") if p.strip()]
    return Validator(MeterSet(meters), accept, timedelta(seconds=config.late_horizon_s))


async def run(config: ServiceConfig) -> None:
    validator = validator_for(config)
    log.info("meters: %s", ", ".join(m.slug for m in validator.meters.meters) or "none")
    metrics.serve(config.metrics_host, config.metrics_port)
    # One connection per writer, one for the outbox relay, one for partition upkeep.
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=config.pg_writers + 2)
    publisher = KafkaPublisher(config.processor.kafka_bootstrap, config.publish_timeout_ms)
    cache = RedisCounterCache(config.redis_url, config.redis_prefix, config.redis_counter_ttl_s)
    sinks = Sinks(
        store=PostgresSink(pool, validator.meters.aggregate, config.pg_writers,
                           partial(crash_point, "after_share_commit", config.processor.crash_at)),
        relay=OutboxRelay(pool, CounterTopicSink(publisher, config.counters_topic),
                          on_published=partial(crash_point, "mid_relay", config.processor.crash_at)),
        dead_letters=DeadLetterSink(publisher, config.dlq_topic),
        cache=cache,
    )
    processor = Processor(config.processor, validator, sinks)
    processor.install_signal_handlers()
    try:
        await processor.run()
    finally:
        publisher.close()
        await pool.close()
