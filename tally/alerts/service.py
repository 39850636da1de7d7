"""`tally alerts`: one active evaluator (a PostgreSQL advisory lock; others wait as standbys), fed by the counter
topic, publishing transitions to tally.alerts.v1 and delivering them to their targets.

The process never exits on an outage: when the leader lock's connection fails (PostgreSQL restarted, say) or the
leader's fence refuses a commit, it stops leading, stands by and takes the lock again once it can
(docs/adr/0050). Each new leader raises the leader epoch, so a deposed leader's late commits are refused.
tally/wiring.py builds ServiceConfig from settings; nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import asyncpg
from confluent_kafka import KafkaException

from tally.alerts import ledger, metrics
from tally.alerts.delivery import Deliverer, DeliveryPolicy
from tally.alerts.evaluator import Evaluator
from tally.alerts.feed import CounterFeed
from tally.alerts.outbox import backlog, publish_pending
from tally.alerts.policy import AlertPolicy
from tally.alerts.rounds import every
from tally.alerts.sealing import reseal
from tally.alerts.usage import take_up
from tally.alerts.windows import MinuteWindows
from tally.meters.definitions import MetersConfig
from tally.meters.fresh import LiveCatalog
from tally.running import run_until_signal
from tally.sinks.kafka import KafkaPublisher, PublishError

log = logging.getLogger("tally.alerts")

# What a round of evaluation, reload or publication waits out: the database or the broker away.
OUTAGES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, PublishError)
# What ends a term as leader; the process stands by and tries again.
DEPOSED = (*OUTAGES, KafkaException, ledger.Fenced)

# Advisory lock of the active evaluator (one bigint; the outbox relay's locks use the two-integer space).
LEADER_LOCK = 0x7A11_A1E7


class LeadershipLost(RuntimeError):
    """The connection holding the leader lock is gone: another evaluator may be active now, so this one stops
    leading until it holds the lock again."""


@dataclass(frozen=True)
class ServiceConfig:
    database_url: str
    kafka_bootstrap: str
    counters_topic: str
    alerts_topic: str
    meters: MetersConfig  # the deploy-time meters; each tenant's own come from the meter catalog
    policy: AlertPolicy
    tick_s: float = 1.0
    rules_reload_s: float = 5.0
    meters_poll_s: float = 1.0  # how often the meter catalog is looked at (tally/meters/fresh.py)
    standby_poll_s: float = 2.0
    delivery: DeliveryPolicy = DeliveryPolicy()
    hook: Callable[[str], None] = lambda _point: None  # test hook: processors.faults.crash_point
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _lead(config: ServiceConfig, stop: asyncio.Event) -> tuple[asyncpg.Connection, int] | None:
    """The connection holding the leader lock and this term's epoch once this process is the active evaluator;
    None if stopped first."""
    conn = await asyncpg.connect(config.database_url)
    try:
        announced = False
        while not await conn.fetchval("select pg_try_advisory_lock($1)", LEADER_LOCK):
            if not announced:
                log.info("another evaluator is active; standing by")
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.standby_poll_s)
            if stop.is_set():
                await conn.close()
                return None
        return conn, await ledger.lead(conn)
    except BaseException:
        conn.terminate()
        raise


def run(config: ServiceConfig) -> int:
    return run_until_signal(partial(serve, config), config.metrics_host, config.metrics_port)


async def serve(config: ServiceConfig, stop: asyncio.Event) -> None:
    """Lead whenever this process can, until `stop`; after a term ends, wait `standby_poll_s` before the next."""
    while not stop.is_set():
        metrics.LEADER.set(0)
        metrics.OUTBOX_BACKLOG.set(0)  # the active evaluator reports it
        try:
            await _term(config, stop)
        except* (LeadershipLost, *DEPOSED) as lost:
            metrics.LEADERSHIP_LOST.inc()
            log.warning("no longer the active evaluator (%s); standing by",
                        "; ".join(f"{type(e).__name__}: {e}" for e in lost.exceptions))
        except* Exception as failed:  # a fault of ours: logged whole, and the next term tries again
            metrics.LEADERSHIP_LOST.inc()
            log.error("the evaluator failed; standing by", exc_info=failed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.standby_poll_s)


async def _term(config: ServiceConfig, stop: asyncio.Event) -> None:
    """One term as the active evaluator: until `stop`, or an error of DEPOSED or LeadershipLost."""
    led = await _lead(config, stop)
    if led is None:
        return
    leader, epoch = led
    box = config.policy.box
    pool = feed = publisher = deliverer = None
    try:
        metrics.LEADER.set(1)
        log.info("active evaluator (leader epoch %d)", epoch)
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4)
        await reseal(pool, box)  # rows from before sealing, or sealed under a key being retired
        feed = await asyncio.to_thread(CounterFeed, config.kafka_bootstrap, config.counters_topic)
        publisher = KafkaPublisher(config.kafka_bootstrap)
        evaluator = Evaluator(pool, LiveCatalog(config.meters, config.meters_poll_s), MinuteWindows(), box, epoch,
                              config.policy.min_every_s)
        deliverer = await Deliverer.open(config.database_url, config.delivery, config.policy.egress, box)
        await evaluator.load(_now())
        feed.assign()
        log.info("evaluating alert rules (%d minute windows recovered)", len(evaluator.windows))
        ended = asyncio.Event()  # this term's work stops with the process or the term

        async def consume() -> None:
            while not ended.is_set():
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
                recorded = await evaluator.evaluate(now) + await take_up(pool, now, box, epoch)
            metrics.WINDOWS.set(len(evaluator.windows))
            if recorded:
                config.hook("alerts_after_commit")
                await publish()

        async def publish_leftovers() -> None:
            """What an earlier term left unpublished, from one period in: a tick publishes what it records."""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), config.tick_s * 5)
            await every(config.tick_s * 5, ended, publish, "publishing transitions", OUTAGES)

        async def count_unpublished() -> None:  # on its own clock: a publish waiting on the broker holds a tick
            metrics.OUTBOX_BACKLOG.set(await backlog(pool))

        async def reload() -> None:
            await evaluator.reload_rules(_now())

        async def until_stopped() -> None:
            await stop.wait()
            ended.set()

        async with asyncio.TaskGroup() as group:
            group.create_task(until_stopped())
            for work in (consume(), every(config.tick_s, ended, tick, "evaluation", OUTAGES),
                         every(config.rules_reload_s, ended, reload, "rule reload", OUTAGES),
                         every(config.tick_s, ended, count_unpublished, "counting unpublished transitions", OUTAGES),
                         publish_leftovers(),
                         deliverer.run(ended)):
                group.create_task(work)
    finally:
        metrics.LEADER.set(0)
        for closing in (deliverer and deliverer.close(), pool and pool.close()):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closing, 10)
        if feed is not None:
            await asyncio.to_thread(feed.close)
        if publisher is not None:
            publisher.close()
        leader.terminate()
