-- Every tenant-owned table keyed by its tenant (docs/adr/0157, the re-keying planned in docs/adr/0090), so each
-- can be distributed by tenant. Columns added to existing tables are filled from the row they belong to. The
-- previous release's processors, jobs worker and alert evaluator must be stopped first: their statements no longer
-- match. On a large `counters` table, build its new key beforehand without blocking reads or writes:
--   create unique index concurrently counters_tenant_key on counters (tenant, key);
-- this migration then only swaps the constraint onto it.

-- Counter windows: (key) -> (tenant, key), on the index built beforehand if it is there and valid (a concurrent
-- build that failed leaves an invalid one, built again here).
do $$
begin
    if not exists (select 1 from pg_index where indexrelid = to_regclass('counters_tenant_key') and indisvalid) then
        drop index if exists counters_tenant_key;
        create unique index counters_tenant_key on counters (tenant, key);
    end if;
end $$;
alter table counters drop constraint counters_pkey,
    add constraint counters_pkey primary key using index counters_tenant_key;

-- The outbox: the tenant is the first element of the counter key (tally/schemas/counters.py CounterKey.to_text).
alter table counter_outbox add column tenant text;
update counter_outbox set tenant = key::jsonb ->> 0;
alter table counter_outbox alter column tenant set not null,
    drop constraint counter_outbox_pkey, add primary key (tenant, key);

-- Distinct values: the tenant of the window whose id they carry (the first 16 bytes of sha256 of its key). Hashes
-- whose window is gone (pruned by retention) can no longer be read; they are dropped rather than kept unowned.
alter table counter_distinct add column tenant text;
update counter_distinct d set tenant = c.tenant
from counters c
where c.aggregation = 'UNIQUE_COUNT' and d.window_id = substring(sha256(convert_to(c.key, 'UTF8')) from 1 for 16);
delete from counter_distinct where tenant is null;
alter table counter_distinct alter column tenant set not null,
    drop constraint counter_distinct_pkey, add primary key (tenant, window_id, hash);

-- Level changes: the tenant is the first element of the series (tally/meters/weighted.py series_text).
alter table weighted_points add column tenant text;
update weighted_points set tenant = series::jsonb ->> 0;
alter table weighted_points alter column tenant set not null,
    drop constraint weighted_points_pkey, add primary key (tenant, series, at, source, id);

-- Stripe reports and drift: (id) -> (tenant, id); an identifier is unique within its tenant (it is derived from
-- the tenant, billing/stripe_report.py identifier, and each tenant reports to its own Stripe account).
alter table stripe_reports drop constraint stripe_reports_pkey, add primary key (tenant, id),
    drop constraint stripe_reports_identifier_key,
    add constraint stripe_reports_identifier_key unique (tenant, identifier);
alter table drift_reports drop constraint drift_reports_pkey, add primary key (tenant, id);

-- Alert transitions: (id) -> (tenant, id); what references them follows with the tenant.
alter table alert_deliveries drop constraint alert_deliveries_transition_id_fkey;
alter table usage_alerts drop constraint usage_alerts_fired_transition_fkey,
    drop constraint usage_alerts_resolved_transition_fkey;
alter table alert_transitions drop constraint alert_transitions_pkey, add primary key (tenant, id);
alter table usage_alerts drop constraint usage_alerts_pkey, add primary key (tenant, id),
    add foreign key (tenant, fired_transition) references alert_transitions (tenant, id),
    add foreign key (tenant, resolved_transition) references alert_transitions (tenant, id);

-- Deliveries: the tenant of their transition.
alter table alert_deliveries add column tenant text;
update alert_deliveries d set tenant = t.tenant from alert_transitions t where t.id = d.transition_id;
alter table alert_deliveries alter column tenant set not null,
    drop constraint alert_deliveries_pkey, add primary key (tenant, transition_id, target),
    add foreign key (tenant, transition_id) references alert_transitions (tenant, id) on delete cascade;
