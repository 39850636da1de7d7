"""Migrations: applied once, in order, each in a transaction."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

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
