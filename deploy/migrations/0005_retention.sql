-- Retention (docs/adr/0017): event keys pruned by age, counter windows by window size, and a partition
-- for every month that holds events so that nothing stays in the default partition.

-- Pruning event keys by age reads this index instead of the whole table.
create index event_keys_first_seen on event_keys (first_seen);

-- Pruning counter windows of one size that ended before a moment.
create index counters_window_end on counters (window_name, window_end);

-- A partition for every month that has rows in the default partition (backfills, late events, times
-- far ahead); each moves its rows out of the default partition (tally_ensure_event_partition).
create function tally_partition_default_months() returns int
language plpgsql as $$
declare
    created int := 0;
    month date;
begin
    for month in select distinct date_trunc('month', time at time zone 'UTC')::date from events_default order by 1 loop
        if tally_ensure_event_partition(month) then
            created := created + 1;
        end if;
    end loop;
    return created;
end $$;
