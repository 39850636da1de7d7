-- Alert delivery that one tenant cannot turn against others (security review H1-H3, secrets in clear) and a
-- fenced alert lifecycle (billing review M5, M6, L2); docs/adr/0051, 0075-0077.

-- Deliveries: claimed with a lease and committed before the request (no transaction open across a network call);
-- `refused` for a target that may not be used (its reason in last_error). url and secret are sealed
-- (sealed/, rows written before this migration are sealed by `tally alerts` at start) and cleared once the
-- delivery is settled; `endpoint` (scheme and host) is what the API shows; `target_digest` (SHA-256 of kind and
-- URL) tells rows for one target apart without opening them.
alter table alert_deliveries drop constraint alert_deliveries_status_check;
alter table alert_deliveries add constraint alert_deliveries_status_check
    check (status in ('pending', 'sent', 'failed', 'refused'));
alter table alert_deliveries
    alter column url drop not null,
    add column endpoint text,
    add column target_digest bytea,
    add column lease bigint,
    add column lease_until timestamptz;
update alert_deliveries
set endpoint = coalesce(substring(regexp_replace(url, '^([a-z]+://)[^/?#@]*@', '\1') from '^[a-z]+://[^/?#]*'),
                        '(invalid URL)'),
    target_digest = sha256(convert_to(kind || ' ' || url, 'UTF8'));
update alert_deliveries set url = null, secret = null where status <> 'pending';
alter table alert_deliveries alter column endpoint set not null, alter column target_digest set not null;
create sequence alert_delivery_leases;
create index alert_deliveries_in_flight on alert_deliveries (target_digest) where status = 'pending';

-- The targets a firing group fired to (sealed): its resolution goes to the same ones (billing review M6).
alter table alert_states add column targets jsonb;

-- The active evaluator's epoch, raised by each new leader: a commit checks it, so a stale leader's decisions are
-- refused (billing review M5).
create table alert_leader (
    id    integer primary key check (id = 1),
    epoch bigint not null
);
insert into alert_leader values (1, 0);

-- A usage alert per included quantity: after an upgrade, the new plan's thresholds fire again (billing review L2).
alter table usage_alerts drop constraint usage_alerts_tenant_subject_meter_period_label_threshold_key;
alter table usage_alerts add constraint usage_alerts_once
    unique (tenant, subject, meter, period_label, threshold, included);
