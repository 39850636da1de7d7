-- Processor storage: counter windows, the counter outbox, late-event flag, monthly event partitions.

-- One row per counter window. `key` is the window's CounterKey text, also its Kafka message key.
-- A new window is a new row: counters are never reset in place.
create table counters (
    key          text primary key,
    tenant       text not null,
    meter        text not null,
    aggregation  text not null check (aggregation in ('COUNT', 'SUM', 'MAX', 'MIN', 'LATEST')),
    window_name  text not null,
    window_start timestamptz not null,
    window_end   timestamptz not null,
    subject      text,
    grp          jsonb not null default '{}',
    value        numeric not null,
    count        bigint not null,
    latest_time  timestamptz not null,
    revision     bigint not null default 1,
    updated_at   timestamptz not null default now()
);
create index counters_tenant_meter_window on counters (tenant, meter, window_name, window_start);

-- Counter windows committed but not yet acknowledged by tally.counters.v1. Written in the same
-- transaction as the counters; a publisher locks rows (skip locked), publishes the counters' current
-- state, waits for the acks and deletes the rows, so a crash at any point leaves them to publish.
create table counter_outbox (
    key       text primary key,
    queued_at timestamptz not null default now()
);

-- False for an event older than the late-event horizon: stored for reconciliation, not counted.
alter table events add column counted boolean not null default true;

-- Monthly partitions of events, created ahead by the processor (see docs/adr/0011). Rows that
-- already sit in the default partition for that month are moved into the new partition.
create function tally_ensure_event_partition(month_start date) returns boolean
language plpgsql as $$
declare
    part text := format('events_y%sm%s', to_char(month_start, 'YYYY'), to_char(month_start, 'MM'));
    lo timestamptz := month_start::timestamp at time zone 'UTC';
    hi timestamptz := (month_start + interval '1 month')::timestamp at time zone 'UTC';
begin
    perform pg_advisory_xact_lock(hashtext('tally_event_partitions'));
    if to_regclass(part) is not null then
        return false;
    end if;
    execute format('create table %I (like events including defaults including constraints)', part);
    execute format('with moved as (delete from events_default where time >= $1 and time < $2 returning *)'
                   ' insert into %I select * from moved', part) using lo, hi;
    execute format('alter table events attach partition %I for values from (%L) to (%L)', part, lo, hi);
    return true;
end $$;

create function tally_ensure_event_partitions(months_back int, months_ahead int) returns int
language plpgsql as $$
declare
    created int := 0;
    this_month date := date_trunc('month', now() at time zone 'UTC')::date;
begin
    for i in -months_back..months_ahead loop
        if tally_ensure_event_partition((this_month + make_interval(months => i))::date) then
            created := created + 1;
        end if;
    end loop;
    return created;
end $$;

select tally_ensure_event_partitions(1, 2);
