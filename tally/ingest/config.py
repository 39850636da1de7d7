"""What the gateway needs to know, handed in by whoever starts it (ingest imports nothing but schemas)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tally.schemas.envelope import MAX_MESSAGE_BYTES
from tally.schemas.topics import Topics

RedisFailurePolicy = Literal["open", "closed"]
WEBHOOK_ENVELOPE_BYTES = 16 * 1024  # room for the envelope's attributes around a webhook payload


@dataclass(frozen=True)
class GatewayConfig:
    kafka_bootstrap: str
    database_url: str
    redis_url: str
    topics: Topics
    redis_prefix: str = "tally:"
    key_cache_ttl_s: float = 30.0
    key_lookup_timeout_s: float = 2.0  # a key lookup in PostgreSQL slower than this gets 503
    key_lookup_rate_limit_per_s: float = 20.0  # lookups of tokens not in the cache, per client address
    key_lookup_rate_limit_burst: int = 100

    # product reads: a pool apart from key lookups, a statement timeout and a per-tenant bound (ADR 81)
    read_pool_size: int = 4
    read_timeout_s: float = 10.0  # the server cancels a product route's statement after this; 503
    reads_per_tenant: int = 2  # product requests of one tenant in flight in one gateway; more wait, then get 429
    read_slot_wait_s: float = 1.0  # how long a product request waits for one of its tenant's slots

    # body and batch limits: a request over them gets 413 before its body is read whole
    max_event_bytes: int = 256 * 1024
    max_batch_bytes: int = 8 * 1024 * 1024
    max_batch_items: int = 1000
    max_webhook_bytes: int = 512 * 1024  # the payload becomes the event's data: kept below max_message_bytes
    max_future_s: float = 900.0
    body_timeout_s: float = 30.0  # a body not received whole by then gets 408 (slow uploads hold connections)
    max_message_bytes: int = MAX_MESSAGE_BYTES  # librdkafka's message.max.bytes; larger events get 413

    # Kafka: how long a request may wait for the broker before it gets 503
    produce_timeout_ms: int = 10000
    queue_full_wait_s: float = 2.0
    linger_ms: int = 1  # at most one wake-up of the broker thread per ms; reports are polled every ms (ADR 2)
    retry_after_s: int = 5

    # Redis: idempotency, rate limits and webhook replay memory
    redis_timeout_s: float = 0.5
    redis_failure_policy: RedisFailurePolicy = "open"
    idempotency_ttl_s: int = 24 * 3600
    idempotency_error_ttl_s: int = 60  # a stored 4xx: long enough for a retry loop, not a day
    idempotency_max_body_bytes: int = 4096  # larger responses are kept as a summary
    idempotency_tenant_budget_bytes: int = 8 * 1024 * 1024  # stored bodies per tenant per TTL window
    idempotency_lock_s: int = 60
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: int = 2000
    webhook_rate_limit_per_s: float = 50.0
    webhook_rate_limit_burst: int = 100

    # hard usage limits: how often the blocks written by the usage product are copied from Redis
    usage_limits_refresh_s: float = 0.5

    # webhook sources (YAML: source -> scheme, tenant, secrets); none means the route answers 404
    webhooks_file: Path | None = None

    # the plain-ASGI front of the hot write routes (ADR 2); both adapters call one intake pipeline (ADR 121)
    fast_intake: bool = True

    def __post_init__(self) -> None:
        """Settings that would break a promise at run time stop the gateway at start-up instead."""
        problems = []
        if self.max_webhook_bytes + WEBHOOK_ENVELOPE_BYTES > self.max_message_bytes:
            problems.append(f"max_webhook_bytes must stay {WEBHOOK_ENVELOPE_BYTES} bytes below max_message_bytes "
                            "(a webhook Kafka cannot take would be refused on every retry)")
        for name in ("rate_limit_per_s", "webhook_rate_limit_per_s", "rate_limit_burst", "webhook_rate_limit_burst",
                     "key_lookup_rate_limit_per_s", "key_lookup_rate_limit_burst", "key_lookup_timeout_s",
                     "read_pool_size", "read_timeout_s", "reads_per_tenant", "read_slot_wait_s",
                     "redis_timeout_s", "body_timeout_s", "idempotency_ttl_s", "idempotency_lock_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be greater than 0")
        if problems:
            raise ValueError("invalid gateway settings: " + "; ".join(problems))

    @classmethod
    def from_prefixed(cls, values: dict[str, Any], prefix: str, **required: Any) -> "GatewayConfig":
        """Build from a flat mapping such as settings with `gateway_`-prefixed names, ignoring the rest."""
        names = {f.name for f in fields(cls)}
        picked = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and k[len(prefix):] in names}
        return cls(**required, **picked)
