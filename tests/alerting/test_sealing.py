"""Secrets at rest (security review, low: secrets stored in clear): rows written in clear before sealing are
sealed when an evaluator starts, a key is rotated by putting a new one first, and a value no key opens is left
alone and refused when its delivery comes up, never a stop."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tally.alerts import stored
from tally.alerts.sealing import reseal
from tally.sealed import SecretBox, Unreadable
from tally.settings import Settings

SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtc2VhbGluZy10ZXN0"
SLACK = "https://hooks.slack.com/services/T/B/SlackPathIsTheCredential"
CLEAR_RULE = ('{"id": "r", "name": "r", "threshold": 1, "targets": [{"type": "slack", "url": "%s"},'
              ' {"type": "webhook", "url": "https://ops.example.com/h?token=QueryToken", "secret": "%s"}]}'
              % (SLACK, SECRET))


@pytest.fixture
async def pool(alone: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def _dump(db: asyncpg.Connection) -> str:
    """Every stored value that may hold a secret, as one text."""
    rows = await db.fetch("select definition::text as v from alert_rules union all select url from alert_deliveries"
                          " union all select secret from alert_deliveries union all select slack_webhook_url"
                          " from usage_settings")
    return " ".join(r["v"] or "" for r in rows)


async def test_clear_rows_are_sealed_and_a_key_rotates(alone_db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    await db.execute("insert into alert_rules (tenant, id, definition) values ($1, 'r', $2::jsonb)", tenant, CLEAR_RULE)
    tid = await db.fetchval("insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind,"
                            " threshold, comparison, window_s, fired_at) values ($1, 'r', 'r', '{}', '{}', 'firing',"
                            " 1, '>', 60, now()) returning id", tenant)
    await db.execute("insert into alert_deliveries (tenant, transition_id, target, kind, url, secret, endpoint,"
                     " target_digest) values ($1, $2, 0, 'webhook', 'https://ops.example.com/h?token=QueryToken', $3,"
                     " 'https://ops.example.com', '\\x00')", tenant, tid, SECRET)
    await db.execute("insert into usage_settings (tenant, slack_webhook_url) values ($1, $2)", tenant, SLACK)
    for credential in ("SlackPathIsTheCredential", "QueryToken", SECRET):
        assert credential in await _dump(db)

    old_key = Fernet.generate_key().decode()
    old = SecretBox(old_key)
    assert await reseal(pool, old) == 3
    assert await reseal(pool, old) == 0
    for credential in ("SlackPathIsTheCredential", "QueryToken", SECRET.removeprefix("whsec_")):
        assert credential not in await _dump(db)
    row = await stored.one(db, tenant, "r")
    assert stored.rule_of(row["definition"], old).targets[1].secret == SECRET

    new_key = Fernet.generate_key().decode()
    rotating = SecretBox(f"{new_key},{old_key}")
    assert await reseal(pool, rotating) == 3
    only_new = SecretBox(new_key)
    row = await stored.one(db, tenant, "r")
    assert stored.rule_of(row["definition"], only_new).targets[0].url == SLACK
    assert only_new.open(await db.fetchval("select slack_webhook_url from usage_settings where tenant = $1",
                                           tenant)) == SLACK
    with pytest.raises(Unreadable):
        old.open(await db.fetchval("select secret from alert_deliveries where transition_id = $1", tid))

    assert await reseal(pool, SecretBox(Fernet.generate_key().decode())) == 0  # nothing opens: left alone
    assert stored.rule_of((await stored.one(db, tenant, "r"))["definition"], only_new).targets[0].url == SLACK

