"""Helpers for processor tests: produce envelopes, wait for the processor, read what it produced."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import asyncpg
from confluent_kafka import Producer

from tally.sinks.kafka import caught_up
from tally.schemas.counters import CounterState
from tally.schemas.envelope import Envelope
from tally.settings import ROOT, Settings
from tests.support import env_for, read_topic


def envelope(tenant: str, n: int, *, type_: str = "order.placed", subject: str | None = None,
             time_: datetime | None = None, data: object = None, source: str = "shop") -> Envelope:
    now = datetime.now(timezone.utc)
    return Envelope(
        id=f"evt-{n}", source=source, type=type_, subject=subject or f"customer-{n % 5}",
        time=time_ or now - timedelta(minutes=7 * (n % 30)), received_at=now,
        data={"n": n} if data is None else data, tenant=tenant,
    )


def produce(settings: Settings, messages: Iterable[Envelope | tuple[bytes | None, bytes | None]],
            headers: list[tuple[str, bytes]] | None = None) -> int:
    """Produce envelopes (or raw key/value pairs) to the events topic and wait for the acks."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5, "enable.idempotence": True})
    n = 0
    for item in messages:
        key, value = (item.key(), item.to_bytes()) if isinstance(item, Envelope) else item
        producer.produce(settings.topics.events, value, key, headers=headers)
        n += 1
        if n % 10000 == 0:
            producer.flush()
    assert producer.flush(30) == 0
    return n


def expected_counts(events: Iterable[Envelope]) -> Counter[tuple[str, str, str, str | None, str]]:
    """Independent of meters.windows: the default meter, counted by hand per hour and day."""
    out: Counter[tuple[str, str, str, str | None, str]] = Counter()
    for e in events:
        t = e.time.astimezone(timezone.utc)
        out[(e.tenant, "hour", t.strftime("%Y-%m-%dT%H:00:00+00:00"), e.subject, e.type)] += 1
        out[(e.tenant, "day", t.strftime("%Y-%m-%dT00:00:00+00:00"), e.subject, e.type)] += 1
    return out


async def counter_counts(db: asyncpg.Connection, tenant: str, meter: str = "events") -> Counter:
    rows = await db.fetch(
        "select window_name, window_start, subject, grp->>'type' as type, value from counters"
        " where tenant = $1 and meter = $2", tenant, meter)
    counts: Counter = Counter()
    for r in rows:  # added up: two rows for one window would show as a doubled count, not collapse into one
        counts[(tenant, r["window_name"], r["window_start"].isoformat(), r["subject"], r["type"])] += int(r["value"])
    return counts


async def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def event_count(db: asyncpg.Connection, tenant: str) -> int:
    return await db.fetchval("select count(*) from events where tenant = $1", tenant)


def committed_all(settings: Settings) -> bool:
    return caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.topics.events)


async def drained(settings: Settings, db: asyncpg.Connection) -> bool:
    outbox = await db.fetchval("select count(*) from counter_outbox")
    return outbox == 0 and await asyncio.to_thread(committed_all, settings)


def latest_counter_states(settings: Settings) -> dict[str, CounterState]:
    """What a compacted-topic reader ends up with: the last state per key, in offset order."""
    latest: dict[str, CounterState] = {}
    for msg in read_topic(settings.kafka_bootstrap, settings.topics.counters):
        latest[msg.key().decode()] = CounterState.from_bytes(msg.value())
    return latest


async def assert_topic_matches_postgres(settings: Settings, db: asyncpg.Connection, tenant: str,
                                        meter: str = "events") -> int:
    """Every counter window of the tenant is on the topic as in PostgreSQL; returns how many `meter` has."""
    rows = await db.fetch("select key, meter, value::text as value, count, revision from counters where tenant = $1",
                          tenant)
    states = {k: s for k, s in (await asyncio.to_thread(latest_counter_states, settings)).items() if s.tenant == tenant}
    assert {r["key"]: (r["value"], r["count"], r["revision"]) for r in rows} == {
        k: (s.value, s.count, s.revision) for k, s in states.items()
    }
    return sum(r["meter"] == meter for r in rows)


def maintenance(settings: Settings, **env: str) -> str:
    """Run `tally maintenance` once with these settings and environment; its summary."""
    done = subprocess.run([sys.executable, "-m", "tally.cli", "maintenance"], env=env_for(settings, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout
