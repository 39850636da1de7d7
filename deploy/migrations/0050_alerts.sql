-- Alert rules and their lifecycle (alerts/, docs/adr/0050).

-- A tenant's rules: the validated definition (tally/schemas/alerts.py AlertRule) as JSON. `origin` says whether the
-- API or a rules file owns the rule: applying a file replaces only the rules it owns.
create table alert_rules (
    tenant      text not null,
    id          text not null,
    definition  jsonb not null,
    origin      text not null default 'api' check (origin in ('api', 'file')),
    version     integer not null default 1,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (tenant, id)
);

-- Where each rule and group stands. Only the evaluator that holds the alerts lock writes here, in the same
-- transaction as the transitions it decides, so a restart resumes from the last committed decision.
create table alert_states (
    tenant        text not null,
    rule_id       text not null,
    group_key     text not null,                 -- canonical JSON of the group's values; '{}' without group_by
    grp           jsonb not null,
    status        text not null check (status in ('pending', 'firing')),
    pending_since timestamptz not null,          -- when the breach began
    fired_at      timestamptz,                   -- firing: when it fired
    updated_at    timestamptz not null default now(),
    primary key (tenant, rule_id, group_key)
);

-- When each rule and group last resolved: the cooldown counts from here (a row survives the state's deletion).
create table alert_cooldowns (
    tenant      text not null,
    rule_id     text not null,
    group_key   text not null,
    resolved_at timestamptz not null,
    primary key (tenant, rule_id, group_key)
);

-- Every transition, once: the history GET /v1/alerts lists and the outbox to tally.alerts.v1
-- (published_at is set after the broker acked; a crash in between re-publishes the same id).
create table alert_transitions (
    id           bigserial primary key,
    tenant       text not null,
    rule_id      text not null,
    rule_name    text not null,
    group_key    text not null,
    grp          jsonb not null,
    kind         text not null check (kind in ('firing', 'resolved')),
    value        numeric,                        -- the measure when decided; null when the window held no data
    threshold    numeric not null,
    comparison   text not null,
    window_s     integer not null,
    at           timestamptz not null default now(),
    fired_at     timestamptz not null,           -- when the incident began firing (= at for a firing)
    detail       jsonb not null default '{}',    -- kind-specific facts, e.g. a usage alert's period and meter
    published_at timestamptz
);
create index alert_transitions_unpublished on alert_transitions (id) where published_at is null;
create index alert_transitions_by_tenant on alert_transitions (tenant, id desc);

-- The delivery log: one row per transition and notification target, written with the transition. The target
-- is copied, so a rule edited or deleted later still delivers what it decided.
create table alert_deliveries (
    transition_id    bigint not null references alert_transitions (id) on delete cascade,
    target           integer not null,           -- position in the rule's targets
    kind             text not null check (kind in ('slack', 'webhook')),
    url              text not null,
    secret           text,                       -- webhook: the Standard Webhooks signing secret (whsec_...)
    status           text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_status      integer,                    -- the receiver's last HTTP status, if it answered
    last_error       text,
    sent_at          timestamptz,
    primary key (transition_id, target)
);
create index alert_deliveries_due on alert_deliveries (next_attempt_at) where status = 'pending';
