-- Usage links as rows (security review M2, docs/adr/0082): a token names its row, which records the API key
-- that minted it, so a link can be revoked alone, with every link of a key, or by revoking the key.
create table usage_links (
    id         bigint generated always as identity,
    tenant     text not null,
    subject    text not null,
    key_id     text not null,
    expires_at timestamptz not null,
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    primary key (tenant, id)  -- keyed by tenant, as every new table is (docs/adr/0090)
);
create index usage_links_by_key on usage_links (tenant, key_id) where revoked_at is null;
create index usage_links_expiry on usage_links (expires_at);
