"""One message must never stop a member: each kind of message that PostgreSQL, the meters or the
dead-letter topic could never take is dead-lettered with its reason (keeping its headers), and the
events around it are stored and counted once; a literal backslash before "u0000" is not a NUL."""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timezone

import asyncpg
import pytest

from tally.processors.dlq import read_letters
from tally.sinks.errors import is_poison
from tally.schemas.deadletter import DeadLetter
from tally.settings import Settings
from tests.processor.helpers import drained, envelope, produce, wait_for
from tests.support import running

METERS = """
meters:
  - {slug: events, event_type: "*", group_by: {type: type}, windows: [hour, day]}
  - {slug: models, event_type: "*", group_by: {model: data.model}, per_subject: false, windows: [day]}
  - {slug: wide, event_type: "*", group_by: {a: data.w.a, b: data.w.b, c: data.w.c, d: data.w.d, e: data.w.e,
                                             f: data.w.f}, windows: [day]}
"""
HEADERS = [("tenant", b"poison"), ("content-type", b"application/cloudevents+json"), ("schema-version", b"1")]


def _astral(n: int, seed: int = 0) -> str:
    """`n` random characters from outside the BMP: 4 bytes each in UTF-8, and incompressible."""
    rng = random.Random(n * 100 + seed)
    return "".join(chr(rng.randrange(0x20000, 0x2A000)) for _ in range(n))


def _raw(tenant: str, **fields: object) -> bytes:
    now = datetime.now(timezone.utc).isoformat()
    doc = {"specversion": "1.0", "id": f"poison-{uuid.uuid4().hex}", "source": "tool", "type": "order.placed",
           "subject": "c", "time": now, "received_at": now, "tenant": tenant, "data": {"model": "m"}}
    doc.update(fields)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _poison(tenant: str, kind: str) -> bytes:
    if kind == "astral-source":  # C1: its dedup key is over PostgreSQL's btree entry limit
        return _raw(tenant, source=_astral(512), id=_astral(256))
    if kind == "astral-group":  # C1: a group value over the counter key's limit
        return _raw(tenant, data={"model": _astral(700)})
    if kind == "counter-key-over-the-btree-limit":  # every group value within its limit, the key over 2704 bytes
        return _raw(tenant, data={"model": "m", "w": {name: _astral(128, n) for n, name in enumerate("abcdef")}})
    if kind == "integer-beyond-64-bits":  # M1, from a producer other than the gateway
        return _raw(tenant, data={"model": "m", "n": 2**70})
    if kind == "year-9999":  # M1
        return _raw(tenant, time="9999-12-31T23:30:00-05:00")
    if kind == "too-large-for-the-dlq":  # C2: fits the events topic, not with the dead-letter headers
        body = _raw(tenant, data={"model": "m", "bad": "\u0000", "pad": ""})
        return body.replace(b'"pad":""', b'"pad":"' + b"x" * (999_750 - len(body)) + b'"')
    raise AssertionError(kind)


STAGES = {"astral-source": "decode", "astral-group": "meter", "counter-key-over-the-btree-limit": "store",
          "integer-beyond-64-bits": "decode", "year-9999": "decode", "too-large-for-the-dlq": "decode"}


@pytest.mark.parametrize("kind", list(STAGES))
async def test_a_message_that_can_never_be_written_is_dead_lettered_and_the_rest_goes_through(
    isolated: Settings, db: asyncpg.Connection, kind: str
) -> None:
    tenant = f"poison-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"meters": METERS, "retry_max_ms": 500})
    poison = _poison(tenant, kind)
    produce(settings, [envelope(tenant, n, data={"model": "m"}) for n in range(20)])
    produce(settings, [(f"{tenant}/c".encode(), poison)], headers=HEADERS)
    produce(settings, [envelope(tenant, n, data={"model": "m"}) for n in range(20, 40)])

    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic past the poison")

    assert await db.fetchval("select count(*) from events where tenant = $1", tenant) == 40
    models = await db.fetchval("select sum(value) from counters where tenant = $1 and meter = 'models'", tenant)
    assert models == 40
    letters = [item.letter for item in read_letters(settings.kafka_bootstrap, settings.topics.dlq)]
    assert len(letters) == 1, [(d.stage, d.error_class, d.message) for d in letters]
    letter: DeadLetter = letters[0]
    assert letter.stage == STAGES[kind] and letter.message
    assert [h for h in letter.original_headers if h[0] in dict(HEADERS)] == HEADERS
    if kind == "too-large-for-the-dlq":
        assert letter.truncated_from == len(poison) and letter.value == poison[:len(letter.value or b"")]
    else:
        assert letter.truncated_from is None and letter.value == poison


async def test_a_literal_backslash_before_u0000_is_stored_and_a_real_nul_is_dead_lettered(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"nul-{uuid.uuid4().hex[:8]}"
    literal = envelope(tenant, 1, data={"path": "C:\\u0000dir"})
    real = envelope(tenant, 2, data={"path": "C:\u0000dir"})
    produce(isolated, [literal, real])
    with running("processor", ["process"], isolated):
        await wait_for(lambda: drained(isolated, db), 60, "the processor to drain the topic")
    assert await db.fetchval("select data->>'path' from events where tenant = $1", tenant) == "C:\\u0000dir"
    letters = [item.letter for item in read_letters(isolated.kafka_bootstrap, isolated.topics.dlq)]
    assert [(d.error_class, d.offset) for d in letters] == [("UnstorableValue", letters[0].offset)]
    assert letters[0].value == real.to_bytes()


async def test_a_write_the_schema_no_longer_matches_is_an_outage_not_poison(db: asyncpg.Connection) -> None:
    """A processor of the release before migration 0087 still running after it names the counters' old conflict
    target: every record fails so, whatever its values, and none may be dead-lettered (docs/adr/0157)."""
    with pytest.raises(asyncpg.PostgresError) as refused:
        await db.execute("insert into counter_outbox (tenant, key) values ('t', 'k') on conflict (key) do nothing")
    assert refused.value.sqlstate == "42P10"
    assert not is_poison(refused.value)
