"""Fixtures: each test session gets its own database, topic prefix and Redis key prefix on the real
services (found through TALLY_* settings), and removes them afterwards."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from confluent_kafka.admin import AdminClient

from tally.sinks.migrations import migrate
from tally.settings import Settings
from tally.topics import create_topics

# The scratch broker's fixture, for the tests that stop Kafka (a fixture module, not a copy in each test file).
pytest_plugins = ["tests.scratch_kafka"]

START_HINT = "start the services first: bash deploy/local/services.sh (or run the suite with bash deploy/local/test.sh)"


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    settings = Settings()
    checks = {
        "Kafka": settings.kafka_bootstrap.split(",")[0].rsplit(":", 1),
        "PostgreSQL": [urlsplit(settings.database_url).hostname, urlsplit(settings.database_url).port or 5432],
        "Redis": [urlsplit(settings.redis_url).hostname, urlsplit(settings.redis_url).port or 6379],
    }
    down = [name for name, (host, port) in checks.items() if not _reachable(host, int(port))]
    if down:
        pytest.exit(f"{', '.join(down)} not reachable; {START_HINT}", returncode=3)
    return settings


@pytest.fixture(scope="session")
def settings(base_settings: Settings) -> Iterator[Settings]:
    run = uuid.uuid4().hex[:10]
    db_name = f"tally_test_{run}"
    test_settings = base_settings.model_copy(update={
        "database_url": _with_database(base_settings.database_url, db_name),
        "topic_prefix": f"test.{run}.",
        "redis_prefix": f"test:{run}:",
        "consumer_group": f"test-{run}-processor",
    })

    async def create() -> None:
        conn = await asyncpg.connect(base_settings.database_url)
        try:
            await conn.execute(f'create database "{db_name}"')
        finally:
            await conn.close()
        await migrate(test_settings.database_url, test_settings.migrations_dir)

    asyncio.run(create())
    create_topics(test_settings)
    yield test_settings

    async def drop() -> None:
        conn = await asyncpg.connect(base_settings.database_url)
        try:
            await conn.execute(f'drop database if exists "{db_name}" with (force)')
        finally:
            await conn.close()

    asyncio.run(drop())
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(test_settings.topic_prefix)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            future.result()
    client = redis.Redis.from_url(base_settings.redis_url)
    keys = list(client.scan_iter(f"{test_settings.redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def isolated(settings: Settings) -> Iterator[Settings]:
    """The session's database with topics and a consumer group of this test's own."""
    run = uuid.uuid4().hex[:8]
    own = settings.model_copy(update={
        "topic_prefix": f"{settings.topic_prefix}{run}.",
        "consumer_group": f"{settings.consumer_group}-{run}",
    })
    create_topics(own)
    yield own


# --- Skips (issue 19). The test command installs every real component the tests need (deploy/local/test.sh), so
# a test skipped for anything the project can install or fix is a failure. These are the only reasons a test may
# skip for, at the start of its message: causes outside the project, which no script of ours can cure.
SKIP_REASONS_OUTSIDE_THE_PROJECT = (
    "outside the project: not a Debian system",  # no apt-get: Debian's packages (chromium, ...) cannot be installed
    "outside the project: no network to",  # a package registry cannot be reached from this machine
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(SKIP_REASONS_OUTSIDE_THE_PROJECT):
        report.outcome = "failed"
        report.longrepr = (f"skipped for a reason the project can cure: {reason!r}; install what the test needs in "
                           f"deploy/local/test.sh, or skip only for one of {SKIP_REASONS_OUTSIDE_THE_PROJECT}")
