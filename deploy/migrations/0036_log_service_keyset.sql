-- A service's log records in the read API's keyset order (docs/adr/0036): a page of one service, filtered by
-- level, is read newest first and stops at the page's end, instead of sorting the service's whole range.
-- It replaces the (tenant, subject, time) log index of 0035, whose columns it begins with.
create index events_logs_service_keyset on events (tenant, subject, time, source, id) where type = 'tally.log';
drop index events_logs_service_time;

-- How often each level occurs, for the planner: a partial index gives it no statistics on data->>'level', so it
-- took "level warn and above" for 2.5% of any rows and read the level's whole range instead. Statistics are
-- kept per partition: every partition gets them, the ones made later too.
create function tally_keep_level_statistics(part text) returns void
language plpgsql as $$
begin
    execute format('create statistics %I on (data->>''level'') from %I', part || '_log_level', part);
end $$;

select tally_keep_level_statistics(inhrelid::regclass::text) from pg_inherits where inhparent = 'events'::regclass;
analyze events;  -- sampled, seconds even for large partitions: the planner has the levels from now on

alter function tally_ensure_event_partition(date) rename to tally_make_event_partition;
create function tally_ensure_event_partition(month_start date) returns boolean
language plpgsql as $$
begin
    if not tally_make_event_partition(month_start) then
        return false;
    end if;
    perform tally_keep_level_statistics(format('events_y%sm%s', to_char(month_start, 'YYYY'), to_char(month_start, 'MM')));
    return true;
end $$;
