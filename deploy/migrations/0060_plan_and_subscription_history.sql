-- Plans and subscriptions as history (docs/adr/0060). `plans`/`plan_meters` and `subscriptions` stay the
-- current state; every version is kept here and never updated or deleted, so a period's terms can be
-- recomputed after the fact and an edit never reaches back into a period that is over.

-- Every version of a plan: the first holds from the beginning, each edit from the moment it was made.
create table plan_versions (
    tenant       text not null,
    plan_id      text not null,
    version      integer not null check (version >= 1),
    name         text not null,
    report       text not null check (report in ('overage', 'usage')),
    meters       jsonb not null,  -- the plan's meters as the API shows them (decimals as strings)
    effective_at timestamptz not null,
    recorded_at  timestamptz not null default now(),
    primary key (tenant, plan_id, version),
    foreign key (tenant, plan_id) references plans (tenant, id)
);

alter table plans add column version integer not null default 1;

insert into plan_versions (tenant, plan_id, version, name, report, meters, effective_at, recorded_at)
select p.tenant, p.id, 1, p.name, p.report,
       coalesce((select jsonb_agg(jsonb_build_object(
                    'meter', m.meter, 'included', m.included::text, 'limit_mode', m.limit_mode,
                    'overage_price', m.overage_price::text, 'thresholds', to_jsonb(m.thresholds),
                    'stripe_event', m.stripe_event) order by m.meter)
                 from plan_meters m where m.tenant = p.tenant and m.plan_id = p.id), '[]'::jsonb),
       '-infinity', p.updated_at
from plans p;

-- `subscription_plans` becomes the subscription's versions: a row for every change of plan or Stripe
-- customer, numbered, with the customer it named.
alter table subscription_plans add column version integer;
alter table subscription_plans add column stripe_customer_id text;
alter table subscription_plans add column recorded_at timestamptz not null default now();

update subscription_plans sp set version = n.version, stripe_customer_id = s.stripe_customer_id
from (select tenant, subject, effective_at,
             row_number() over (partition by tenant, subject order by effective_at) as version
      from subscription_plans) n, subscriptions s
where n.tenant = sp.tenant and n.subject = sp.subject and n.effective_at = sp.effective_at
  and s.tenant = sp.tenant and s.subject = sp.subject;

alter table subscription_plans alter column version set not null;
create unique index subscription_plans_version on subscription_plans (tenant, subject, version);

-- The plan version in force at the end of a closed period (the one it was closed under).
alter table period_usage add column plan_version integer;

create function tally_history_is_kept() returns trigger language plpgsql as $$
begin
    raise exception '% is history: rows are only ever added (docs/adr/0060)', tg_table_name;
end $$;

create trigger plan_versions_kept before update or delete on plan_versions
    for each row execute function tally_history_is_kept();
create trigger subscription_plans_kept before update or delete on subscription_plans
    for each row execute function tally_history_is_kept();
