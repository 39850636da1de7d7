"""Every table can be distributed by tenant (docs/adr/0090): its primary key and unique constraints and
indexes include `tenant`, or the table is declared shared below with its reason, against the migrated database
(the tables once keyed without it were re-keyed by migration 0087, docs/adr/0157).

Citus refuses a distributed table whose primary key or unique constraint leaves out the distribution
column, so a table keyed without it and not declared shared is one that would need a redesign to move past
one node."""

from __future__ import annotations

import asyncio

import asyncpg

from tally.settings import Settings

# Tables not owned by one tenant: Citus reference tables or coordinator-local ones (ADR 0090).
SHARED = {
    "schema_migrations": "migration bookkeeping of the whole database",
    "api_keys": "looked up by key hash before the tenant is known (the tenant comes from the key)",
    "job_runs": "the jobs worker's runs, each over every tenant (hard limits, Stripe reports, close, reconcile)",
    "alert_leader": "one row: the epoch of the alert evaluator, which evaluates every tenant's rules",
    "meter_catalog": "one row: the revision of every tenant's meters, which every process polls (ADR 0140)",
}

UNIQUE_KEYS = """
select r.relname as table_name, x.relname as index_name,
       array(select a.attname from unnest(i.indkey) as k(attnum)
             join pg_attribute a on a.attrelid = r.oid and a.attnum = k.attnum) as columns
from pg_class r
join pg_namespace n on n.oid = r.relnamespace
left join pg_index i on i.indrelid = r.oid and i.indisunique
left join pg_class x on x.oid = i.indexrelid
where n.nspname = current_schema() and r.relkind in ('r', 'p') and not r.relispartition
"""


def _keys(settings: Settings) -> dict[str, dict[str, list[str]]]:
    """table -> unique index (primary keys and unique constraints are backed by one) -> its columns."""
    async def read() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await conn.fetch(UNIQUE_KEYS)
        finally:
            await conn.close()

    tables: dict[str, dict[str, list[str]]] = {}
    for row in asyncio.run(read()):
        keys = tables.setdefault(row["table_name"], {})
        if row["index_name"]:
            keys[row["index_name"]] = list(row["columns"])
    return tables


def test_every_unique_key_includes_the_tenant_or_the_table_is_declared(settings: Settings) -> None:
    tables = _keys(settings)
    assert {"events", "event_keys", "counters", "api_keys", "plans", "alert_rules"} <= set(tables)
    keyed_without_tenant = {table for table, keys in tables.items()
                            if any("tenant" not in columns for columns in keys.values())}
    assert keyed_without_tenant - set(SHARED) == set(), "a table keyed without tenant"


def test_the_raw_events_can_be_distributed_by_tenant(settings: Settings) -> None:
    """The largest tables, the events and their dedup keys, are tenant-keyed already."""
    tables = _keys(settings)
    assert tables["event_keys"] == {"event_keys_pkey": ["tenant", "source", "id"]}
    assert all("tenant" in columns for columns in tables["events"].values())
