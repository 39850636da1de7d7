"""A tenant's meters as the API and `tally meters apply` change them: the rules of ADR 0140 on `meter_versions`.

A change to what is counted is a new version (with its backfill, 'waiting', in the same transaction, so no version
exists without one); a new name or description is written in place; the same meter again changes nothing; a
deletion is a retirement (a version without a definition). One tenant's meter writes take turns (an advisory lock
per tenant), so a version number is never taken twice and the bound on meters cannot be passed by writers at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import orjson

from tally.meters.catalog import meter_of
from tally.meters.definitions import Meter
from tally.meters.rules import Refused

LOCK_CLASS = 5087  # the first key of the two-int advisory lock: one tenant's meters



@dataclass(frozen=True)
class Reader:
    """What reads a tenant's meters (plans, alert rules): `find` names those reading a slug ("plan 'pro'"), `needs`
    is what they need of the meter (a `tally.meters.rules` check)."""

    find: Callable[[asyncpg.Connection, str, str], Awaitable[list[str]]]
    needs: Callable[[Meter], list[dict[str, str]]]


Outcome = Literal["created", "versioned", "renamed", "unchanged"]

_VERSIONS = """
select v.slug, v.version, v.definition::text as definition, v.name, v.description, v.created_at,
       b.state, b.counted, b.total, b.backfilled_from
from meter_versions v left join meter_backfills b on b.tenant = v.tenant and b.version_id = v.id
where v.tenant = $1 and ($2::text is null or v.slug = $2)
order by v.slug, v.version
"""


class QuotaExceeded(Exception):
    """The tenant has as many meters as TALLY_METERS_MAX_PER_TENANT allows (a 409)."""


class NotFound(LookupError):
    pass


class Exists(ValueError):
    """POST of a meter that exists: PUT changes it (a 409)."""


@dataclass(frozen=True)
class Labels:
    """What a meter shows but does not count by: changed in place."""

    name: str = ""
    description: str = ""


def definition(meter: Meter) -> dict[str, Any]:
    """What a version stores: the meter's fields but its slug and version (the row's own columns)."""
    return meter.model_dump(mode="json", exclude={"slug", "version"})


async def _lock(conn: asyncpg.Connection, tenant: str) -> None:
    await conn.execute("select pg_advisory_xact_lock($1, hashtext($2))", LOCK_CLASS, tenant)


async def _latest(conn: asyncpg.Connection, tenant: str, slug: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select id, version, definition::text as definition, name, description from meter_versions"
        " where tenant = $1 and slug = $2 order by version desc limit 1", tenant, slug)


async def _add_version(conn: asyncpg.Connection, tenant: str, slug: str, version: int, meter: Meter | None,
                       labels: Labels) -> None:
    """A version and, for one that counts, its backfill (ADR 0140: created by whoever creates the version)."""
    version_id = await conn.fetchval(
        "insert into meter_versions (tenant, slug, version, definition, name, description)"
        " values ($1, $2, $3, $4::jsonb, $5, $6) returning id", tenant, slug, version,
        None if meter is None else orjson.dumps(definition(meter)).decode(), labels.name, labels.description)
    if meter is not None:
        await conn.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", tenant, version_id)


async def _live(conn: asyncpg.Connection, tenant: str) -> int:
    """How many of the tenant's meters are not retired."""
    return await conn.fetchval(
        "select count(*) from (select distinct on (slug) definition from meter_versions where tenant = $1"
        " order by slug, version desc) newest where definition is not null", tenant)


async def save(conn: asyncpg.Connection, tenant: str, meter: Meter, labels: Labels, max_meters: int,
               readers: tuple[Reader, ...], create_only: bool = False) -> Outcome:
    """Create the meter, or make it this one: a new version when what it counts changed (or it was retired), the
    labels in place when only they changed. A new version must still be what its readers need (Refused naming
    them); `create_only`: a meter that exists (not retired) is Exists."""
    async with conn.transaction():
        await _lock(conn, tenant)
        latest = await _latest(conn, tenant, meter.slug)
        current = None if latest is None or latest["definition"] is None else meter_of(
            meter.slug, latest["version"], orjson.loads(latest["definition"]))
        if current is not None and create_only:
            raise Exists(meter.slug)
        if current is None:
            if await _live(conn, tenant) >= max_meters:
                raise QuotaExceeded(f"this tenant has {max_meters} meters, the most TALLY_METERS_MAX_PER_TENANT "
                                    "allows; retire one first")
            await _add_version(conn, tenant, meter.slug, 1 if latest is None else latest["version"] + 1, meter,
                               labels)
            return "created"
        if definition(current) != definition(meter):
            refused = [{"field": e["field"], "message": f"{e['message']} (used by {name})"}
                       for reader in readers for name in await reader.find(conn, tenant, meter.slug)
                       for e in reader.needs(meter)]
            if refused:
                raise Refused(refused)
            await _add_version(conn, tenant, meter.slug, latest["version"] + 1, meter, labels)
            return "versioned"
        if (latest["name"], latest["description"]) != (labels.name, labels.description):
            await conn.execute("update meter_versions set name = $3, description = $4 where tenant = $1 and id = $2",
                               tenant, latest["id"], labels.name, labels.description)
            return "renamed"
        return "unchanged"


async def retire(conn: asyncpg.Connection, tenant: str, slug: str, readers: tuple[Reader, ...]) -> None:
    """Retire the meter unless something reads it: a Refused naming every plan and alert rule that does."""
    async with conn.transaction():
        await _lock(conn, tenant)
        latest = await _latest(conn, tenant, slug)
        if latest is None or latest["definition"] is None:
            raise NotFound(slug)
        named = [name for reader in readers for name in await reader.find(conn, tenant, slug)]
        if named:
            raise Refused([{"field": "slug", "message": f"meter {slug} is used by {name}; change that first"}
                           for name in named])
        await _add_version(conn, tenant, slug, latest["version"] + 1, None, Labels(latest["name"],
                                                                                   latest["description"]))


def _version(row: asyncpg.Record) -> dict[str, Any]:
    """A version as the API shows it: its definition's fields (none once retired), counter and backfill."""
    shown: dict[str, Any] = {"slug": row["slug"], "name": row["name"], "description": row["description"]}
    if row["definition"] is not None:
        meter = meter_of(row["slug"], row["version"], orjson.loads(row["definition"]))
        shown |= {**definition(meter), "counter": meter.counter}
    backfill = None if row["state"] is None else {
        "state": row["state"], "counted": row["counted"], "total": row["total"],
        "backfilled_from": row["backfilled_from"] and row["backfilled_from"].isoformat()}
    return {**shown, "version": row["version"], "retired": row["definition"] is None,
            "created_at": row["created_at"].isoformat(), "backfill": backfill}


async def shown(conn: asyncpg.Connection | asyncpg.Pool, tenant: str,
                slug: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every version of each of the tenant's meters (or of one), oldest first, by slug."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in await conn.fetch(_VERSIONS, tenant, slug):
        out.setdefault(row["slug"], []).append(_version(row))
    return out
