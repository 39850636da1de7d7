-- Each kept event's content digest and where it was read, beside its dedup key, so that a later copy
-- with the same (tenant, source, id) and other content is reported as a conflict naming both copies
-- (docs/adr/0014). Keys kept before this migration have none; their repeats count as duplicates.
alter table event_keys
    add column digest          bytea,
    add column kafka_partition integer,
    add column kafka_offset    bigint;
