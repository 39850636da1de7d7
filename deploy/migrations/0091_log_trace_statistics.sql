-- How often each trace id occurs, for the planner (docs/adr/0161): as for the level in 0036, the partial index
-- events_logs_trace gives it no statistics on data->>'trace_id', so it took one log record in 200 to be of any
-- trace and read a trace page's whole range in time order instead of the trace's few records through the index.
-- Statistics are kept per partition: every partition gets them, the ones made later too, by one function that
-- keeps both the level's and the trace id's (it replaces 0036's tally_keep_level_statistics).
create function tally_keep_level_and_trace_statistics(part text) returns void
language plpgsql as $$
begin
    execute format('create statistics if not exists %I on (data->>''level'') from %I', part || '_log_level', part);
    execute format('create statistics if not exists %I on (data->>''trace_id'') from %I', part || '_log_trace', part);
end $$;

select tally_keep_level_and_trace_statistics(inhrelid::regclass::text) from pg_inherits
where inhparent = 'events'::regclass;
analyze events;  -- sampled, seconds even for large partitions: the planner has the trace ids from now on

create or replace function tally_ensure_event_partition(month_start date) returns boolean
language plpgsql as $$
begin
    if not tally_make_event_partition(month_start) then
        return false;
    end if;
    perform tally_keep_level_and_trace_statistics(
        format('events_y%sm%s', to_char(month_start, 'YYYY'), to_char(month_start, 'MM')));
    return true;
end $$;
drop function tally_keep_level_statistics(text);
