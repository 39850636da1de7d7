"""What the gateway needs to know, handed in by whoever starts it (ingest imports nothing but schemas)."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.topics import Topics


@dataclass(frozen=True)
class GatewayConfig:
    kafka_bootstrap: str
    database_url: str
    redis_url: str
    topics: Topics
    redis_prefix: str = "tally:"
    key_cache_ttl_s: float = 30.0
