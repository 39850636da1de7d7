-- Core storage: API keys, dedup claims and events.

create table api_keys (
    id          text primary key,               -- the key's public prefix, shown in listings
    tenant      text not null,
    name        text not null default '',
    key_hash    bytea not null unique,          -- sha256 of the secret; the secret itself is never stored
    scopes      text[] not null default '{}',
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);
create index api_keys_tenant on api_keys (tenant);

-- One row per accepted event, ever. Not partitioned, so (tenant, source, id) can be unique:
-- a partitioned table cannot hold a unique constraint without its partition key.
create table event_keys (
    tenant      text not null,
    source      text not null,
    id          text not null,
    first_seen  timestamptz not null default now(),
    primary key (tenant, source, id)
);

create table events (
    tenant          text not null,
    source          text not null,
    id              text not null,
    type            text not null,
    subject         text,
    time            timestamptz not null,
    received_at     timestamptz not null,
    persisted_at    timestamptz not null default now(),
    data            jsonb,
    kafka_partition integer not null,
    kafka_offset    bigint not null
) partition by range (time);
create table events_default partition of events default;
create index events_tenant_time on events (tenant, time);
create index events_tenant_type_time on events (tenant, type, time);
