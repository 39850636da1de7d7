"""Every tenant's meters: the deploy-time set, which every tenant has, and each tenant's own versions from
PostgreSQL (`meter_versions`), reloaded when `meter_catalog.revision` moves (ADR 0140).

A process keeps one Catalog, refreshes it every second or so (a one-row read), and asks it for a tenant's
meters where it used to take the one global set.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from tally.meters.definitions import DEFAULT_METERS, Meter, MetersConfig

# What a version row holds besides its definition: the columns `Catalog.refresh` reads.
_VERSIONS = """
select tenant, id, slug, version, definition, name, description, created_at
from meter_versions order by id
"""


@dataclass(frozen=True)
class MeterVersion:
    """One version of a tenant's meter; `meter` is None for the version that retired it."""

    tenant: str
    id: int
    slug: str
    version: int
    meter: Meter | None
    name: str
    description: str
    created_at: datetime

    @property
    def retired(self) -> bool:
        return self.meter is None


def meter_of(slug: str, version: int, definition: dict) -> Meter:
    """A stored definition as the Meter it was validated as when the version was made."""
    return Meter.model_validate({**definition, "slug": slug, "version": version})


class Catalog:
    """`revision` is the `meter_catalog.revision` the versions were read at; -1 before the first refresh."""

    def __init__(self, built_ins: MetersConfig) -> None:
        self.built_ins = built_ins
        self.revision = -1
        self._versions: dict[str, list[MeterVersion]] = {}
        self._meters: dict[str, MetersConfig] = {}

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> bool:
        """Reload if the catalog moved since the last refresh; True when it did."""
        revision = await conn.fetchval("select revision from meter_catalog")
        if revision == self.revision:
            return False
        rows = await conn.fetch(_VERSIONS)
        versions: dict[str, list[MeterVersion]] = defaultdict(list)
        for r in rows:
            definition = r["definition"]
            meter = None if definition is None else meter_of(r["slug"], r["version"], orjson.loads(definition))
            versions[r["tenant"]].append(MeterVersion(r["tenant"], r["id"], r["slug"], r["version"], meter, r["name"],
                                                      r["description"], r["created_at"]))
        self._versions = dict(versions)
        self._meters = {}
        # Rows read after the revision: at worst newer than it, and the next refresh reads them again.
        self.revision = revision
        return True

    async def fresh(self, conn: asyncpg.Connection | asyncpg.Pool, tenant: str) -> MetersConfig:
        """The tenant's meters as of now: for a check that must see the change just made (a plan or alert rule
        naming a meter created a moment ago)."""
        await self.refresh(conn)
        return self.meters(tenant)

    def built_in(self, slug: str) -> bool:
        """A deploy-time meter (configured, or one of the defaults `events`, `logs`, `event_types`, which a
        configuration may leave out): no tenant may define one of that slug."""
        return any(m.slug == slug for m in (*self.built_ins.meters, *DEFAULT_METERS.meters))

    def tenants(self) -> set[str]:
        """The tenants with meters of their own."""
        return set(self._versions)

    def versions(self, tenant: str) -> list[MeterVersion]:
        """Every version of every meter of the tenant, oldest first."""
        return self._versions.get(tenant, [])

    def history(self, tenant: str, slug: str) -> list[MeterVersion]:
        return [v for v in self.versions(tenant) if v.slug == slug]

    def latest(self, tenant: str, slug: str) -> MeterVersion | None:
        """The meter's newest version (perhaps its retirement); None if the tenant never defined it."""
        found = self.history(tenant, slug)
        return found[-1] if found else None

    def meters(self, tenant: str) -> MetersConfig:
        """The deploy-time meters and the newest version of each of the tenant's meters not retired."""
        found = self._meters.get(tenant)
        if found is None:
            newest: dict[str, MeterVersion] = {}
            for v in self.versions(tenant):
                newest[v.slug] = v
            own = [v.meter for v in newest.values() if v.meter is not None]
            found = self._meters[tenant] = MetersConfig(meters=[*self.built_ins.meters, *own])
        return found
