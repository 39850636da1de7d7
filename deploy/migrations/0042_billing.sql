-- Billing (billing/): Stripe usage reports, closed periods, reconciliation drift.

-- One row per meter event sent (or to be sent) to Stripe, written before sending. `value` is the
-- billable quantity (overage or usage, per plan) added since the period's earlier rows, so the rows
-- of a period sum to what was billed; `identifier` never changes, so a re-send can never carry another
-- value (docs/adr/0044).
create table stripe_reports (
    id                 bigserial primary key,
    identifier         text not null unique,
    tenant             text not null,
    subject            text not null,
    meter              text not null,
    period_label       date not null,
    period_end         timestamptz not null,
    seq                integer not null,
    kind               text not null check (kind in ('usage', 'adjustment')),
    event_name         text not null,
    stripe_customer_id text not null,
    value              numeric not null check (value > 0),
    event_time         timestamptz not null,
    status             text not null default 'pending' check (status in ('pending', 'sent', 'deferred', 'failed')),
    attempts           integer not null default 0,
    error              text,
    created_at         timestamptz not null default now(),
    sent_at            timestamptz,
    unique (tenant, subject, meter, period_label, seq)
);
create index stripe_reports_unsent on stripe_reports (status) where status <> 'sent';

-- A closed period's usage, frozen per meter once its end plus the grace passed (docs/adr/0043).
create table period_usage (
    tenant       text not null,
    subject      text not null,
    meter        text not null,
    period_label date not null,
    period_start timestamptz not null,
    period_end   timestamptz not null,
    plan_id      text not null,
    used         numeric not null,
    included     numeric not null,
    overage      numeric not null,
    closed_at    timestamptz not null default now(),
    primary key (tenant, subject, meter, period_label)
);

-- What reconciliation found: a counter window whose stored, cached or published value differs from
-- the value recomputed from the raw events (key: the counter key), or a period whose Stripe rows do not
-- sum to its billable quantity (key: tenant/subject/meter/period); and whether --fix repaired it.
create table drift_reports (
    id           bigserial primary key,
    run_at       timestamptz not null default now(),
    key          text not null,
    tenant       text not null,
    meter        text not null,
    place        text not null check (place in ('counters', 'redis', 'topic', 'stripe')),
    expected     numeric,
    found        numeric,
    fixed        boolean not null default false
);
create index drift_reports_run on drift_reports (run_at);
