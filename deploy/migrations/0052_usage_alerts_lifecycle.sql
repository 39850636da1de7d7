-- Usage alerts go through the alert lifecycle (tally/alerts/usage.py, docs/adr/0052): each row becomes the firing of
-- rule usage:<meter>:<threshold> for its subject, resolved when its period ends; publication and delivery are
-- the alerts' own, so usage_alerts no longer keeps its own delivery state. Rows recorded before this migration
-- were delivered the old way and are not taken up again.
alter table usage_alerts
    add column taken_up boolean not null default true,
    add column fired_transition bigint references alert_transitions (id),
    add column resolved_transition bigint references alert_transitions (id);
alter table usage_alerts alter column taken_up set default false;
alter table usage_alerts drop column published_at, drop column slack_status, drop column slack_attempts,
    drop column slack_error;
create index usage_alerts_open on usage_alerts (id)
    where not taken_up or (fired_transition is not null and resolved_transition is null);
