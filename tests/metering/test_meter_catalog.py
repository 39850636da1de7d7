"""The meter catalog on PostgreSQL (ADR 0140): versions are history, every change moves the one revision
processes poll, and a tenant's meters are the deploy-time set plus its newest versions not retired."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import pytest

from tally.meters.catalog import Catalog
from tally.meters.definitions import DEFAULT_METERS


async def _version(db: asyncpg.Connection, tenant: str, slug: str, version: int, definition: dict | None) -> int:
    return await db.fetchval(
        "insert into meter_versions (tenant, slug, version, definition) values ($1, $2, $3, $4) returning id",
        tenant, slug, version, None if definition is None else orjson.dumps(definition).decode())


async def test_a_tenant_sees_its_newest_versions_and_not_another_tenants(db: asyncpg.Connection) -> None:
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    catalog = Catalog(DEFAULT_METERS)
    assert await catalog.refresh(db)
    assert not await catalog.refresh(db)  # nothing moved: no reload
    await _version(db, a, "tokens", 1, {"event_type": "llm.call", "aggregation": "SUM", "value_path": "data.tokens"})
    await _version(db, a, "tokens", 2, {"event_type": "llm.*", "aggregation": "SUM", "value_path": "data.tokens"})
    await _version(db, a, "calls", 1, {"event_type": "api.call"})
    await _version(db, a, "calls", 2, None)
    assert await catalog.refresh(db)

    own = {m.slug: m for m in catalog.meters(a).meters if m.slug not in {d.slug for d in DEFAULT_METERS.meters}}
    assert set(own) == {"tokens"}  # calls is retired
    assert own["tokens"].event_type == "llm.*" and own["tokens"].counter == "tokens@2"
    assert [v.version for v in catalog.history(a, "tokens")] == [1, 2]
    assert catalog.latest(a, "calls").retired
    assert [m.slug for m in catalog.meters(b).meters] == [m.slug for m in DEFAULT_METERS.meters]
    assert catalog.latest(b, "tokens") is None


async def test_a_version_is_history(db: asyncpg.Connection) -> None:
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    version_id = await _version(db, tenant, "calls", 1, {"event_type": "api.call"})
    await db.execute("update meter_versions set name = 'API calls', description = 'every call' where id = $1",
                     version_id)  # a name is not what is counted
    with pytest.raises(asyncpg.RaiseError, match="definition is history"):
        await db.execute("update meter_versions set definition = '{\"event_type\": \"*\"}' where id = $1", version_id)
    with pytest.raises(asyncpg.RaiseError, match="retire a meter instead"):
        await db.execute("delete from meter_versions where id = $1", version_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _version(db, tenant, "calls", 1, {"event_type": "*"})
