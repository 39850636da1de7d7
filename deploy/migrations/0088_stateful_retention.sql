-- Retention of what UNIQUE_COUNT and WEIGHTED_SUM keep beside their windows (docs/adr/0017, tally/sinks/maintenance.py).

-- The id of a counter window in counter_distinct: the first 16 bytes of sha256 of its key (tally/meters/unique.py
-- window_id computes the same in Python). One definition for the period reads and for pruning.
create function tally_window_id(key text) returns bytea
language sql immutable strict parallel safe
as $$ select substring(sha256(convert_to(key, 'UTF8')) from 1 for 16) $$;

-- Pruning level changes oldest first reads this index instead of the whole table. Building it locks writes to the
-- table; on a large one, build it beforehand without blocking them:
--   create index concurrently weighted_points_at on weighted_points (at);
create index if not exists weighted_points_at on weighted_points (at);
