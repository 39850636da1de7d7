-- Meters AVG, UNIQUE_COUNT and WEIGHTED_SUM (docs/adr/0030, 0031).

alter table counters drop constraint counters_aggregation_check;
alter table counters add constraint counters_aggregation_check
    check (aggregation in ('COUNT', 'SUM', 'MAX', 'MIN', 'LATEST', 'AVG', 'UNIQUE_COUNT', 'WEIGHTED_SUM'));

-- AVG: the exact sum (value is sum / count). WEIGHTED_SUM: the exact integral in level × seconds, the level
-- at integrated_until and the time up to which the window is integrated. UNIQUE_COUNT: the sampling level,
-- 0 while every distinct value is kept.
alter table counters
    add column total            numeric,
    add column level            numeric,
    add column integrated_until timestamptz,
    add column sample_level     smallint;

-- UNIQUE_COUNT: the distinct values of each counter window, as 63-bit hashes. window_id is the first 16 bytes
-- of sha256 of the counter key (shorter than the key, and computable in SQL for period queries). A window
-- past its meter's max_distinct keeps only the hashes below 2^(63 - sample_level).
create table counter_distinct (
    window_id bytea  not null,
    hash      bigint not null,
    primary key (window_id, hash)
);

-- WEIGHTED_SUM: every level change of a series (tenant, meter, subject, group), so a late or out-of-order
-- level re-integrates exactly the windows it changes. Levels at one instant are ordered by (source, id).
create table weighted_points (
    series text        not null,
    at     timestamptz not null,
    source text        not null,
    id     text        not null,
    level  numeric     not null,
    primary key (series, at, source, id)
);
