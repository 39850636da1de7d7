"""`tally alerts`: one active evaluator (a PostgreSQL advisory lock; others wait as standbys), fed by the counter
topic, publishing transitions to tally.alerts.v1 and delivering them to their targets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg

from alerts import metrics
from alerts.delivery import Deliverer, DeliveryPolicy
from alerts.evaluator import Evaluator
from alerts.feed import CounterFeed
from alerts.outbox import publish_pending
from alerts.rounds import every
from alerts.usage import take_up
from alerts.windows import MinuteWindows
from meters.definitions import MetersConfig
from sinks.kafka import KafkaPublisher, PublishError

log = logging.getLogger("tally.alerts")

# What a round of evaluation, reload or publication waits out: the database or the broker away.
OUTAGES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, PublishError)

# Advisory lock of the active evaluator (one bigint; the outbox relay's locks use the two-integer space).
LEADER_LOCK = 0x7A11_A1E7


class LeadershipLost(RuntimeError):
    """The connection holding the leader lock is gone: another evaluator may be active now, so this one stops."""


@dataclass(frozen=True)
class AlertsConfig:
    database_url: str
    kafka_bootstrap: str
    counters_topic: str
    alerts_topic: str
    meters: MetersConfig
    tick_s: float = 1.0
    rules_reload_s: float = 5.0
    standby_poll_s: float = 2.0
    delivery: DeliveryPolicy = DeliveryPolicy()
    hook: Callable[[str], None] = lambda _point: None  # test hook: processors.faults.crash_point


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _lead(config: AlertsConfig, stop: asyncio.Event) -> asyncpg.Connection | None:
    """The connection holding the leader lock once this process is the active evaluator; None if stopped first."""
    conn = await asyncpg.connect(config.database_url)
    announced = False
    while not await conn.fetchval("select pg_try_advisory_lock($1)", LEADER_LOCK):
        if not announced:
            log.info("another evaluator is active; standing by")
            announced = True
        try:
            await asyncio.wait_for(stop.wait(), config.standby_poll_s)
            await conn.close()
            return None
        except TimeoutError:
            pass
    return conn


async def run(config: AlertsConfig, stop: asyncio.Event) -> None:
    metrics.LEADER.set(0)
    leader = await _lead(config, stop)
    if leader is None:
        return
    metrics.LEADER.set(1)
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4)
    feed = await asyncio.to_thread(CounterFeed, config.kafka_bootstrap, config.counters_topic)
    publisher = KafkaPublisher(config.kafka_bootstrap)
    evaluator = Evaluator(pool, config.meters, MinuteWindows())
    deliverer = await Deliverer.open(config.database_url, config.delivery)
    try:
        await evaluator.load(_now())
        feed.assign()
        log.info("evaluating alert rules (%d minute windows recovered)", len(evaluator.windows))

        async def consume() -> None:
            while not stop.is_set():
                for value in await asyncio.to_thread(feed.poll, 0.2):
                    try:
                        kept = evaluator.windows.offer_raw(value)
                    except ValueError as exc:  # not a counter state: skipped, never a stop
                        metrics.STATES_READ.labels("skipped").inc()
                        log.warning("skipped a counter-topic message that is not a counter state: %s", exc)
                        continue
                    metrics.STATES_READ.labels("kept" if kept else "ignored").inc()

        publishing = asyncio.Lock()

        async def publish() -> None:
            async with publishing:
                await publish_pending(pool, publisher, config.alerts_topic, hook=config.hook)

        async def tick() -> None:
            try:
                await leader.execute("select 1")
            except OUTAGES as exc:
                raise LeadershipLost(f"the leader lock's connection failed: {exc}") from exc
            now = _now()
            with metrics.EVALUATION_SECONDS.time():
                recorded = await evaluator.evaluate(now) + await take_up(pool, now)
            metrics.WINDOWS.set(len(evaluator.windows))
            if recorded:
                config.hook("alerts_after_commit")
                await publish()

        async def reload() -> None:
            await evaluator.reload_rules(_now())

        await asyncio.gather(consume(), every(config.tick_s, stop, tick, "evaluation", OUTAGES),
                             every(config.rules_reload_s, stop, reload, "rule reload", OUTAGES),
                             every(config.tick_s * 5, stop, publish, "publishing transitions", OUTAGES),
                             deliverer.run(stop))
    finally:
        await deliverer.close()
        await asyncio.to_thread(feed.close)
        publisher.close()
        await pool.close()
        await leader.close()
