"""The meters the processor counts live: the deploy-time set for every event, and each tenant's versions by the
counting rule of ADR 0140 (docs/adr/0143): version k of a meter counts an event at partition p, offset o iff
`s_k(p) <= o < s_{k+1}(p)`, the starts being recorded in `meter_starts` by the first write transaction that takes
up the version on p.

A tenant's versions are compiled once per catalog revision, at the tenant's first event; events of tenants
without meters of their own cost one set lookup, and none while no tenant has any (the deploy-time MeterSet's
methods are then used as they are).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

import asyncpg

from tally.meters.catalog import Catalog
from tally.meters.definitions import MetersConfig
from tally.meters.meterset import MeterSet, StatefulInput
from tally.schemas.counters import CounterDelta
from tally.sinks.base import Record, StoredEvent

# First writer wins: a start, once recorded, never changes (every member reads back the one recorded).
_RECORD = """
insert into meter_starts (tenant, version_id, kafka_partition, start_offset)
select * from unnest($1::text[], $2::bigint[], $3::int[], $4::bigint[]) order by 1, 2, 3
on conflict do nothing
"""
_READ = """
select s.version_id, s.kafka_partition, s.start_offset
from meter_starts s join unnest($1::text[], $2::bigint[], $3::int[]) as u(tenant, version_id, kafka_partition)
  using (tenant, version_id, kafka_partition)
"""


@dataclass(frozen=True)
class _Version:
    """One version that counts: from its starts up to its successor's (None: it is the newest)."""

    starts: dict[int, int]
    until: dict[int, int] | None
    meters: MeterSet

    def live(self, records: Sequence[Record]) -> list[Record]:
        starts, until = self.starts, self.until
        if until is None:
            return [r for r in records if starts[r.partition] <= r.offset]
        return [r for r in records if starts[r.partition] <= r.offset and (r.partition not in until
                                                                          or r.offset < until[r.partition])]


@dataclass(frozen=True)
class _Tenant:
    checks: MeterSet  # every version that can count: an event none of them can read is a dead letter
    versions: list[_Version]
    built_ins: MeterSet  # the deploy-time meters less those the tenant has its own of (ADR 0153)


class LiveMeters:
    """The processor's meters: `check`, `aggregate` and `stateful_inputs` as MeterSet has them, for every tenant."""

    def __init__(self, built_ins: MetersConfig, poll_s: float = 1.0) -> None:
        self.catalog = Catalog(built_ins)
        self.base = MeterSet(built_ins)
        self.meters = built_ins.meters
        self.window = self.base.window
        self.stale = False  # set when a transaction found the catalog moved: refresh before the next attempt
        self._poll_s = poll_s
        self._next_poll = 0.0
        self._own: frozenset[str] = frozenset()
        self._tenants: dict[str, _Tenant] = {}
        self._starts: dict[int, dict[int, int]] = defaultdict(dict)  # version id -> partition -> start offset
        self._covered: set[int] = set()  # partitions where every version of the catalog has a known start
        self.check = self.base.check

    @property
    def revision(self) -> int:
        return self.catalog.revision

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> bool:
        """Reload the catalog if the poll interval passed (or a transaction found it stale); True if it moved."""
        now = time.monotonic()
        if not self.stale and now < self._next_poll:
            return False
        moved = await self.catalog.refresh(conn)
        self._next_poll = now + self._poll_s
        self.stale = False
        if moved:
            self._own = frozenset(self.catalog.tenants())
            self._tenants = {}
            self._covered = set()
            self.check = self._check if self._own else self.base.check
        return moved

    # -- counting (inside the write transaction) -----------------------------------------------

    def aggregate(self, records: Sequence[Record]) -> list[tuple[str, CounterDelta]]:
        mine = self._by_tenant(records)
        if not mine:
            return self.base.aggregate(records)
        out = self.base.aggregate(self._unshadowed(records))
        shadowed = self.catalog.shadowed()
        for tenant, own in mine.items():
            t = self._tenant(tenant)
            if tenant in shadowed:
                out += t.built_ins.aggregate(own)
            for version in t.versions:
                out += version.meters.aggregate(version.live(own))
        out.sort(key=itemgetter(0))
        return out

    def stateful_inputs(self, records: Sequence[Record]) -> list[StatefulInput]:
        out = self.base.stateful_inputs(self._unshadowed(records)) if self.base.has_stateful else []
        shadowed = self.catalog.shadowed()
        for tenant, own in self._by_tenant(records).items():
            t = self._tenant(tenant)
            if tenant in shadowed and t.built_ins.has_stateful:
                out += t.built_ins.stateful_inputs(own)
            for version in t.versions:
                if version.meters.has_stateful:
                    out += version.meters.stateful_inputs(version.live(own))
        return out

    async def record_starts(self, conn: asyncpg.Connection, new: Sequence[Record]) -> list[int]:
        """Inside a write transaction: the starts of every version on the partitions of `new` that lack one, at the
        first new offset there (everything before it on the partition was written before, or is not new: it is
        not the version's to count live). Returns the partitions whose starts were staged; `unrecord` them if the
        transaction does not commit."""
        if not self._own:
            return []
        first: dict[int, int] = {}
        covered = self._covered
        for r in new:
            p = r.partition
            if p not in covered and (p not in first or r.offset < first[p]):
                first[p] = r.offset
        if not first:
            return []
        missing = [(v.tenant, v.id, p, o) for tenant in self._own for v in self.catalog.versions(tenant)
                   for p, o in first.items() if p not in self._starts[v.id]]
        if missing:
            tenants, ids, partitions, offsets = (list(c) for c in zip(*missing))
            await conn.execute(_RECORD, tenants, ids, partitions, offsets)
            for row in await conn.fetch(_READ, tenants, ids, partitions):
                self._starts[row[0]][row[1]] = row[2]
        covered.update(first)
        return list(first)

    def unrecord(self, partitions: list[int]) -> None:
        """Forget starts staged by a transaction that did not commit (they may not be the ones recorded)."""
        for p in partitions:
            self._covered.discard(p)
            for starts in self._starts.values():
                starts.pop(p, None)

    # -- step 1 ---------------------------------------------------------------------------------

    def _check(self, event: StoredEvent) -> None:
        if event.tenant not in self._own:
            self.base.check(event)
            return
        t = self._tenant(event.tenant)
        t.built_ins.check(event)
        t.checks.check(event)

    # -- the tenants' compiled versions -----------------------------------------------------------

    def _unshadowed(self, records: Sequence[Record]) -> Sequence[Record]:
        """The records the whole deploy-time set counts: all but those of tenants that shadow one of its meters."""
        shadowed = self.catalog.shadowed()
        return [r for r in records if r[0].tenant not in shadowed] if shadowed else records

    def _by_tenant(self, records: Sequence[Record]) -> dict[str, list[Record]]:
        own = self._own
        if not own:
            return {}
        mine: dict[str, list[Record]] = {}
        for r in records:
            tenant = r[0].tenant
            if tenant in own:
                found = mine.get(tenant)
                if found is None:
                    mine[tenant] = [r]
                else:
                    found.append(r)
        return mine

    def _tenant(self, tenant: str) -> _Tenant:
        found = self._tenants.get(tenant)
        if found is None:
            history: dict[str, list] = defaultdict(list)
            for v in self.catalog.versions(tenant):
                history[v.slug].append(v)
            versions, live = [], []
            for slug_versions in history.values():
                for k, v in enumerate(slug_versions):
                    if v.meter is None:
                        continue
                    following = slug_versions[k + 1] if k + 1 < len(slug_versions) else None
                    live.append(v.meter)
                    versions.append(_Version(self._starts[v.id], None if following is None else self._starts[following.id],
                                             MeterSet(MetersConfig(meters=[v.meter]))))
            built_ins = MeterSet(self.catalog.built_ins_for(tenant)) if tenant in self.catalog.shadowed() else self.base
            found = self._tenants[tenant] = _Tenant(MeterSet(MetersConfig(meters=live)), versions, built_ins)
        return found
