-- The full-text index of log messages, scoped by tenant (security review H4, docs/adr/0081): with the
-- tenant as the GIN index's first column (btree_gin), a rare-word search fetches the matches of its own
-- tenant only, not every tenant's matches in the partition.
create extension if not exists btree_gin;
create index events_logs_tenant_words on events using gin (tenant, to_tsvector('simple', data->>'message'))
    where type = 'tally.log';
drop index events_logs_words;
