-- Usage alerts (tally/usage/alerts.py): one row per subject, meter, period and threshold crossed, ever, so an
-- alert fires once however often usage is re-read (docs/adr/0045). Delivery state beside it: published
-- to tally.alerts.v1, read in the app, sent to Slack.
create table usage_alerts (
    id            bigserial primary key,
    tenant        text not null,
    subject       text not null,
    meter         text not null,
    period_label  date not null,
    period_end    timestamptz not null,
    threshold     integer not null,
    used          numeric not null,
    included      numeric not null,
    created_at    timestamptz not null default now(),
    read_at       timestamptz,
    published_at  timestamptz,
    slack_status  text not null default 'none' check (slack_status in ('none', 'pending', 'sent', 'failed')),
    slack_attempts integer not null default 0,
    slack_error   text,
    unique (tenant, subject, meter, period_label, threshold)
);
create index usage_alerts_undelivered on usage_alerts (id) where published_at is null or slack_status = 'pending';

-- Per-tenant settings of the usage product: where its Slack alerts go.
create table usage_settings (
    tenant            text primary key,
    slack_webhook_url text,
    updated_at        timestamptz not null default now()
);
