-- Each queued window carries the revision its writer committed, so the relay deletes only what it
-- published (`revision <= published`) and a newer update queued meanwhile stays to be published. The
-- relay no longer locks outbox rows while it waits for Kafka; it serialises on an advisory lock per
-- key instead, which writers never take (docs/adr/0016). Rows queued before this have revision 0.
alter table counter_outbox add column revision bigint not null default 0;
