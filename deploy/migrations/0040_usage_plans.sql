-- Usage plans and subscriptions (usage/). A plan says, per meter, what a period includes, whether
-- the allowance is a soft or a hard limit and what overage costs. A subscription binds one subject of
-- a tenant to a plan, a Stripe customer and a billing anchor; plan changes are kept as a history so a
-- period's plan is known after the fact (docs/adr/0040).

create table plans (
    tenant      text not null,
    id          text not null,
    name        text not null default '',
    report      text not null default 'overage' check (report in ('overage', 'usage')),  -- what Stripe is sent
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (tenant, id)
);

create table plan_meters (
    tenant        text not null,
    plan_id       text not null,
    meter         text not null,
    included      numeric not null check (included >= 0),
    limit_mode    text not null check (limit_mode in ('soft', 'hard')),
    overage_price numeric not null default 0 check (overage_price >= 0),
    thresholds    integer[] not null default '{80,100}',  -- alert thresholds, percent of `included`
    stripe_event  text,                                    -- the Stripe billing meter's event_name
    primary key (tenant, plan_id, meter),
    foreign key (tenant, plan_id) references plans (tenant, id) on delete cascade
);

create table subscriptions (
    tenant             text not null,
    subject            text not null,
    plan_id            text not null,
    stripe_customer_id text,
    anchor_day         integer not null check (anchor_day between 1 and 31),
    time_zone          text not null,
    start_date         date not null,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    primary key (tenant, subject),
    foreign key (tenant, plan_id) references plans (tenant, id)
);

-- Every plan a subscription had and from when: the plan of a period is the newest row effective
-- before the period's end (docs/adr/0040).
create table subscription_plans (
    tenant       text not null,
    subject      text not null,
    plan_id      text not null,
    effective_at timestamptz not null default now(),
    primary key (tenant, subject, effective_at),
    foreign key (tenant, subject) references subscriptions (tenant, subject) on delete cascade
);
