-- Reading logs back (docs/adr/0035): log records stay events of type tally.log; partial indexes serve
-- the read API's filters and keyset order (time, source, id), a full-text index its message words.
-- Built on the partitioned parent, so every monthly partition has them.
create index events_logs_time on events (tenant, time, source, id) where type = 'tally.log';
create index events_logs_service_time on events (tenant, subject, time) where type = 'tally.log';
create index events_logs_level_time on events (tenant, (data->>'level'), time) where type = 'tally.log';
create index events_logs_trace on events (tenant, (data->>'trace_id')) where type = 'tally.log';
create index events_logs_words on events using gin (to_tsvector('simple', data->>'message'))
    where type = 'tally.log';
-- GET /v1/events by subject over a time range (by source, the tenant and time index is filtered).
create index events_tenant_subject_time on events (tenant, subject, time);
