"""One settings object, read once from the environment (prefix TALLY_) and an optional .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import Topics

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", env_file=".env", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = "postgresql://tally:tally@127.0.0.1:5432/tally"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("tally:", description="prepended to every Redis key; tests use it for isolation")
    stripe_api_base: str = "http://127.0.0.1:12111"

    topic_prefix: str = Field("", description="prepended to every topic name; tests use it for isolation")
    events_partitions: int = 4
    events_retention_ms: int = 7 * 24 * 3600 * 1000
    counters_partitions: int = 4
    dlq_partitions: int = 1
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000

    # gateway (ingest/)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080

    # processors (processors/, sinks/)
    consumer_group: str = "tally-processor"
    batch_max_messages: int = 5000
    batch_max_wait_ms: int = 200

    # benchmarks

    migrations_dir: Path = ROOT / "deploy" / "migrations"

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
