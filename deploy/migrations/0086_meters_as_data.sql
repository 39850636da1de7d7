-- Meters as data (issue 21, docs/adr/0140): each tenant's meters are rows, versioned. A version fixes what is
-- counted (the definition); a change to it is a new version with counters of its own (`slug@N` from version 2),
-- so no version's counters are ever recounted under another definition. A retirement is a version without a
-- definition. Rows are never updated but for `name` and `description` of a version, and never deleted.
create table meter_versions (
    tenant      text not null,
    id          bigint generated always as identity,  -- global order of creation
    slug        text not null,
    version     integer not null check (version >= 1),
    definition  jsonb,                                  -- the Meter's fields; null: the meter is retired
    name        text not null default '',
    description text not null default '',
    created_at  timestamptz not null default now(),
    primary key (tenant, id),                           -- keyed by tenant, as every new table is (docs/adr/0090)
    unique (tenant, slug, version)
);

-- Where live counting of a version began on each partition of the events topic: the first offset the
-- processor that owned the partition had not yet written when it took the version up. An event below it is
-- the backfill's (it reads `events`), an event at or above it the processor's; the version before stops there.
create table meter_starts (
    tenant          text not null,
    version_id      bigint not null,
    kafka_partition integer not null,
    start_offset    bigint not null check (start_offset >= 0),
    recorded_at     timestamptz not null default now(),
    primary key (tenant, version_id, kafka_partition),
    foreign key (tenant, version_id) references meter_versions (tenant, id)
);

-- A version's backfill: counts every stored event of its tenant below the version's starts, exactly once,
-- its cursor committed with the counters it wrote (resumable after kill -9).
create table meter_backfills (
    tenant          text not null,
    version_id      bigint not null,
    state           text not null default 'waiting' check (state in ('waiting', 'running', 'done')),
    cursor          jsonb,                -- where the next chunk begins (the backfill's keyset position)
    counted         bigint not null default 0,
    total           bigint,               -- events to count, known when it starts running
    backfilled_from timestamptz,          -- the oldest stored event it could count (retention dropped older ones)
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz not null default now(),
    primary key (tenant, version_id),
    foreign key (tenant, version_id) references meter_versions (tenant, id)
);

-- One number every process polls: it moves with every change to meter_versions, so a process reloads the
-- catalog when, and only when, it moved (and a transaction can tell its catalog is stale).
create table meter_catalog (
    only_row boolean primary key default true check (only_row),
    revision bigint not null default 0
);
insert into meter_catalog (only_row, revision) values (true, 0);

create function meter_catalog_moves() returns trigger language plpgsql as $$
begin
    update meter_catalog set revision = revision + 1;
    perform pg_notify('tally_meters', '');
    return null;
end $$;
create trigger meter_versions_move_catalog after insert or update on meter_versions
    for each statement execute function meter_catalog_moves();

create function meter_versions_keep_history() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'meter versions are history: retire a meter instead of deleting it';
    end if;
    if (new.tenant, new.id, new.slug, new.version, new.definition, new.created_at)
       is distinct from (old.tenant, old.id, old.slug, old.version, old.definition, old.created_at) then
        raise exception 'a meter version''s definition is history: change the meter to make a new version';
    end if;
    return new;
end $$;
create trigger meter_versions_history before update or delete on meter_versions
    for each row execute function meter_versions_keep_history();
