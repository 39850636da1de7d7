"""The gateway's fast paths give the same answers as the slow ones they stand in for.

- the quick event check accepts only what the pydantic model accepts, and the envelope bytes built
  from it are byte-equal to `Envelope.accept(...).to_bytes()` (which the processors decode);
- the micro-batched rate limiter, under concurrency, allows exactly the bucket's tokens in one Redis
  call and answers each request as one call per request would have;
- one send of many messages waits on one future and reports per message;
- the body's time bound (one timer handle, not `asyncio.timeout`) keeps asyncio.timeout's rule: a body
  late past it is a 408, a cancellation from elsewhere stays a cancellation, a whole body leaves no timer.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

import tally.ingest.app
from tally.ingest import events
from tally.edge.body import read_body
from tally.ingest.precheck import plain_event
from tally.ingest.metrics import Metrics
from tally.edge.problems import Problem
from tally.ingest.producer import EventProducer, producer_config
from tally.ingest.publish import fields
from tally.ingest.ratelimit import Limit, RateLimiter
from tally.ingest.redisguard import RedisGuard
from tally.schemas.envelope import CloudEvent, Envelope, encode, message_key
from tally.sinks.kafka import KafkaPublisher
from tally.wiring import gateway_config
from tally.settings import Settings
from tally.topics import create_topics
from tests.support import free_port, read_topic

NOW = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
BASE = {"id": "e-1", "source": "svc/a", "type": "thing.done"}

VALID: list[dict[str, Any]] = [
    BASE,
    {**BASE, "specversion": "1.0", "subject": "cust-1", "data": {"n": 1, "nested": {"x": None}, "l": [1, 2.5, "s"]}},
    {**BASE, "time": "2026-05-01T11:00:00Z", "data": None},
    {**BASE, "time": "2026-05-01T11:00:00.5+02:00", "subject": None},
    {**BASE, "time": "2026-05-01T11:00:00.123456-00:00", "datacontenttype": "application/json"},
    {**BASE, "time": "2026-05-01T11:00:00+05:30", "dataschema": "https://x/s.json", "data": "text"},
    {**BASE, "tenant": "someone-else", "received_at": "2000-01-01T00:00:00Z", "extra": [1]},
    {**BASE, "id": "é" * 256, "source": "s" * 512, "type": "t" * 256, "subject": "s" * 256, "data": 12.5},
    {**BASE, "subject": "", "data": [True, False, 0]},
]
# Valid for the model, but left to it by the quick check (odd spellings of the time).
MODEL_ONLY: list[dict[str, Any]] = [
    {**BASE, "time": "2026-05-01t11:00:00z"},
    {**BASE, "time": "2026-05-01T11:00:00.123456789Z"},
    {**BASE, "time": "1970-06-01T00:00:00Z"},
    {**BASE, "time": 1700000000},
]
INVALID: list[Any] = [
    [1, 2], "x", None,
    {"source": "s", "type": "t"},
    {**BASE, "id": ""}, {**BASE, "id": "x" * 257}, {**BASE, "id": 7}, {**BASE, "source": None},
    {**BASE, "type": "t" * 257}, {**BASE, "subject": "s" * 257}, {**BASE, "subject": 5},
    {**BASE, "specversion": "0.3"}, {**BASE, "specversion": None}, {**BASE, "specversion": 1.0},
    {**BASE, "time": "2026-05-01T11:00:00"}, {**BASE, "time": "yesterday"},
    {**BASE, "time": "2026-06-01T11:00:00Z"}, {**BASE, "time": "1000-01-01T00:00:00Z"},
    {**BASE, "time": "2026-02-30T11:00:00Z"}, {**BASE, "datacontenttype": "x" * 129},
    {**BASE, "dataschema": ["x"]},
]


def model_bytes(obj: dict[str, Any], tenant: str) -> bytes:
    return Envelope.accept(events.validate(obj, NOW, 900), tenant, NOW).to_bytes()


@pytest.mark.parametrize("obj", VALID)
def test_the_quick_check_builds_the_models_envelope_bytes(obj: dict[str, Any]) -> None:
    quick = plain_event(obj, NOW, 900)
    assert quick is not None
    raw = encode(quick, "tenant-a", NOW)
    assert raw == model_bytes(obj, "tenant-a")
    assert Envelope.from_bytes(raw) == Envelope.accept(CloudEvent.model_validate(obj), "tenant-a", NOW)
    assert message_key("tenant-a", quick["subject"]) == Envelope.from_bytes(raw).key()


@pytest.mark.parametrize("obj", MODEL_ONLY)
def test_what_the_quick_check_leaves_goes_through_the_model_to_the_same_bytes(obj: dict[str, Any]) -> None:
    assert plain_event(obj, NOW, 900) is None
    assert encode(events.check(obj, NOW, 900), "t", NOW) == model_bytes(obj, "t")


@pytest.mark.parametrize("obj", INVALID)
def test_the_quick_check_never_accepts_what_the_model_refuses(obj: Any) -> None:
    assert plain_event(obj, NOW, 900) is None
    with pytest.raises(Problem) as refused:
        events.check(obj, NOW, 900)
    assert refused.value.status == 400 and refused.value.extensions["errors"][0]["field"]


def test_model_fields_encode_as_the_model_does() -> None:
    event = CloudEvent.model_validate({**BASE, "time": "2026-05-01T11:00:00.25+01:00", "data": {"a": 1}})
    assert encode(fields(event), "t", NOW) == Envelope.accept(event, "t", NOW).to_bytes()


# -- the body's time bound ------------------------------------------------------------------------

WHOLE = {"type": "http.request", "body": b"{}", "more_body": False}


async def never_whole() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return WHOLE


async def test_a_body_not_whole_within_the_bound_is_a_408() -> None:
    with pytest.raises(Problem) as late:
        await read_body(never_whole, {}, 1024, 0.05)
    assert late.value.status == 408 and late.value.headers["Connection"] == "close"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # the 408 took back its cancel


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    reading = asyncio.create_task(read_body(never_whole, {}, 1024, 0.05))
    await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading


async def test_a_whole_body_leaves_no_timer_behind() -> None:
    async def whole() -> dict[str, Any]:
        return WHOLE

    assert await read_body(whole, {}, 1024, 0.05) == b"{}"
    await asyncio.sleep(0.15)  # past the bound: a timer left armed would cancel this task here
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


# -- rate limiter ----------------------------------------------------------------------------------

@pytest.fixture
async def limiter(settings: Settings) -> AsyncIterator[RateLimiter]:
    guard = RedisGuard.connect(settings.redis_url, 1.0, "open", Metrics())
    yield RateLimiter(guard, f"{settings.redis_prefix}fast:{datetime.now().timestamp()}:")
    await guard.close()


async def test_concurrent_checks_allow_exactly_the_burst_in_one_redis_call(limiter: RateLimiter) -> None:
    limit = Limit(0.001, 20)
    decisions = await asyncio.gather(*[limiter.check("events", "key-1", limit) for _ in range(50)])
    assert limiter.calls == 1
    assert [d.allowed for d in decisions] == [True] * 20 + [False] * 30
    remaining = [d.headers["RateLimit"].split(";")[1] for d in decisions]
    assert remaining == [f"r={n}" for n in range(19, -1, -1)] + ["r=0"] * 30
    assert all(int(d.headers["Retry-After"]) >= 1 and d.retry_after_s >= 1 for d in decisions[20:])
    assert decisions[0].headers["RateLimit-Policy"] == '"events";q=20;w=20000'


async def test_checks_arriving_while_a_call_is_out_go_together_in_the_next(limiter: RateLimiter) -> None:
    limit = Limit(0.001, 12)
    first = [asyncio.create_task(limiter.check("events", "key-2", limit)) for _ in range(8)]
    await asyncio.sleep(0)  # the loop pass ends: the first call goes out
    later = [asyncio.create_task(limiter.check("events", "key-2", limit)) for _ in range(8)]
    decisions = await asyncio.gather(*first, *later)
    assert limiter.calls == 2
    assert [d.allowed for d in decisions] == [True] * 12 + [False] * 4


async def test_buckets_in_one_call_stay_apart_and_later_calls_see_the_taken_tokens(limiter: RateLimiter) -> None:
    limit = Limit(0.001, 3)
    first = await asyncio.gather(*[limiter.check("events", subject, limit) for subject in ["a", "b"] * 5])
    later = await limiter.check("events", "a", limit)
    assert [d.allowed for d in first] == [True] * 6 + [False] * 4
    assert not later.allowed and later.headers["RateLimit"].startswith('"events";r=0;')


async def test_batched_answers_equal_one_call_per_request(limiter: RateLimiter) -> None:
    limit = Limit(0.5, 3)
    one_by_one = [await limiter.check("events", "seq", limit) for _ in range(5)]
    together = await asyncio.gather(*[limiter.check("events", "par", limit) for _ in range(5)])
    assert [d.allowed for d in one_by_one] == [d.allowed for d in together] == [True] * 3 + [False] * 2
    assert [d.headers["RateLimit"].split(";")[1] for d in one_by_one] == [
        d.headers["RateLimit"].split(";")[1] for d in together]
    assert [d.headers.get("Retry-After") for d in one_by_one] == [d.headers.get("Retry-After") for d in together]
    assert [d.headers["RateLimit-Policy"] for d in one_by_one] == [d.headers["RateLimit-Policy"] for d in together]


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_with_redis_down_every_waiting_check_gets_the_policy(policy: str) -> None:
    metrics = Metrics()
    guard = RedisGuard.connect(f"redis://127.0.0.1:{free_port()}/0", 0.5, policy, metrics)  # type: ignore[arg-type]
    limiter = RateLimiter(guard, "down:")
    results = await asyncio.gather(*[limiter.check("events", "k", Limit(1, 1)) for _ in range(10)],
                                   return_exceptions=True)
    await guard.close()
    if policy == "open":
        assert all(not isinstance(r, BaseException) and r.allowed for r in results)
    else:
        assert all(isinstance(r, Problem) and r.status == 503 for r in results)
        assert len({id(r) for r in results}) == 10  # one exception object per request


# -- producer --------------------------------------------------------------------------------------

async def test_one_send_of_many_and_many_concurrent_sends_all_resolve_after_the_acks(settings: Settings) -> None:
    own = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}fast{NOW.microsecond}."})
    create_topics(own)
    # A long linger holds messages in the client for a second: a send that resolved before its ack
    # would resolve while the topic still lacks them.
    producer = EventProducer(producer_config(own.kafka_bootstrap, **{"linger.ms": 1000}))

    def on_topic() -> list[bytes]:
        return sorted(m.value() for m in read_topic(own.kafka_bootstrap, own.topics.events))

    try:
        many = [(b"k", orjson.dumps({"n": n}), [("h", b"v")]) for n in range(500)]
        assert await producer.send_many(own.topics.events, many) == [None] * 500
        assert await asyncio.to_thread(on_topic) == sorted(value for _, value, _ in many)
        single = [orjson.dumps({"s": n}) for n in range(200)]
        await asyncio.gather(*[producer.send(own.topics.events, b"k", value, []) for value in single])
        assert await asyncio.to_thread(on_topic) == sorted([value for _, value, _ in many] + single)
        assert await producer.send_many(own.topics.events, []) == []
    finally:
        assert producer.close() == 0


async def test_the_gateway_and_the_processor_produce_with_acks_from_all_replicas_and_idempotence(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one broker acks=1 behaves like acks=all, so no outage test can tell them apart: check the config
    each producer is really built with."""
    built: list[dict[str, Any]] = []

    class Recording(EventProducer):
        def __init__(self, config: dict[str, Any], *args: Any) -> None:
            built.append(config)
            super().__init__(config, *args)

    monkeypatch.setattr(tally.ingest.app, "EventProducer", Recording)
    app = tally.ingest.app.create_app(gateway_config(settings))
    async with app.app.state.gateway.lifespan(app.app):
        pass
    publisher = KafkaPublisher(settings.kafka_bootstrap, 1000)
    try:
        for config in [*built, publisher._config]:
            assert (config["acks"], config["enable.idempotence"]) == ("all", True), config
    finally:
        publisher.close()
    assert len(built) == 1


async def test_single_events_in_flight_set_off_no_young_collection(gateway_settings: Settings,
                                                                   api_key: tuple[str, str]) -> None:
    """64 connections' worth of single events held by the gateway at once are live objects, not garbage:
    a young collection then only scans and promotes them (ADR 155)."""
    settings = gateway_settings.model_copy(update={"gateway_rate_limit_per_s": 1e6, "gateway_rate_limit_burst": 10**6})
    app = tally.ingest.app.create_app(gateway_config(settings))
    headers = [(b"content-type", b"application/cloudevents+json"), (b"authorization", f"Bearer {api_key[1]}".encode())]
    statuses: list[int] = []

    async def post(n: int) -> None:
        body = orjson.dumps({**BASE, "id": f"gc-{NOW.timestamp()}-{n}", "subject": f"s-{n % 7}", "data": {"n": n}})

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app({"type": "http", "method": "POST", "path": "/v1/events", "headers": headers,
                   "client": ("127.0.0.1", 1)}, receive, send)

    async with app.app.state.gateway.lifespan(app.app):
        await post(-1)  # the key is looked up and cached
        gc.collect(0)
        before = gc.get_stats()[0]["collections"]
        for start in range(0, 640, 64):
            await asyncio.gather(*[post(n) for n in range(start, start + 64)])
        young = gc.get_stats()[0]["collections"] - before
    assert statuses == [202] * 641
    assert young == 0
