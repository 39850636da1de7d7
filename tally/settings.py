"""One settings object, read once from the environment (prefix TALLY_) and an optional .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tally.schemas.topics import Topics

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", env_file=".env", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = Field(
        "postgresql://tally:tally@127.0.0.1:5432/tally?sslmode=disable",
        description="TLS off by default: the local database is on loopback; set sslmode for a remote one")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("tally:", description="prepended to every Redis key; tests use it for isolation")
    stripe_api_base: str = "http://127.0.0.1:12111"

    topic_prefix: str = Field("", description="prepended to every topic name; tests use it for isolation")
    events_partitions: int = 4
    events_retention_ms: int = 7 * 24 * 3600 * 1000
    counters_partitions: int = 4
    dlq_partitions: int = 1
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000
    # replication of the topics `tally topics create` makes (3 and 2 on deploy/local/kafka-cluster.sh's cluster)
    topic_replication_factor: int = Field(1, ge=1, description="copies of each partition of Tally's topics")
    topic_min_insync_replicas: int = Field(
        1, ge=1, description="copies that must hold an event before Kafka acks it (acks=all) and the gateway answers "
                             "202; fewer in sync: 503. At most the replication factor")

    # gateway (ingest/)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_key_cache_ttl_s: float = Field(30.0, description="a revoked key keeps working this long in each gateway")
    gateway_key_lookup_timeout_s: float = Field(2.0, description="key lookup in PostgreSQL; slower gets 503")
    gateway_key_lookup_rate_limit_per_s: float = Field(20.0, description="uncached key lookups per client address")
    gateway_key_lookup_rate_limit_burst: int = 100
    gateway_max_event_bytes: int = 256 * 1024
    gateway_max_batch_bytes: int = 8 * 1024 * 1024
    gateway_max_batch_items: int = 1000
    gateway_max_webhook_bytes: int = Field(512 * 1024, description="kept 16 KiB below gateway_max_message_bytes")
    gateway_max_message_bytes: int = Field(1_000_000, description="librdkafka message.max.bytes; bigger events get 413")
    gateway_body_timeout_s: float = Field(30.0, description="a request body not received whole by then gets 408")
    gateway_limit_concurrency: int = Field(1000, description="connections and tasks uvicorn serves at once; "
                                                             "more get 503")
    gateway_trusted_proxies: str = Field("127.0.0.1", description="addresses whose X-Forwarded-For is believed "
                                                                  "(comma-separated, * for any)")
    gateway_max_future_s: float = Field(900.0, description="refuse events whose time is further ahead than this")
    gateway_produce_timeout_ms: int = Field(10000, description="longest wait for Kafka's ack before 503")
    gateway_queue_full_wait_s: float = 2.0
    gateway_linger_ms: int = Field(1, description="librdkafka linger.ms of the gateway (measured in ADR 2)")
    gateway_retry_after_s: int = 5
    gateway_redis_timeout_s: float = 0.5
    gateway_redis_failure_policy: Literal["open", "closed"] = Field(
        "open", description="Redis unreachable: open lets requests through (metric + log), closed answers 503")
    gateway_idempotency_ttl_s: int = 24 * 3600
    gateway_idempotency_error_ttl_s: int = Field(60, description="how long a 4xx answer is kept for replay")
    gateway_idempotency_max_body_bytes: int = Field(4096, description="larger answers are kept as a summary")
    gateway_idempotency_tenant_budget_bytes: int = Field(
        8 * 1024 * 1024, description="stored answer bytes per tenant per TTL window; past it, summaries only")
    gateway_idempotency_lock_s: int = 60
    gateway_rate_limit_per_s: float = Field(1000.0, description="token refill per API key and route")
    gateway_rate_limit_burst: int = 2000
    gateway_webhook_rate_limit_per_s: float = Field(50.0, description="token refill per client address")
    gateway_webhook_rate_limit_burst: int = 100
    gateway_usage_limits_refresh_s: float = Field(0.5, description="how often the gateway copies hard-limit "
                                                                   "blocks from Redis (docs/adr/0042)")
    gateway_webhooks_file: str = Field("", description="YAML file of webhook sources; empty: none")
    # intake adapters (ADR 0121)
    gateway_fast_intake: bool = Field(True, description="serve the hot write routes as plain ASGI in front of "
                                                        "Starlette (ADR 2); off, every request goes through Starlette")

    # processors (processors/, sinks/)
    query_cursor_secret: str = Field("", description="signs page cursors; set one value on every gateway, or a"
                                     " cursor is good only on the gateway that made it")
    query_stats_cache_s: float = Field(5.0, description="how long a stats answer is served from Redis")
    consumer_group: str = "tally-processor"
    batch_max_messages: int = Field(20000, description="bigger batches share per-batch costs (counter windows, commits)")
    batch_max_wait_ms: int = 200
    meters_file: str = Field("", description="YAML or JSON meters file; empty: events per type per subject")
    meters: str = Field("", description="meters as inline YAML or JSON; wins over meters_file")
    # tenants' meters as data (docs/adr/0140): every process looks for changed meters this often
    meters_poll_s: float = Field(1.0, gt=0, description="how often the processor (between batches), the gateway, "
                                 "`tally jobs` and `tally alerts` look for changed meters (a one-row read): a new "
                                 "meter counts and is read within about this long")
    accept_types: str = Field("*", description="comma-separated event type globs; other types are dead-lettered")
    late_horizon_s: int = Field(86400, description="events older than this at receipt are stored, not counted")
    processor_metrics_host: str = "127.0.0.1"
    processor_metrics_port: int = Field(9102, description="0 disables the processor's /metrics")
    retry_initial_ms: int = 100
    retry_max_ms: int = 10000
    publish_timeout_ms: int = 30000
    attempt_timeout_s: float = Field(120.0, description="longest single attempt of a step; below max_poll_interval_ms"
                                     " and above publish_timeout_ms")
    max_poll_interval_ms: int = Field(300000, description="librdkafka max.poll.interval.ms of the processor")
    pg_command_timeout_s: float = Field(60.0, description="longest database statement before the attempt is retried")
    pg_lock_timeout_ms: int = Field(20000, description="longest wait for a row lock (a stuck member's, say)")
    pg_idle_in_transaction_timeout_ms: int = Field(
        90000, description="the server ends a transaction whose client went quiet this long; above publish_timeout_ms")
    pg_keepalives_idle_s: int = Field(30, description="TCP keepalive idle time of the server side of each connection")
    redis_counter_ttl_s: int = Field(7 * 24 * 3600, description="how long a counter stays cached after its window")
    maintenance_every_s: int = Field(6 * 3600, description="partition upkeep and pruning, also at start")
    event_keys_retention_days: int = Field(
        0, description="prune dedup keys first seen longer ago (0 keeps them); a re-sent event older than this counts"
                       " again, so keep it far beyond every producer's retry horizon")
    counter_retention_minute_days: int = Field(31, description="prune minute windows this long after they end (0 keeps)")
    counter_retention_hour_days: int = Field(400, description="prune hour windows this long after they end (0 keeps)")
    counter_retention_day_days: int = Field(0, description="prune day windows this long after they end (0 keeps)")
    counter_retention_month_days: int = Field(0, description="prune month windows this long after they end (0 keeps)")
    crash_at: str = Field("", description="test hook only: SIGKILL the processor or a job at this point "
                                         "(tally/processors/faults.py)")

    # the backfill of a new meter version, a job of `tally jobs` (meters/backfill.py, ADR 0145)
    meters_backfill_chunk: int = Field(5000, description="events counted per backfill transaction")
    meters_backfill_pause_s: float = Field(0.05, description="pause between backfill chunks: PostgreSQL serves the"
                                           " intake meanwhile")
    meters_backfill_statement_timeout_ms: int = Field(30000, description="longest statement of a backfill chunk")
    meters_backfill_budget_s: float = Field(60.0, description="longest backfill run; the worker's other jobs go, the"
                                            " next run resumes from the cursor")

    # usage and billing (usage/, billing/)
    usage_limits_refresh_s: float = Field(0.5, description="how often `tally jobs` re-decides hard-limit blocks")
    usage_limits_ttl_s: int = Field(300, description="blocks lapse this long after the last refresh (fail open)")
    usage_link_secret: str = Field("", description="signs usage-page links (HMAC-SHA256); empty: no links")
    usage_page_poll_s: float = Field(30.0, description="how often the usage page refreshes its figures")
    usage_alerts_refresh_s: float = Field(5.0, description="how often `tally jobs` looks for thresholds crossed")
    jobs_metrics_port: int = Field(9103, description="`tally jobs` serves /metrics here (drift found, ...); 0: off")
    jobs_tick_s: float = Field(5.0, description="how often `tally jobs` looks for due jobs")
    # retention of job_runs (tally/billing/jobs.py): the worker reads only the run of the key due now (a day at
    # most), so older runs decide nothing; those of Stripe reports and period closes stay as the money's record
    job_runs_retention_days: int = Field(90, ge=0, description="prune runs of jobs that move no money this long "
                                                               "after they started (0 keeps)")
    stripe_api_key: str = Field("sk_test_123", description="the Stripe secret key; stripe-mock takes any")
    stripe_max_attempts: int = Field(4, description="tries per meter event before the row stays pending")
    stripe_breaker_fail_max: int = Field(5, description="consecutive Stripe failures that open the breaker")
    stripe_breaker_reset_s: float = Field(30.0, description="an open breaker lets one call through after this")
    close_grace_s: int = Field(86400, description="a period is closed this long after its end; keep it at least "
                                                 "TALLY_LATE_HORIZON_S (docs/adr/0043)")
    # Stripe's rules (tally/billing/stripe_report.py, docs/adr/0065)
    stripe_invoice_grace_s: int = Field(3600, description="your Stripe account's invoice finalisation grace "
                                        "(1 hour by default, at most 72): rows stamped in a finished period go out "
                                        "before it ends, later ones are adjustments on the next invoice")

    # plan and subscription bounds per tenant (security review M4; docs/adr/0060)
    usage_max_plans: int = Field(1000, ge=1, description="plans a tenant may create; past it a new one is a 409")
    usage_max_subscriptions: int = Field(100_000, ge=1, description="subscriptions a tenant may create; past it a "
                                                                      "new one is a 409")

    # meters as data (tally/meters/api.py, docs/adr/0140)
    meters_max_per_tenant: int = Field(200, ge=1, description="meters (not retired) a tenant may define; past it a "
                                                              "new one is a 409")

    # alerts (alerts/)
    alerts_tick_s: float = Field(1.0, description="how often `tally alerts` looks for rules due for evaluation")
    alerts_rules_reload_s: float = Field(5.0, description="how soon a rule changed through the API is taken up")
    alerts_metrics_port: int = Field(9104, description="`tally alerts` serves /metrics here; 0: off")
    # alert delivery (tally/alerts/delivery.py, docs/adr/0051)
    alerts_delivery_max_attempts: int = Field(8, ge=1, description="tries per target before a delivery is failed")
    alerts_delivery_backoff_s: float = Field(15.0, gt=0, description="the first retry comes after up to this long; "
                                                                     "each further one doubles it, jittered")
    alerts_delivery_backoff_max_s: float = Field(900.0, gt=0, description="the longest wait between two tries "
                                                                          "(a longer Retry-After is cut to this)")
    alerts_delivery_timeout_s: float = Field(5.0, gt=0, description="the whole of one request to Slack or a webhook "
                                                                     "receiver (a total deadline, not per read)")
    alerts_delivery_concurrency: int = Field(4, ge=1, description="deliveries in flight at once")
    alerts_delivery_poll_s: float = Field(1.0, gt=0, description="how often due deliveries are looked for")
    # outbound calls to tenants' URLs, secrets at rest, per-tenant alert bounds (egress/, sealed/, docs/adr/0075, 0076)
    alerts_allow_private_targets: str = Field(
        "", description="comma-separated CIDRs, addresses or host names a tenant's alert target may reach beyond"
                        " public addresses (a self-hosted receiver on the private network); empty: public only")
    alerts_slack_hosts: str = Field("hooks.slack.com", description="comma-separated hosts a Slack target may name")
    alerts_delivery_per_target: int = Field(2, ge=1, description="deliveries in flight to one target URL at once")
    alerts_max_rules_per_tenant: int = Field(100, ge=1, description="alert rules one tenant may keep")
    alerts_max_targets_per_rule: int = Field(5, ge=1, le=10, description="targets one alert rule may name")
    alerts_min_every_s: int = Field(5, ge=1, description="the shortest `every` a rule may have (shorter ones are"
                                                         " refused by the API and evaluated this often)")
    secrets_key: str = Field("", description="comma-separated Fernet keys sealing secrets at rest; the first seals,"
                                             " all open (rotation); empty: the public development key (sealed/)")

    # the local stack (deploy/local/, docs/adr/0085)
    state_dir: Path = Field(ROOT / ".local", description="logs, pid files, secrets and supervisord's socket of "
                                                         "deploy/local/; `tally status` asks supervisord there")

    # product APIs: reads apart from the intake, usage links, quotas, retention of alert history (ADR 0081, 0082)
    gateway_read_pool_size: int = Field(4, description="connections for product reads, apart from key lookups")
    gateway_read_timeout_s: float = Field(10.0, description="the server cancels a product read after this (503)")
    gateway_reads_per_tenant: int = Field(2, description="product requests of one tenant in flight per gateway (then wait, 429)")
    gateway_read_slot_wait_s: float = Field(1.0, gt=0, description="how long a product request waits for one of its"
                                            " tenant's slots before its 429")
    usage_link_previous_secrets: str = Field("", description="comma-separated secrets that signed usage links before "
                                             "TALLY_USAGE_LINK_SECRET; their links work until they expire")
    query_stats_max_points: int = Field(10_000, description="points in one stats answer; more is a 400 (the answers "
                                        "are kept in Redis)")
    usage_links_per_tenant: int = Field(10_000, description="live (unexpired, unrevoked) usage links per tenant (409)")
    alert_transitions_retention_days: int = Field(
        90, description="prune alert transitions and their deliveries this long after (0 keeps); never one still to "
                        "be published or delivered, nor one a kept usage alert names")
    usage_alerts_retention_days: int = Field(400, description="prune usage alerts this long after they were recorded,"
                                             " once resolved (0 keeps)")

    migrations_dir: Path = ROOT / "deploy" / "migrations"

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def counter_retention_days(self) -> dict[str, int]:
        return {"minute": self.counter_retention_minute_days, "hour": self.counter_retention_hour_days,
                "day": self.counter_retention_day_days, "month": self.counter_retention_month_days}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
