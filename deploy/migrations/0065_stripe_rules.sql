-- Stripe's documented rules held in the report rows (docs/adr/0065, 0066), and each tenant's own Stripe
-- account (security review H6).

-- The connected account (`acct_...`) a tenant's reports go to, sent as the Stripe-Account header. Set by
-- the platform operator only (`tally billing account set`); a tenant without one is not reported.
create table billing_accounts (
    tenant         text primary key,
    stripe_account text not null check (stripe_account ~ '^acct_[A-Za-z0-9]{1,64}$'),
    updated_at     timestamptz not null default now()
);

-- Statuses: pending and deferred are still to be sent; sent was accepted; failed was refused (4xx) and
-- counts as nothing billed until retried (`tally billing retry`), which marks it superseded; held may
-- have reached Stripe but can no longer be re-sent safely (past Stripe's 24 h identifier window, or
-- stamped in an invoice Stripe has finalised) and waits for `tally billing resolve`; cancelling and
-- cancelled are a sent row being and having been taken back through a meter event adjustment;
-- applied is a carry row, never sent: what a finished period moves to the next one (a fractional
-- remainder, or an over-report as a credit).
alter table stripe_reports drop constraint stripe_reports_status_check;
alter table stripe_reports add constraint stripe_reports_status_check check (status in (
    'pending', 'sent', 'deferred', 'failed', 'superseded', 'held', 'cancelling', 'cancelled', 'applied'));
alter table stripe_reports drop constraint stripe_reports_kind_check;
alter table stripe_reports add constraint stripe_reports_kind_check check (kind in ('usage', 'adjustment', 'carry'));
-- Stripe takes whole numbers (docs/adr/0065): rows sent are positive integers; carry rows hold any sign
-- and fraction. Rows written before this rule are left as they were.
alter table stripe_reports drop constraint stripe_reports_value_check;
alter table stripe_reports add constraint stripe_reports_value_check
    check (kind = 'carry' or (value > 0 and value = trunc(value))) not valid;
alter table stripe_reports
    add column stripe_account text,          -- the tenant's account at write time; null: written before H6
    add column first_sent_at  timestamptz,   -- set (and committed) before the first send: it may have arrived
    add column carried_from   date;          -- carry rows: the other period of the pair
create index stripe_reports_attention on stripe_reports (tenant, status) where status in ('failed', 'held');
