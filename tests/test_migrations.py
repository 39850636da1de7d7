"""Migrations: applied once, in order, each in a transaction."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from tally.meters.unique import window_id
from tally.meters.weighted import series_text
from tally.schemas.counters import CounterKey
from tally.sinks.migrations import discover, migrate
from tally.settings import Settings


async def test_migrating_twice_applies_once(settings: Settings, db: asyncpg.Connection) -> None:
    assert await migrate(settings.database_url, settings.migrations_dir) == []
    rows = await db.fetch("select version from schema_migrations order by version")
    assert [r["version"] for r in rows] == [m.version for m in discover(settings.migrations_dir)]


@pytest.fixture
async def scratch_db(settings: Settings) -> str:
    name = f"tally_scratch_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f'create database "{name}"')
    try:
        yield settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await conn.execute(f'drop database "{name}" with (force)')
        await conn.close()


async def test_applies_in_order_and_a_failing_migration_leaves_nothing(scratch_db: str, tmp_path: Path) -> None:
    (tmp_path / "0002_second.sql").write_text("insert into t values (2);")
    (tmp_path / "0001_first.sql").write_text("create table t (n int); insert into t values (1);")
    (tmp_path / "0003_broken.sql").write_text("insert into t values (3); select no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(scratch_db, tmp_path)
    conn = await asyncpg.connect(scratch_db)
    try:
        assert [r["n"] for r in await conn.fetch("select n from t order by n")] == [1, 2]
        assert [r["version"] for r in await conn.fetch("select version from schema_migrations order by 1")] == [
            "0001", "0002"
        ]
    finally:
        await conn.close()
    (tmp_path / "0003_broken.sql").write_text("insert into t values (3);")
    assert [m.version for m in await migrate(scratch_db, tmp_path)] == ["0003"]
    assert await migrate(scratch_db, tmp_path) == []


def test_badly_named_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("select 1;")
    with pytest.raises(ValueError, match="NNNN_name.sql"):
        discover(tmp_path)


# -- 0087: tenant-owned tables keyed by tenant (docs/adr/0157) -------------------------------------------------

REKEYED = {
    "counters": ["tenant", "key"],
    "counter_outbox": ["tenant", "key"],
    "counter_distinct": ["tenant", "window_id", "hash"],
    "weighted_points": ["tenant", "series", "at", "source", "id"],
    "stripe_reports": ["tenant", "id"],
    "drift_reports": ["tenant", "id"],
    "usage_alerts": ["tenant", "id"],
    "alert_transitions": ["tenant", "id"],
    "alert_deliveries": ["tenant", "transition_id", "target"],
}

_PRIMARY_KEY = """
select array(select a.attname from unnest(i.indkey) with ordinality as k(attnum, n)
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum order by k.n)
from pg_index i where i.indrelid = $1::regclass and i.indisprimary
"""


def _migrations_until(target: Path, source: Path, before: str) -> None:
    """Copy into `target` the migrations of `source` numbered below `before` (all of them for "9999")."""
    for path in source.glob("*.sql"):
        if path.name[:4] < before:
            (target / path.name).write_text(path.read_text())


async def _rows_before_0087(conn: asyncpg.Connection) -> dict[str, object]:
    """A row in every table 0087 re-keys, written as the schema before it took them, for two tenants."""
    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    distinct = CounterKey("t-a", "users", "day", at, "s1", ()).to_text()
    calls = CounterKey("t-b", "calls", "day", at, None, (("region", "eu"),)).to_text()
    pruned = CounterKey("t-a", "users", "day", at - timedelta(days=400), "s1", ()).to_text()
    for key, tenant, meter, aggregation in ((distinct, "t-a", "users", "UNIQUE_COUNT"),
                                            (calls, "t-b", "calls", "COUNT")):
        await conn.execute(
            "insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end, value,"
            " count, latest_time, revision)"
            " values ($1, $2, $3, $4, 'day', $5::timestamptz, $5::timestamptz + interval '1 day', 2, 2, $5, 3)",
            key, tenant, meter, aggregation, at)
        await conn.execute("insert into counter_outbox (key, revision) values ($1, 3)", key)
    await conn.executemany("insert into counter_distinct (window_id, hash) values ($1, $2)",
                           [(window_id(distinct), 11), (window_id(distinct), 12), (window_id(pruned), 13)])
    series = series_text("t-b", "seats", None, {})
    await conn.executemany("insert into weighted_points (series, at, source, id, level) values ($1, $2, 's', $3, $4)",
                           [(series, at, "p1", 5), (series, at + timedelta(hours=1), "p2", 7)])
    await conn.execute(
        "insert into stripe_reports (identifier, tenant, subject, meter, period_label, period_end, seq, kind,"
        " event_name, stripe_customer_id, value, event_time)"
        " values ('id-a', 't-a', 's1', 'users', $1, $2, 1, 'usage', 'users', 'cus_1', 2, $2)", at.date(), at)
    await conn.execute("insert into drift_reports (key, tenant, meter, place, expected, found) values"
                       " ($1, 't-b', 'calls', 'counters', 2, 3)", calls)
    transitions = {}
    for tenant in ("t-a", "t-b"):
        transitions[tenant] = await conn.fetchval(
            "insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, threshold, comparison,"
            " window_s, fired_at) values ($1, 'r', 'r', '{}', '{}', 'firing', 1, '>', 60, now()) returning id", tenant)
        await conn.execute(
            "insert into alert_deliveries (transition_id, target, kind, endpoint, target_digest) values"
            " ($1, 0, 'webhook', 'https://example.com', sha256('webhook https://example.com/hook'))",
            transitions[tenant])
    await conn.execute(
        "insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used, included,"
        " fired_transition) values ('t-a', 's1', 'users', $1, $2, 80, 8, 10, $3)", at.date(), at, transitions["t-a"])
    return {"distinct": distinct, "calls": calls, "series": series, "transitions": transitions}


async def _failed_concurrent_build(conn: asyncpg.Connection, database_url: str) -> None:
    """A concurrent build of the new counters key cancelled while it waits for an older snapshot: the index is left
    behind, invalid."""
    older = await asyncpg.connect(database_url)
    try:
        async with older.transaction(isolation="repeatable_read"):
            await older.fetchval("select count(*) from counters")
            await conn.execute("set statement_timeout = '1s'")
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("create unique index concurrently counters_tenant_key on counters (tenant, key)")
            await conn.execute("reset statement_timeout")
    finally:
        await older.close()
    assert await conn.fetchval("select not indisvalid from pg_index where indexrelid = 'counters_tenant_key'::regclass")


@pytest.mark.parametrize("prebuilt", ["none", "valid", "invalid"],
                         ids=["in-migration", "index-built-concurrently-first", "concurrent-build-failed"])
async def test_0087_re_keys_a_populated_database_and_keeps_its_rows(scratch_db: str, tmp_path: Path,
                                                                    settings: Settings, prebuilt: str) -> None:
    _migrations_until(tmp_path, settings.migrations_dir, "0087")
    await migrate(scratch_db, tmp_path)
    conn = await asyncpg.connect(scratch_db)
    try:
        made = await _rows_before_0087(conn)
        if prebuilt == "valid":  # what an operator runs beforehand on a large counters table (docs/adr/0157)
            await conn.execute("create unique index concurrently counters_tenant_key on counters (tenant, key)")
        elif prebuilt == "invalid":
            await _failed_concurrent_build(conn, scratch_db)
        _migrations_until(tmp_path, settings.migrations_dir, "9999")
        assert "0087" in [m.version for m in await migrate(scratch_db, tmp_path)]

        for table, columns in REKEYED.items():
            assert list(await conn.fetchval(_PRIMARY_KEY, table)) == columns, table
        assert [r[0] for r in await conn.fetch("select indexname from pg_indexes where tablename = 'counters'"
                                               " and indexdef like '%UNIQUE%'")] == ["counters_pkey"]
        assert {tuple(r) for r in await conn.fetch("select tenant, key, revision from counters")} == {
            ("t-a", made["distinct"], 3), ("t-b", made["calls"], 3)}
        assert {tuple(r) for r in await conn.fetch("select tenant, key, revision from counter_outbox")} == {
            ("t-a", made["distinct"], 3), ("t-b", made["calls"], 3)}
        # The hashes of a window still stored keep it, its tenant's; those of a pruned window are gone.
        assert {tuple(r) for r in await conn.fetch("select tenant, window_id, hash from counter_distinct")} == {
            ("t-a", window_id(made["distinct"]), 11), ("t-a", window_id(made["distinct"]), 12)}
        points = await conn.fetch("select tenant, series, level from weighted_points order by at")
        assert [tuple(r) for r in points] == [("t-b", made["series"], 5), ("t-b", made["series"], 7)]
        assert [tuple(r) for r in await conn.fetch("select tenant, identifier from stripe_reports")] == [
            ("t-a", "id-a")]
        assert [r[0] for r in await conn.fetch("select tenant from drift_reports")] == ["t-b"]
        transitions = made["transitions"]
        assert {tuple(r) for r in await conn.fetch("select tenant, transition_id from alert_deliveries")} == {
            ("t-a", transitions["t-a"]), ("t-b", transitions["t-b"])}
        assert [tuple(r) for r in await conn.fetch("select tenant, fired_transition from usage_alerts")] == [
            ("t-a", transitions["t-a"])]

        # The foreign keys name the tenant: another tenant's transition cannot be referenced, and a transition's
        # deliveries still go with it.
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute("update usage_alerts set resolved_transition = $1", transitions["t-b"])
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute("update alert_deliveries set transition_id = $1 where tenant = 't-a'",
                               transitions["t-b"])
        await conn.execute("delete from alert_transitions where tenant = 't-b'")
        assert await conn.fetchval("select count(*) from alert_deliveries where tenant = 't-b'") == 0
    finally:
        await conn.close()
