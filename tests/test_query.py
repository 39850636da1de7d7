"""The read API against real services: filters, keyset pages while records keep arriving, cursors that
belong to one tenant and one query, and stats equal to a recomputation from the raw records."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import asyncpg
import httpx
import pytest

from tally.ingest.auth import create_key
from tally.query import search
from tally.query.filters import LogQuery
from tally.settings import Settings
from tests.processor.helpers import drained, produce, wait_for
from tests.gateway.helpers import healthy, start_gateway
from tests.support import free_port, running, wait_until
from tally.schemas.envelope import Envelope

LEVELS = ["debug", "info", "warn", "error"]
NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)


def _log(tenant: str, n: int, *, service: str | None = None, minutes_ago: int | None = None) -> Envelope:
    data = {"service": service or f"svc-{n % 3}", "level": LEVELS[n % 4], "message": f"order {n} {'paid' if n % 5 else 'declined'}",
            "attributes": {"n": n}}
    if n % 7 == 0:
        data["trace_id"] = f"{n:032x}"
    when = NOW - timedelta(minutes=minutes_ago if minutes_ago is not None else n % 50, seconds=n % 60)
    return Envelope(id=f"log-{n}", source=f"logs/{data['service']}", type="tally.log", subject=data["service"],
                    time=when, received_at=datetime.now(timezone.utc), data=data, tenant=tenant)


def _orders(tenant: str) -> list[Envelope]:
    """Events that are not logs: what a key with `events:read` alone may read."""
    return [Envelope(id=f"order-{n}", source="shop", type="order.paid", subject=f"svc-{n % 3}",
                     time=NOW - timedelta(minutes=n), received_at=datetime.now(timezone.utc), data={"n": n},
                     tenant=tenant) for n in range(30)]


@pytest.fixture(scope="module")
async def stack(settings: Settings):  # noqa: ANN201
    """A gateway and a processor on topics of this module's own, two tenants with read keys, 600 logs."""
    run = uuid.uuid4().hex[:8]
    own = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}q{run}.", "processor_metrics_port": 0,
                                      "consumer_group": f"{settings.consumer_group}-q{run}"})
    from tally.topics import create_topics
    await asyncio.to_thread(create_topics, own)
    conn = await asyncpg.connect(own.database_url)
    tenant, other = f"query-{run}", f"other-{run}"
    _, secret = await create_key(conn, tenant, "reader", ["logs:read", "events:read"])
    _, other_secret = await create_key(conn, other, "reader", ["logs:read", "events:read"])
    _, writer = await create_key(conn, tenant, "writer", ["events:write"])
    _, events_reader = await create_key(conn, tenant, "events reader", ["events:read"])
    logs = [_log(tenant, n) for n in range(600)]
    await asyncio.to_thread(produce, own, logs + [_log(other, n) for n in range(20)] + _orders(tenant))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("gateway", ["gateway", "--port", str(port)], own), running("processor", ["process"], own):
        await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
        await wait_for(lambda: drained(own, conn), 60, "the processor to store the logs")
        yield {"settings": own, "url": url, "tenant": tenant, "secret": secret, "other": other_secret,
               "writer": writer, "events_reader": events_reader, "logs": logs, "db": conn}
    await conn.close()


def _client(stack: dict, secret: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack["url"], headers={"Authorization": f"Bearer {secret or stack['secret']}"},
                             timeout=30)


RANGE = {"start": (NOW - timedelta(hours=2)).isoformat(), "end": (NOW + timedelta(minutes=1)).isoformat()}


async def _all_pages(client: httpx.AsyncClient, path: str, params: dict, key: str = "records") -> list[dict]:
    out, response = [], await client.get(path, params=params)
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        out += body[key]
        if body["next"] is None:
            return out
        response = await client.get(body["next"])


@pytest.mark.parametrize("filters", [
    {}, {"service": "svc-1"}, {"level": "warn"}, {"q": "declined"}, {"trace_id": f"{14:032x}"},
    {"service": "svc-2", "level": "error", "q": "order paid"},
], ids=["all", "service", "level-and-above", "words", "trace", "combined"])
async def test_each_filter_and_their_combination_returns_exactly_the_matching_records(stack: dict, filters: dict) -> None:
    def matches(e: Envelope) -> bool:
        d = e.data
        return ((filters.get("service") in (None, d["service"]))
                and ("level" not in filters or LEVELS.index(d["level"]) >= LEVELS.index(filters["level"]))
                and ("trace_id" not in filters or d.get("trace_id") == filters["trace_id"])
                and all(word in d["message"].split() for word in filters.get("q", "").split()))
    async with _client(stack) as client:
        records = await _all_pages(client, "/v1/logs", {**RANGE, **filters, "limit": 50})
    expected = sorted((e for e in stack["logs"] if matches(e)), key=lambda e: (e.time, e.source, e.id), reverse=True)
    assert [r["id"] for r in records] == [e.id for e in expected]
    assert expected, "the filter matched something"


@pytest.mark.parametrize(("words", "order"), [("paid", "desc"), ("paid", "asc"), ("declined", "desc"),
                                             ("order 7", "desc")])
async def test_word_search_in_steps_pages_exactly_as_one_plain_query(stack: dict, words: str, order: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps far smaller than the records, so a page takes several and rarer words end in the full-text index."""
    monkeypatch.setattr(search, "FIRST_SCAN", 8)
    monkeypatch.setattr(search, "RARE", 3)
    query = LogQuery.model_validate({**RANGE, "q": words, "order": order, "limit": 7})
    found: list[str] = []
    after = None
    while True:
        rows = await search.page(stack["db"], search.log_filters(stack["tenant"], query), query, after)
        found += [row["id"] for row in rows[:query.limit]]
        if len(rows) <= query.limit:
            break
        last = rows[query.limit - 1]
        after = (last["time"], last["source"], last["id"])
    expected = await stack["db"].fetch(
        "select id from events where tenant = $1 and type = 'tally.log' and time >= $2 and time < $3"
        " and to_tsvector('simple', data->>'message') @@ plainto_tsquery('simple', $4)"
        f" order by time {order}, source {order}, id {order}", stack["tenant"], query.start, query.end, words)
    assert found == [row["id"] for row in expected] and found


class _Counting:
    """The connection, counting the word-search steps (statements that read rows in page order)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn, self.steps = conn, 0

    async def fetch(self, sql: str, *args: object) -> list:
        self.steps += "row_number()" in sql
        return await self.conn.fetch(sql, *args)


async def test_a_word_search_reads_a_bounded_number_of_rows(stack: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Security review H4: past MAX_SCAN rows read in steps, the rest goes through the (tenant's) full-text index;
    the page is the same as one plain query's."""
    monkeypatch.setattr(search, "FIRST_SCAN", 8)
    monkeypatch.setattr(search, "RARE", 3)
    monkeypatch.setattr(search, "MAX_SCAN", 60, raising=False)
    query = LogQuery.model_validate({**RANGE, "q": "paid", "limit": 1000, "order": "asc"})
    conn = _Counting(stack["db"])
    rows = await search.page(conn, search.log_filters(stack["tenant"], query), query, None)  # type: ignore[arg-type]
    expected = await stack["db"].fetch(
        "select id from events where tenant = $1 and type = 'tally.log' and time >= $2 and time < $3 and"
        " to_tsvector('simple', data->>'message') @@ plainto_tsquery('simple', 'paid') order by time, source, id",
        stack["tenant"], query.start, query.end)
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    assert conn.steps == 3  # 8, 16 and 32 rows; 64 more would pass 60


async def test_pages_never_skip_or_repeat_while_records_keep_arriving(stack: dict) -> None:
    settings, tenant = stack["settings"], stack["tenant"]
    seen: list[str] = []
    order: list[tuple[datetime, str]] = []
    async with _client(stack) as client:
        response = await client.get("/v1/logs", params={**RANGE, "limit": 37, "order": "asc"})
        n = 10_000
        while True:
            body = response.json()
            seen += [r["id"] for r in body["records"]]
            order += [(datetime.fromisoformat(r["time"]), r["id"]) for r in body["records"]]
            # New records land before, inside and after the part already read.
            await asyncio.to_thread(produce, settings, [_log(tenant, n + k, minutes_ago=(n + k) % 60) for k in range(5)])
            n += 5
            if body["next"] is None:
                break
            response = await client.get(body["next"])
    before = {e.id for e in stack["logs"]}
    assert len(seen) == len(set(seen)), "no record twice"
    assert before <= set(seen), "every record present at the start was seen"
    assert [t for t, _ in order] == sorted(t for t, _ in order), "in time order across pages"


async def test_a_cursor_is_refused_by_another_tenant_and_beside_other_filters(stack: dict) -> None:
    async with _client(stack) as client:
        first = (await client.get("/v1/logs", params={**RANGE, "limit": 5})).json()
    cursor = httpx.URL(first["next"]).params["cursor"]
    async with _client(stack, stack["other"]) as other:
        stolen = await other.get("/v1/logs", params={**RANGE, "limit": 5, "cursor": cursor})
    async with _client(stack) as client:
        moved = await client.get("/v1/logs", params={**RANGE, "limit": 5, "service": "svc-0", "cursor": cursor})
        own = (await client.get("/v1/logs", params={**RANGE, "limit": 100})).json()
    for response in (stolen, moved):
        assert response.status_code == 400 and response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == "cursor"
    assert {r["service"] for r in own["records"]} <= {"svc-0", "svc-1", "svc-2"}
    assert not any(r["id"].startswith("log-") and r["service"] is None for r in own["records"])


async def test_a_cursor_is_refused_on_another_route(stack: dict) -> None:
    """Security review, lows: the MAC covers the route, so an events cursor is no logs cursor."""
    async with _client(stack) as client:
        events = (await client.get("/v1/events", params={**RANGE, "limit": 5})).json()
        cursor = httpx.URL(events["next"]).params["cursor"]
        moved = await client.get("/v1/logs", params={**RANGE, "limit": 5, "cursor": cursor})
        same = await client.get("/v1/events", params={**RANGE, "limit": 5, "cursor": cursor})
    assert moved.status_code == 400 and moved.json()["errors"][0]["field"] == "cursor"
    assert same.status_code == 200


async def test_the_other_tenant_sees_only_its_own(stack: dict) -> None:
    async with _client(stack, stack["other"]) as client:
        records = await _all_pages(client, "/v1/logs", {**RANGE, "limit": 1000})
    assert len(records) == 20


@pytest.mark.parametrize(("params", "field"), [
    ({"level": "loud"}, "level"), ({"limit": "0"}, "limit"), ({"start": "yesterday"}, "start"),
    ({"start": "2026-01-01T00:00:00Z", "end": "2026-06-01T00:00:00Z"}, "(body)"), ({"colour": "red"}, "colour"),
])
async def test_bad_filters_are_problems_naming_the_parameter(stack: dict, params: dict, field: str) -> None:
    async with _client(stack) as client:
        response = await client.get("/v1/logs", params=params)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert field in str(response.json()["errors"])


async def test_reads_need_a_read_scope(stack: dict) -> None:
    async with _client(stack, stack["writer"]) as client:
        response = await client.get("/v1/logs")
    assert response.status_code == 403


async def _raw(stack: dict, sql: str) -> Counter:
    rows = await stack["db"].fetch(f"{sql} from events where tenant = $1 and type = 'tally.log' and counted"
                                   " group by 1, 2, 3", stack["tenant"])
    return Counter({tuple(row[:3]): row[3] for row in rows})


async def test_log_stats_equal_a_recomputation_from_the_records(stack: dict) -> None:
    expected = await _raw(stack, "select subject, data->>'level', date_trunc('minute', time), count(*)")
    async with _client(stack) as client:
        first = await client.get("/v1/logs/stats", params={**RANGE, "step": "minute", "by": "service,level"})
        again = await client.get("/v1/logs/stats", params={**RANGE, "step": "minute", "by": "service,level"})
        by_service = (await client.get("/v1/logs/stats", params={**RANGE, "by": "service", "step": "hour"})).json()
    assert (first.headers["x-tally-cache"], again.headers["x-tally-cache"]) == ("miss", "hit")
    got: Counter = Counter()
    for series in first.json()["series"]:
        for point in series["points"]:
            got[(series["service"], series["level"], datetime.fromisoformat(point["start"]))] += point["count"]
    assert got == expected and sum(got.values()) >= len(stack["logs"])
    totals: Counter = Counter()
    for (service, _, _), count in expected.items():
        totals[service] += count
    assert {s["service"]: s["total"] for s in by_service["series"]} == dict(totals)


async def test_a_stats_answer_is_bounded_before_it_is_cached(stack: dict) -> None:
    """Security review M4: past TALLY_QUERY_STATS_MAX_POINTS points, a 400 asking to narrow the query, and
    nothing stored in Redis."""
    params = {**RANGE, "step": "minute", "by": "level", "service": "svc-0"}  # not cached by another test
    with start_gateway("gateway-stats-bound", stack["settings"], TALLY_QUERY_STATS_MAX_POINTS="20") as gw:
        async with gw.client(stack["secret"]) as client:
            wide = await client.get("/v1/logs/stats", params=params)
            again = await client.get("/v1/logs/stats", params=params)
            narrow = await client.get("/v1/logs/stats", params={**RANGE, "step": "hour", "by": "service"})
    assert wide.status_code == again.status_code == 400, wide.text[:300]
    assert wide.headers["content-type"] == "application/problem+json" and "20" in wide.json()["detail"]
    assert narrow.status_code == 200 and sum(len(s["points"]) for s in narrow.json()["series"]) <= 20


async def test_events_search_and_stats_leave_logs_to_the_logs_scope(stack: dict) -> None:
    """Security review M1: `events:read` reads events, not log records; those need `logs:read` on /v1/logs."""
    rows = await stack["db"].fetch("select subject, count(*) from events where tenant = $1 and type <> 'tally.log'"
                                   " and counted group by 1", stack["tenant"])
    expected = {row[0]: row[1] for row in rows}
    async with _client(stack, stack["events_reader"]) as client:
        events = await _all_pages(client, "/v1/events", {**RANGE, "subject": "svc-1", "limit": 7}, "events")
        logs = (await client.get("/v1/events", params={**RANGE, "type": "tally.log"})).json()
        stats = (await client.get("/v1/events/stats", params={**RANGE, "by": "type,subject", "step": "hour"})).json()
        refused = await client.get("/v1/logs")
    assert len(events) == expected["svc-1"] == 10
    assert all(e["type"] == "order.paid" and e["subject"] == "svc-1" for e in events)
    assert logs["events"] == []
    assert {s["type"] for s in stats["series"]} == {"order.paid"}
    assert {s["subject"]: s["total"] for s in stats["series"]} == expected
    assert refused.status_code == 403


class _Explaining:
    """The connection, answering each statement with no rows and keeping the plan PostgreSQL chose for it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, sql: str, *args: object) -> list:
        self.plans.append("\n".join(row[0] for row in await self.conn.fetch(f"explain {sql}", *args)))
        return []


# Log records in one day of one partition, four to a trace, and the page read from them. Without statistics the
# planner expects one record in 200 to match either way, so the shorter the page the sooner reading the day in time
# order looks cheaper; a page of ten keeps the seed to seconds (the default page of 100 turns at about 300,000).
TRACE_SEED, TRACE_PAGE = 100_000, 10


async def test_a_trace_page_reads_the_trace_index(settings: Settings) -> None:
    """ADR 0161: a partial index gives the planner no statistics on `data->>'trace_id'`; without them it expects
    many matches and reads the day newest first instead of the few records of the trace. The partition is one
    made after the migrations ran, as the processor makes them."""
    conn = await asyncpg.connect(settings.database_url)
    tenant, day = f"traces-{uuid.uuid4().hex[:8]}", datetime(2001, 3, 14, tzinfo=timezone.utc)
    try:
        await conn.execute("select tally_ensure_event_partition($1)", day.date().replace(day=1))
        await conn.execute(
            "insert into events (tenant, source, id, type, subject, time, received_at, data, kafka_partition,"
            " kafka_offset) select $1, 'logs/svc', 'trace-' || n, 'tally.log', 'svc',"
            " $2::timestamptz + n * interval '800 ms', $2, jsonb_build_object('service', 'svc', 'level', 'info',"
            " 'message', 'served', 'trace_id', md5((n / 4)::text)), 0, n from generate_series(0, $3 - 1) as n",
            tenant, day, TRACE_SEED)
        await conn.execute("analyze events")
        query = LogQuery.model_validate({"start": day.isoformat(), "end": (day + timedelta(days=1)).isoformat(),
                                         "trace_id": hashlib.md5(b"1000").hexdigest(), "limit": TRACE_PAGE})
        explaining = _Explaining(conn)
        await search.page(explaining, search.log_filters(tenant, query), query, None)  # type: ignore[arg-type]
        trace_indexes = {row[0] for row in await conn.fetch(
            "select inhrelid::regclass::text from pg_inherits where inhparent = 'events_logs_trace'::regclass")}
        [plan] = explaining.plans
        assert any(f" {index} " in plan for index in trace_indexes), plan
    finally:
        await conn.execute("delete from events where tenant = $1", tenant)
        await conn.close()
