-- Every run of a billing job (tally/billing/jobs.py): which job, for which period or day (`run_key`), how it
-- ended and its figures. Two workers never run one job for one key at once (an advisory lock on
-- hashtext(job:key)); a key with a run that ended 'ok' is not run again by the worker.
create table job_runs (
    id          bigserial primary key,
    job         text not null,
    run_key     text not null,
    status      text not null check (status in ('running', 'ok', 'failed')),
    started_at  timestamptz not null default now(),
    finished_at timestamptz,
    figures     jsonb not null default '{}',
    error       text
);
create index job_runs_job_key on job_runs (job, run_key, status);
