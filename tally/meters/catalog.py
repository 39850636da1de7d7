"""Every tenant's meters: the deploy-time set, which every tenant has, and each tenant's own versions from
PostgreSQL (`meter_versions`), reloaded when `meter_catalog.revision` moves (ADR 0140).

A process keeps one Catalog, refreshes it every second or so (a one-row read), and asks it for a tenant's
meters where it used to take the one global set.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from tally.meters.definitions import DEFAULT_METERS, Meter, MetersConfig

log = logging.getLogger("tally.meters")

# What a version row holds besides its definition: the columns `Catalog.refresh` reads.
_VERSIONS = """
select tenant, id, slug, version, definition, name, description, created_at
from meter_versions order by id
"""
# Each version's backfill state; a backfill that finishes moves the revision, so a refresh sees it (ADR 0140).
_BACKFILLS = "select tenant, version_id, state from meter_backfills"
# The shadowing clashes this process has logged, per tenant (ADR 0153): each is logged when first seen and again
# only when it changes, not at every refresh of every catalog the process holds (the processor's, the jobs', each
# reconcile's).
_clashes_told: dict[str, frozenset[str]] = {}


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
        self._backfills: dict[tuple[str, int], str] = {}
        self._readable: dict[str, tuple[MetersConfig, frozenset[str]]] = {}
        self._shadowed: dict[str, frozenset[str]] = {}
        self._built_ins_for: dict[str, MetersConfig] = {}

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
        self._backfills = {(r["tenant"], r["version_id"]): r["state"] for r in await conn.fetch(_BACKFILLS)}
        self._versions = dict(versions)
        self._meters = {}
        self._readable = {}
        deployed = {m.slug for m in self.built_ins.meters}
        self._shadowed = {t: frozenset(found) for t, vs in versions.items() if (found := deployed & {v.slug for v in vs})}
        self._built_ins_for = {}
        for tenant, slugs in sorted(self._shadowed.items()):
            if _clashes_told.get(tenant) != slugs:
                _clashes_told[tenant] = slugs
                log.warning("tenant %s defined its own %s before the deploy did: its own stays its meter (ADR 0153)",
                            tenant, ", ".join(sorted(slugs)))
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

    def shadowed(self) -> dict[str, frozenset[str]]:
        """tenant -> the deploy-time slugs it defined a meter of before the deploy did (ADR 0153)."""
        return self._shadowed

    def built_ins_for(self, tenant: str) -> MetersConfig:
        """The deploy-time meters that count for the tenant: all but those of a slug it has a meter of itself."""
        slugs = self._shadowed.get(tenant)
        if slugs is None:
            return self.built_ins
        found = self._built_ins_for.get(tenant)
        if found is None:
            found = self._built_ins_for[tenant] = MetersConfig(
                meters=[m for m in self.built_ins.meters if m.slug not in slugs])
        return found

    def tenants(self) -> set[str]:
        """The tenants with meters of their own."""
        return set(self._versions)

    def versions(self, tenant: str) -> list[MeterVersion]:
        """Every version of every meter of the tenant, oldest first."""
        return self._versions.get(tenant, [])

    def version(self, tenant: str, version_id: int) -> MeterVersion | None:
        """The tenant's version with this id; None if it is not the tenant's (or newer than this catalog)."""
        return next((v for v in self.versions(tenant) if v.id == version_id), None)

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
            found = self._meters[tenant] = MetersConfig(meters=[*self.built_ins_for(tenant).meters, *own])
        return found

    def backfill(self, tenant: str, version_id: int) -> str | None:
        """The version's backfill state (waiting, running, done); None when it has no backfill row."""
        return self._backfills.get((tenant, version_id))

    def readable(self, tenant: str) -> MetersConfig:
        """The meters reads use: the deploy-time ones and, per tenant meter not retired, the newest version
        since its last retirement whose backfill is done; if none is done yet, its newest version, whose
        counters are then incomplete (`backfilling`)."""
        return self._read_set(tenant)[0]

    def backfilling(self, tenant: str) -> frozenset[str]:
        """Slugs of the tenant's meters read from a version whose backfill is not done: their figures are partial."""
        return self._read_set(tenant)[1]

    def counters(self, tenant: str, slugs: Iterable[str]) -> dict[str, str]:
        """slug -> the counter name its windows are read under (`Meter.counter` of the readable version); a slug
        the tenant does not have keeps its own name, as deploy-time meters do."""
        named = {m.slug: m.counter for m in self.readable(tenant).meters}
        return {slug: named.get(slug, slug) for slug in slugs}

    def _read_set(self, tenant: str) -> tuple[MetersConfig, frozenset[str]]:
        found = self._readable.get(tenant)
        if found is None:
            alive: dict[str, list[MeterVersion]] = {}
            for v in self.versions(tenant):
                alive[v.slug] = [] if v.retired else [*alive.get(v.slug, []), v]
            own, partial = [], set()
            for slug, since in alive.items():
                if not since:
                    continue
                done = [v for v in since if self.backfill(tenant, v.id) == "done"]
                if not done:
                    partial.add(slug)
                own.append((done or since)[-1].meter)
            found = self._readable[tenant] = (MetersConfig(meters=[*self.built_ins_for(tenant).meters, *own]),
                                              frozenset(partial))
        return found
