-- Why a meter version's backfill still waits (docs/adr/0145): a partition of the events topic without a start for
-- the version, or the processors' group not yet committed past a start. `tally meters status` shows it; null once
-- the backfill runs.
alter table meter_backfills add column waiting_for text;
