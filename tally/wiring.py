"""Settings to configs: the one place each process's config (and what the admin commands share) is built from
`tally.settings.Settings`. Every `service.py` is handed its config and reads no environment (docs/adr/0125).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tally.alerts import service as alerts_service, stored as stored_rules
from tally.alerts.api import AlertsProduct
from tally.alerts.delivery import DeliveryPolicy
from tally.alerts.policy import AlertPolicy
from tally.billing import service as jobs_service
from tally.billing.context import BillingConfig
from tally.counters import CounterReader
from tally.egress import EgressPolicy
from tally.ingest import service as gateway_service
from tally.ingest.config import GatewayConfig
from tally.edge.products import Product
from tally.meters import rules as meter_rules
from tally.meters.api import MetersProduct
from tally.meters.backfill import BackfillConfig
from tally.meters.catalog import Catalog
from tally.meters.definitions import MetersConfig, load_meters
from tally.meters.fresh import LiveCatalog
from tally.meters.stored import Reader
from tally.processors import service as processor_service
from tally.processors.consumer import ProcessorConfig
from tally.processors.faults import crash_point
from tally.query.cache import AnswerCache
from tally.query.routes import QueryProduct
from tally.sealed import SecretBox
from tally.settings import Settings
from tally.sinks.maintenance import Retention
from tally.usage.api import UsageProduct
from tally.usage.plans import plans_using


def gateway(settings: Settings, host: str | None = None, port: int | None = None) -> gateway_service.ServiceConfig:
    """`tally gateway`; `host` and `port` are the command line's, over the settings'."""
    return gateway_service.ServiceConfig(
        gateway=gateway_config(settings), products=products(settings),
        host=host or settings.gateway_host, port=port or settings.gateway_port,
        limit_concurrency=settings.gateway_limit_concurrency, trusted_proxies=settings.gateway_trusted_proxies)


def gateway_config(settings: Settings) -> GatewayConfig:
    return GatewayConfig.from_prefixed(
        settings.model_dump(), "gateway_", kafka_bootstrap=settings.kafka_bootstrap,
        database_url=settings.database_url, redis_url=settings.redis_url, topics=settings.topics,
        redis_prefix=settings.redis_prefix)


def products(settings: Settings) -> tuple[Product, ...]:
    """The product packages whose routes the gateway serves beside intake (`tally.edge.products`); they share one
    live catalog of the tenants' meters, against which the plans and alert rules they take are checked."""
    catalog = LiveCatalog(meters(settings), settings.meters_poll_s)
    return (MetersProduct(catalog.catalog, meter_readers(), settings.meters_max_per_tenant),
            QueryProduct(settings.query_cursor_secret,
                         AnswerCache(settings.redis_url, settings.redis_prefix, settings.query_stats_cache_s),
                         settings.query_stats_max_points),
            UsageProduct(settings.database_url, settings.redis_url, settings.redis_prefix,
                         settings.redis_counter_ttl_s, catalog, settings.usage_link_secret, settings.usage_page_poll_s,
                         settings.usage_max_plans, settings.usage_max_subscriptions,
                         [s for s in settings.usage_link_previous_secrets.split(",") if s],
                         settings.usage_links_per_tenant, alert_policy=alert_policy(settings)),
            AlertsProduct(catalog, settings.query_cursor_secret, alert_policy(settings)))


def processor(settings: Settings) -> processor_service.ServiceConfig:
    """`tally process`."""
    return processor_service.ServiceConfig(
        processor=ProcessorConfig(
            kafka_bootstrap=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            topic=settings.topics.events,
            batch_max_messages=settings.batch_max_messages,
            batch_max_wait_s=settings.batch_max_wait_ms / 1000,
            retry_initial_s=settings.retry_initial_ms / 1000,
            retry_max_s=settings.retry_max_ms / 1000,
            attempt_timeout_s=settings.attempt_timeout_s,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            maintenance_every_s=settings.maintenance_every_s,
            crash_at=settings.crash_at,
        ),
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
        counters_topic=settings.topics.counters,
        dlq_topic=settings.topics.dlq,
        meters_file=settings.meters_file,
        meters_inline=settings.meters,
        meters_poll_s=settings.meters_poll_s,
        accept_types=settings.accept_types,
        late_horizon_s=settings.late_horizon_s,
        metrics_host=settings.processor_metrics_host,
        metrics_port=settings.processor_metrics_port,
        publish_timeout_ms=settings.publish_timeout_ms,
        redis_counter_ttl_s=settings.redis_counter_ttl_s,
        pg_command_timeout_s=settings.pg_command_timeout_s,
        pg_lock_timeout_ms=settings.pg_lock_timeout_ms,
        pg_idle_in_transaction_timeout_ms=settings.pg_idle_in_transaction_timeout_ms,
        pg_keepalives_idle_s=settings.pg_keepalives_idle_s,
        retention=retention(settings),
    )


def jobs(settings: Settings) -> jobs_service.ServiceConfig:
    """`tally jobs` (the worker)."""
    return jobs_service.ServiceConfig(billing=billing(settings), metrics_host=settings.processor_metrics_host,
                                      metrics_port=settings.jobs_metrics_port)


def alerts(settings: Settings) -> alerts_service.ServiceConfig:
    """`tally alerts`."""
    return alerts_service.ServiceConfig(
        database_url=settings.database_url, kafka_bootstrap=settings.kafka_bootstrap,
        counters_topic=settings.topics.counters, alerts_topic=settings.topics.alerts,
        meters=meters(settings), policy=alert_policy(settings),
        tick_s=settings.alerts_tick_s, rules_reload_s=settings.alerts_rules_reload_s,
        meters_poll_s=settings.meters_poll_s,
        hook=partial(crash_point, armed=settings.crash_at),
        delivery=DeliveryPolicy(
            max_attempts=settings.alerts_delivery_max_attempts, backoff_s=settings.alerts_delivery_backoff_s,
            backoff_max_s=settings.alerts_delivery_backoff_max_s, timeout_s=settings.alerts_delivery_timeout_s,
            concurrency=settings.alerts_delivery_concurrency, per_target=settings.alerts_delivery_per_target,
            poll_s=settings.alerts_delivery_poll_s),
        metrics_host=settings.processor_metrics_host, metrics_port=settings.alerts_metrics_port)


# What processes and admin commands share.

def meters(settings: Settings) -> MetersConfig:
    return load_meters(Path(settings.meters_file) if settings.meters_file else None, settings.meters)


def catalog(settings: Settings) -> Catalog:
    """Every tenant's meters: the deploy-time set and the tenants' own, loaded on first refresh (ADR 0140)."""
    return Catalog(meters(settings))


def meter_readers() -> tuple[Reader, ...]:
    """What reads a tenant's meters, and what each needs of them: a meter they read is not retired (ADR 0141)."""
    return (Reader(plans_using, meter_rules.billable), Reader(stored_rules.using, meter_rules.alertable))


def retention(settings: Settings) -> Retention:
    """Level changes are kept as long as the longest-kept window size, for ever while a size is (sinks.maintenance
    Retention says why; `counter_retention_days` names every size)."""
    days = settings.counter_retention_days
    return Retention(event_keys_days=settings.event_keys_retention_days, counter_days=days,
                     alert_transitions_days=settings.alert_transitions_retention_days,
                     usage_alerts_days=settings.usage_alerts_retention_days,
                     weighted_points_days=max(days.values()) if all(d > 0 for d in days.values()) else 0)


def alert_policy(settings: Settings) -> AlertPolicy:
    return AlertPolicy(EgressPolicy.parse(settings.alerts_allow_private_targets, settings.alerts_slack_hosts),
                       SecretBox(settings.secrets_key), settings.alerts_max_rules_per_tenant,
                       settings.alerts_max_targets_per_rule, settings.alerts_min_every_s)


def billing(settings: Settings) -> BillingConfig:
    """The jobs' config: the worker's, `tally jobs run`'s, `tally reconcile`'s and `tally billing explain`'s."""
    return BillingConfig(
        database_url=settings.database_url, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix,
        redis_counter_ttl_s=settings.redis_counter_ttl_s,
        meters=meters(settings), meters_poll_s=settings.meters_poll_s,
        limits_refresh_s=settings.usage_limits_refresh_s, limits_ttl_s=settings.usage_limits_ttl_s,
        tick_s=settings.jobs_tick_s, job_runs_retention_days=settings.job_runs_retention_days,
        close_grace_s=settings.close_grace_s, late_horizon_s=settings.late_horizon_s,
        stripe_invoice_grace_s=settings.stripe_invoice_grace_s,
        stripe_api_key=settings.stripe_api_key, stripe_api_base=settings.stripe_api_base,
        stripe_max_attempts=settings.stripe_max_attempts, stripe_breaker_fail_max=settings.stripe_breaker_fail_max,
        stripe_breaker_reset_s=settings.stripe_breaker_reset_s, kafka_bootstrap=settings.kafka_bootstrap,
        counters_topic=settings.topics.counters, alerts_refresh_s=settings.usage_alerts_refresh_s,
        hook=partial(crash_point, armed=settings.crash_at),
        topic_states=partial(_counter_topic_states, settings.kafka_bootstrap, settings.topics.counters),
        backfill=BackfillConfig(
            kafka_bootstrap=settings.kafka_bootstrap, events_topic=settings.topics.events,
            consumer_group=settings.consumer_group, chunk=settings.meters_backfill_chunk,
            pause_s=settings.meters_backfill_pause_s,
            statement_timeout_ms=settings.meters_backfill_statement_timeout_ms,
            budget_s=settings.meters_backfill_budget_s),
    )


def _counter_topic_states(bootstrap: str, topic: str, tenant: str | None) -> dict[str, Any]:
    """The latest state per counter key on the counter topic, read as any downstream reader does."""
    with CounterReader(bootstrap, topic=topic, tenant=tenant) as reader:
        if not reader.wait_caught_up(120):
            raise TimeoutError("the counter topic was not read to its end in 120 s")
        return {state.key: state for state in reader}
