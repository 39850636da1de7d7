"""Alert tests get a database of their own per test: the evaluator reads every tenant's rules, so rules other
tests leave in the session's database would be evaluated (and transition) too."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tally.sinks.migrations import migrate
from tally.settings import Settings
from tests.alerting.helpers import LOCAL_TARGETS
from tests.conftest import _with_database


@pytest.fixture
async def alone(isolated: Settings, base_settings: Settings) -> AsyncIterator[Settings]:
    name = f"{isolated.database_url.rsplit('/', 1)[1].split('?')[0]}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(base_settings.database_url)
    await admin.execute(f'create database "{name}"')
    own = isolated.model_copy(update={"database_url": _with_database(isolated.database_url, name),
                                      "alerts_min_every_s": 1, **LOCAL_TARGETS})
    try:
        await migrate(own.database_url, own.migrations_dir)
        yield own
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


@pytest.fixture
async def alone_db(alone: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(alone.database_url)
    try:
        yield conn
    finally:
        await conn.close()
