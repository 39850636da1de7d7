"""Versioned SQL migrations: each file applied once, in order, in its own transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x7A11  # one migrator at a time across processes


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def discover(directory: Path) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(match[1], match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version in {directory}")
    return found


async def migrate(database_url: str, directory: Path) -> list[Migration]:
    """Apply what is pending and return it; an advisory lock makes concurrent runs safe."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version text primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        applied: list[Migration] = []
        for migration in discover(directory):
            async with conn.transaction():
                await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_ID)
                done = await conn.fetchval(
                    "select 1 from schema_migrations where version = $1", migration.version
                )
                if done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into schema_migrations (version, name) values ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied.append(migration)
        return applied
    finally:
        await conn.close()
