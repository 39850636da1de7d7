"""`tally`: one entry point for every service and admin task."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import asyncpg

from tally.settings import Settings, get_settings


def _gateway_config(settings: Settings):  # noqa: ANN202 - ingest's own type
    from tally.ingest.config import GatewayConfig

    return GatewayConfig.from_prefixed(
        settings.model_dump(),
        "gateway_",
        kafka_bootstrap=settings.kafka_bootstrap,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        topics=settings.topics,
        redis_prefix=settings.redis_prefix,
    )


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from tally.ingest.app import create_app

    uvicorn.run(
        create_app(_gateway_config(settings), _products(settings)),
        host=args.host or settings.gateway_host,
        port=args.port or settings.gateway_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=settings.gateway_limit_concurrency,
        forwarded_allow_ips=settings.gateway_trusted_proxies,
    )
    return 0


def _products(settings: Settings) -> list:
    """The product packages whose routes the gateway serves beside intake (`tally.edge.products`)."""
    from tally.alerts.api import AlertsProduct
    from tally.alerts.policy import AlertPolicy
    from tally.query.cache import AnswerCache
    from tally.query.routes import QueryProduct
    from tally.usage.api import UsageProduct

    meters = _meters(settings)
    return [QueryProduct(settings.query_cursor_secret,
                         AnswerCache(settings.redis_url, settings.redis_prefix, settings.query_stats_cache_s),
                         settings.query_stats_max_points),
            UsageProduct(settings.database_url, settings.redis_url, settings.redis_prefix,
                         settings.redis_counter_ttl_s, meters, settings.usage_link_secret, settings.usage_page_poll_s,
                         settings.usage_max_plans, settings.usage_max_subscriptions,
                         [s for s in settings.usage_link_previous_secrets.split(",") if s],
                         settings.usage_links_per_tenant),
            AlertsProduct(meters, settings.query_cursor_secret, AlertPolicy.from_settings(settings))]


def _meters(settings: Settings):  # noqa: ANN202 - schemas' own type
    from pathlib import Path

    from tally.meters.definitions import load_meters

    return load_meters(Path(settings.meters_file) if settings.meters_file else None, settings.meters)


def _processor_config(settings: Settings):  # noqa: ANN202 - processors' own type
    from tally.processors.consumer import ProcessorConfig
    from tally.processors.service import ServiceConfig

    return ServiceConfig(
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
        retention=_retention(settings),
    )


def _retention(settings: Settings):  # noqa: ANN202 - sinks' own type
    from tally.sinks.maintenance import Retention

    return Retention(event_keys_days=settings.event_keys_retention_days, counter_days=settings.counter_retention_days,
                     alert_transitions_days=settings.alert_transitions_retention_days,
                     usage_alerts_days=settings.usage_alerts_retention_days)


def cmd_maintenance(_args: argparse.Namespace, settings: Settings) -> int:
    from tally.sinks.maintenance import Maintenance

    async def run() -> str:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            return (await Maintenance(pool, _retention(settings)).run()).summary()
        finally:
            await pool.close()

    print(asyncio.run(run()))
    return 0


def cmd_process(_args: argparse.Namespace, settings: Settings) -> int:
    from tally.processors.service import run

    asyncio.run(run(_processor_config(settings)))
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from tally.processors import dlq

    selection = dlq.Selection(args.stage, args.error_class, *(args.position or (None, None)))
    letters = [item for item in dlq.read_letters(settings.kafka_bootstrap, settings.topics.dlq) if selection(item)]
    if args.dlq_command == "list":
        for item in letters:
            print(dlq.summary_line(item))
        print(f"{len(letters)} dead letters")
    elif args.dlq_command == "show":
        if not letters:
            print("no dead letter matches", file=sys.stderr)
            return 1
        print("\n\n".join(dlq.detail(item) for item in letters))
    elif args.dry_run:
        print(f"would replay {len(letters)} dead letters")
    else:
        from tally.sinks.kafka import KafkaPublisher

        cut = [item for item in letters if item.letter.truncated_from is not None]
        for item in cut:
            d = item.letter
            print(f"skipped {item.partition}:{item.offset}: truncated; the whole message is at {d.topic}[{d.partition}]"
                  f"@{d.offset} until the topic's retention", file=sys.stderr)
        publisher = KafkaPublisher(settings.kafka_bootstrap, settings.publish_timeout_ms)
        dlq.replay([item for item in letters if item.letter.truncated_from is None], publisher,
                   lambda done, total: print(f"replayed {done}/{total}", flush=True))
    return 0


def _dlq_position(text: str) -> tuple[int, int]:
    partition, _, offset = text.partition(":")
    return int(partition), int(offset)


def _date(text: str):  # noqa: ANN202 - a datetime.date
    from datetime import date

    return date.fromisoformat(text)


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from tally.sinks.migrations import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.migrations_dir))
    for migration in applied:
        print(f"applied {migration.version}_{migration.name}")
    print(f"database is up to date ({len(applied)} applied now)")
    return 0


def cmd_topics_create(_args: argparse.Namespace, settings: Settings) -> int:
    from tally.topics import create_topics

    try:
        created = create_topics(settings)
    except ValueError as exc:  # settings no topic could work with
        print(f"tally topics create: {exc}", file=sys.stderr)
        return 2
    for name, outcome in created.items():
        print(f"{outcome:8} {name}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from tally.ingest import auth
    from tally.schemas.envelope import MAX_TENANT

    if args.keys_command == "create" and not 0 < len(args.tenant.encode()) <= MAX_TENANT:
        print(f"the tenant must be 1 to {MAX_TENANT} bytes in UTF-8 (every event carries it)", file=sys.stderr)
        return 2

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.keys_command == "create":
                scopes = args.scope or list(auth.DEFAULT_SCOPES)
                try:
                    key_id, secret = await auth.create_key(conn, args.tenant, args.name, scopes)
                except ValueError as exc:
                    print(exc, file=sys.stderr)
                    return 2
                print(f"id:     {key_id}\ntenant: {args.tenant}\nkey:    {secret}\n(the key is shown once; store it now)")
            elif args.keys_command == "list":
                for row in await auth.list_keys(conn, args.tenant):
                    state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
                    print(f"{row['id']}  {row['tenant']:20} {row['name']:20} {','.join(row['scopes']):30} {state}")
            elif not await auth.revoke_key(conn, args.key_id):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.key_id} and the usage links it minted; a gateway that cached the key accepts it"
                      " for up to "
                      f"{settings.gateway_key_cache_ttl_s:g} s more (TALLY_GATEWAY_KEY_CACHE_TTL_S)")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_plans(args: argparse.Namespace, settings: Settings) -> int:
    import yaml
    from pydantic import ValidationError

    from tally.usage.plans import Plan, QuotaExceeded, Refused, check_meters, load_plans, plan_history, save_plan

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.plans_command == "create":
                with open(args.file) as f:
                    try:
                        plan = Plan.model_validate(yaml.safe_load(f))
                        check_meters(plan, _meters(settings))
                        version = await save_plan(conn, args.tenant, plan, settings.usage_max_plans)
                    except (ValidationError, Refused, QuotaExceeded) as exc:
                        print(f"{args.file}: not a valid plan\n{exc}", file=sys.stderr)
                        return 1
                print(f"saved plan {plan.id} version {version} for {args.tenant}: {len(plan.meters)} meter(s)")
            elif args.plans_command == "show":
                for v in await plan_history(conn, args.tenant, args.id):
                    print(f"v{v['version']:<4} from {v['effective_at'] or 'the beginning'}  report {v['report']}  "
                          + ", ".join(f"{m['meter']} included {m['included']}" for m in v["meters"]))
            else:
                for version, plan in await load_plans(conn, args.tenant):
                    for m in plan.meters:
                        print(f"{plan.id:16} v{version:<4} {m.meter:16} included {m.included} {m.limit_mode:4} "
                              f"overage {m.overage_price}/unit thresholds {m.thresholds}")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_alert_rules(args: argparse.Namespace, settings: Settings) -> int:
    from tally.alerts import rulesfile, stored
    from tally.alerts.policy import AlertPolicy

    async def apply(conn: asyncpg.Connection) -> int:
        try:
            with open(args.file) as f:
                wanted = rulesfile.parse(f.read(), _meters(settings))
            done = await rulesfile.apply(conn, args.tenant, wanted, AlertPolicy.from_settings(settings))
        except rulesfile.Refused as exc:
            for problem in exc.problems:
                print(f"{args.file}: {problem}", file=sys.stderr)
            print(f"{args.file}: refused, nothing applied", file=sys.stderr)
            return 2
        print(f"{args.tenant}: {len(done.saved)} saved, {len(done.unchanged)} unchanged, {len(done.deleted)} deleted")
        for verb, ids in (("saved", done.saved), ("deleted", done.deleted)):
            for rule_id in ids:
                print(f"  {verb} {rule_id}")
        return 0

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.alert_rules_command == "apply":
                return await apply(conn)
            for row in await stored.listing(conn, args.tenant):
                print(f"{row['id']:32} {row['origin']:4} v{row['version']:<4} {row['updated_at']:%Y-%m-%d %H:%M}")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_subscriptions(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from tally.usage.plans import (QuotaExceeded, Refused, SubscriptionChange, UnknownPlan, change_subscription,
                             load_subscriptions, subscription_history)

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.subscriptions_command == "set":
                named = {"plan_id": args.plan, "stripe_customer_id": args.stripe_customer,
                         "anchor_day": args.anchor_day, "time_zone": args.time_zone, "start_date": args.start_date}
                try:
                    change = SubscriptionChange(**{k: v for k, v in named.items() if v is not None})
                    sub = await change_subscription(conn, args.tenant, args.subject, change,
                                                    settings.usage_max_subscriptions)
                except ValidationError as exc:
                    print(f"not a valid subscription\n{exc}", file=sys.stderr)
                    return 1
                except (Refused, QuotaExceeded, UnknownPlan) as exc:
                    print(exc, file=sys.stderr)
                    return 1
                print(f"{args.subject} is on plan {sub.plan_id} (anchor day {sub.anchor_day}, {sub.time_zone}, from "
                      f"{sub.start_date}, stripe {sub.stripe_customer_id or '-'})")
            elif args.subscriptions_command == "show":
                for v in await subscription_history(conn, args.tenant, args.subject):
                    print(f"v{v['version']:<4} {v['plan_id']:16} stripe {v['stripe_customer_id'] or '-':24} "
                          f"from {v['effective_at'] or 'the beginning'}")
            else:
                for tenant, sub in await load_subscriptions(conn, args.tenant):
                    print(f"{tenant:20} {sub.subject:20} {sub.plan_id:16} day {sub.anchor_day:2} {sub.time_zone:20} "
                          f"from {sub.start_date} stripe {sub.stripe_customer_id or '-'}")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def _billing_config(settings: Settings):  # noqa: ANN202 - billing's own type
    from functools import partial

    from tally.billing.context import BillingConfig
    from tally.processors.faults import crash_point

    return BillingConfig(
        database_url=settings.database_url, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix,
        redis_counter_ttl_s=settings.redis_counter_ttl_s,
        meters=_meters(settings),
        limits_refresh_s=settings.usage_limits_refresh_s, limits_ttl_s=settings.usage_limits_ttl_s,
        tick_s=settings.jobs_tick_s,
        close_grace_s=settings.close_grace_s, late_horizon_s=settings.late_horizon_s,
        stripe_invoice_grace_s=settings.stripe_invoice_grace_s,
        stripe_api_key=settings.stripe_api_key, stripe_api_base=settings.stripe_api_base,
        stripe_max_attempts=settings.stripe_max_attempts, stripe_breaker_fail_max=settings.stripe_breaker_fail_max,
        stripe_breaker_reset_s=settings.stripe_breaker_reset_s, kafka_bootstrap=settings.kafka_bootstrap,
        counters_topic=settings.topics.counters, alerts_refresh_s=settings.usage_alerts_refresh_s,
        hook=partial(crash_point, armed=settings.crash_at),
        topic_states=partial(_counter_topic_states, settings),
    )


def _counter_topic_states(settings: Settings, tenant: str | None) -> dict:
    """The latest state per counter key on the counter topic, read as any downstream reader does."""
    from tally.counters import CounterReader

    with CounterReader(settings.kafka_bootstrap, topic=settings.topics.counters, tenant=tenant) as reader:
        if not reader.wait_caught_up(120):
            raise TimeoutError("the counter topic was not read to its end in 120 s")
        return {state.key: state for state in reader}


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from tally.billing.context import JobContext
    from tally.billing.jobs import run_job, work
    from tally.billing.registry import BY_NAME, SCHEDULED

    config = _billing_config(settings)
    if args.jobs_command != "list" and config.problems():
        for problem in config.problems():
            print(f"tally jobs: {problem}", file=sys.stderr)
        return 2

    async def run() -> int:
        ctx = await JobContext.open(config)
        try:
            if args.jobs_command == "run":
                job = BY_NAME.get(args.name)
                if job is None:
                    print(f"no job {args.name!r}; jobs: {', '.join(sorted(BY_NAME))}", file=sys.stderr)
                    return 1
                from datetime import datetime, timezone

                now = datetime.now(timezone.utc)
                result = await run_job(ctx, job, args.key or job.key(now), now, force=True)
                print(f"{result.job} {result.key}: {result.status} {result.figures}")
                return 0 if result.status == "ok" else 1
            if args.jobs_command == "list":
                for name, job in sorted(BY_NAME.items()):
                    print(f"{name:16} {job.doc}")
                return 0
            if settings.jobs_metrics_port:
                from prometheus_client import start_http_server

                start_http_server(settings.jobs_metrics_port, settings.processor_metrics_host)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await work(ctx, SCHEDULED, stop)
            return 0
        finally:
            await ctx.close()

    return asyncio.run(run())


def cmd_billing(args: argparse.Namespace, settings: Settings) -> int:
    """Stripe accounts per tenant, rows that need a person, and the invoice-line proof (billing/)."""
    from datetime import date, datetime, timezone

    from tally.billing import accounts, explain, stripe_report
    from tally.billing.context import JobContext

    async def account(conn: asyncpg.Connection) -> int:
        if args.account_command == "set":
            try:
                await accounts.set_account(conn, args.tenant, args.account)
            except accounts.InvalidAccount as exc:
                print(exc, file=sys.stderr)
                return 2
            print(f"{args.tenant}: Stripe reports go to {args.account} (Stripe-Account header)")
            return 0
        for tenant, acct in await accounts.listing(conn):
            print(f"{tenant:24} {acct or '-  (not reported: no Stripe account)'}")
        return 0

    async def rows(conn: asyncpg.Connection) -> int:
        found = await stripe_report.attention(conn, args.tenant)
        for r in found:
            print(f"{r['id']:>8} {r['status']:6} {r['tenant']:16} {r['subject']:16} {r['meter']:12} {r['period_label']}"
                  f" {r['kind']:10} {r['value']:>10} {r['error']}")
        print(f"{len(found)} row(s) need a person: failed rows `tally billing retry` after the fix, held rows "
              "`tally billing resolve` after checking Stripe (`tally billing explain`)")
        return 1 if found else 0

    async def decide(conn: asyncpg.Connection) -> int:
        if args.billing_command == "retry":
            count = await stripe_report.retry(conn, args.tenant, args.id)
            print(f"{count} refused row(s) released: the next report (tally jobs run stripe_report) plans their "
                  "quantity again with the subscription's customer, meter and account as they are now")
            return 0 if count else 1
        if not await stripe_report.resolve(conn, args.tenant, args.id, args.stripe_has_it):
            print(f"{args.tenant} has no held row {args.id}", file=sys.stderr)
            return 1
        print(f"row {args.id}: " + ("counted as sent" if args.stripe_has_it else "the next report plans it again"))
        return 0

    async def proof() -> int:
        config = _billing_config(settings)
        ctx = await JobContext.open(config)
        try:
            found = await explain.explain(ctx, args.tenant, args.subject, args.period or date.today(),
                                          None if args.no_stripe else stripe_report.StripeSender(config),
                                          datetime.now(timezone.utc))
        except explain.NothingToExplain as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            await ctx.close()
        print("\n".join(explain.lines(found)))
        return 0 if found.agrees else 1

    async def run() -> int:
        if args.billing_command == "explain":
            return await proof()
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.billing_command == "account":
                return await account(conn)
            if args.billing_command == "rows":
                return await rows(conn)
            return await decide(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def _billing_parser(sub: argparse._SubParsersAction) -> None:
    billing = sub.add_parser("billing", help="Stripe accounts, refused and held report rows, the invoice-line proof")
    commands = billing.add_subparsers(dest="billing_command", required=True)
    account = commands.add_parser("account", help="each tenant's own Stripe account").add_subparsers(
        dest="account_command", required=True)
    account_set = account.add_parser("set", help="send the tenant's reports to this connected account")
    account_set.add_argument("--tenant", required=True)
    account_set.add_argument("--account", required=True, help="acct_...")
    account_list = account.add_parser("list", help="tenants with subscriptions and their account (none: not reported)")
    rows = commands.add_parser("rows", help="report rows Stripe refused (failed) or that wait for a decision (held)")
    rows.add_argument("--tenant")
    retry = commands.add_parser("retry", help="after fixing their cause, let refused rows be planned again")
    retry.add_argument("--id", type=int, help="one row (default: all of the tenant's failed rows)")
    resolve = commands.add_parser("resolve", help="decide a held row after checking Stripe")
    resolve.add_argument("--id", type=int, required=True)
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument("--stripe-has-it", action="store_true", help="Stripe has the event: count it as sent")
    decision.add_argument("--stripe-lacks-it", action="store_true", help="Stripe has not: plan its quantity again")
    proof = commands.add_parser("explain", help="per meter: hour windows, raw events, report rows, Stripe's summary,"
                                " and whether they agree (exit 1 if not)")
    proof.add_argument("--subject", required=True)
    proof.add_argument("--period", type=_date, help="a date inside the period (default today)")
    proof.add_argument("--no-stripe", action="store_true", help="do not ask Stripe for its summary")
    for p in (retry, resolve, proof):
        p.add_argument("--tenant", required=True)
    for p in (account_set, account_list, rows, retry, resolve, proof):
        p.set_defaults(func=cmd_billing)


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from tally.billing.context import JobContext
    from tally.billing.reconcile import reconcile

    async def run() -> int:
        config = _billing_config(settings)
        ctx = await JobContext.open(config)
        try:
            report = await reconcile(ctx, datetime.fromisoformat(args.since),
                                     datetime.fromisoformat(args.until) if args.until else None, args.tenant,
                                     args.fix, config.topic_states)
        finally:
            await ctx.close()
        for d in report.drift:
            print(f"drift {d.place:8} {d.key}  expected {d.expected}  found {d.found}")
        fixed = f", {len(report.fixed)} counter window(s) fixed" if args.fix else ""
        if args.fix and report.unfixed:
            fixed += f", {len(report.unfixed)} not (their recount took over the fix budget; see the log)"
        print(f"{report.windows} windows from {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC: "
              f"{len(report.drift)} drift(s)" + fixed)
        return 1 if (report.unfixed if args.fix else report.drift) else 0

    return asyncio.run(run())


def cmd_alerts(_args: argparse.Namespace, settings: Settings) -> int:
    import signal
    from functools import partial

    from tally.alerts.delivery import DeliveryPolicy
    from tally.alerts.policy import AlertPolicy
    from tally.alerts.service import AlertsConfig, run
    from tally.processors.faults import crash_point

    config = AlertsConfig(
        database_url=settings.database_url, kafka_bootstrap=settings.kafka_bootstrap,
        counters_topic=settings.topics.counters, alerts_topic=settings.topics.alerts,
        meters=_meters(settings), policy=AlertPolicy.from_settings(settings),
        tick_s=settings.alerts_tick_s, rules_reload_s=settings.alerts_rules_reload_s,
        hook=partial(crash_point, armed=settings.crash_at),
        delivery=DeliveryPolicy(
            max_attempts=settings.alerts_delivery_max_attempts, backoff_s=settings.alerts_delivery_backoff_s,
            backoff_max_s=settings.alerts_delivery_backoff_max_s, timeout_s=settings.alerts_delivery_timeout_s,
            concurrency=settings.alerts_delivery_concurrency, per_target=settings.alerts_delivery_per_target,
            poll_s=settings.alerts_delivery_poll_s))
    if settings.alerts_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.alerts_metrics_port, settings.processor_metrics_host)
        except OSError as exc:  # metrics never stop alerting
            logging.getLogger("tally.alerts").warning("metrics port %d unavailable: %s", settings.alerts_metrics_port,
                                                      exc)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(config, stop)
        return 0

    return asyncio.run(main())


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from tally.demo import run_demo

    return asyncio.run(run_demo(settings, args.url, args.count))


# `tally status`: the local stack's processes as supervisord runs them (deploy/local/apps.sh, docs/adr/0085).
def _health_url(name: str, settings: Settings) -> str | None:
    """Where each process answers when it is healthy: the gateway's readiness, else its /metrics port."""
    def local(host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    ports = {"processor": settings.processor_metrics_port, "jobs": settings.jobs_metrics_port,
             "alerts": settings.alerts_metrics_port}
    if name == "gateway":
        return f"http://{local(settings.gateway_host)}:{settings.gateway_port}/readyz"
    port = ports.get(name)
    return f"http://{local(settings.processor_metrics_host)}:{port}/metrics" if port else None


def _health(url: str | None) -> tuple[bool, str]:
    import httpx

    if url is None:
        return True, "no health port"
    try:
        answer = httpx.get(url, timeout=3)
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__}"
    return answer.is_success, f"{url.rsplit('/', 1)[1]} {answer.status_code}"


def _restarts(main_log: str) -> dict[str, int]:
    """Starts of each process since supervisord started, less the first: supervisord counts none itself."""
    import re
    from collections import Counter

    since = main_log.rsplit("supervisord started with pid", 1)[-1]
    spawns = Counter(re.findall(r"spawned: '([^']+)' with pid", since))
    return {name: count - 1 for name, count in spawns.items()}


def cmd_status(_args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta
    from xmlrpc.client import ServerProxy

    from supervisor.xmlrpc import SupervisorTransport

    logging.getLogger("httpx").setLevel(logging.WARNING)
    socket_path = settings.state_dir / "run" / "supervisor.sock"
    if not socket_path.exists():
        print(f"supervisord is not running (no {socket_path}); start the stack with: bash deploy/local/up.sh",
              file=sys.stderr)
        return 2
    rpc = ServerProxy("http://localhost", transport=SupervisorTransport(None, None, f"unix://{socket_path}"))
    try:
        processes = rpc.supervisor.getAllProcessInfo()
        restarts = _restarts(rpc.supervisor.readLog(0, 0))
    except OSError as exc:
        print(f"supervisord does not answer on {socket_path} ({exc}); start it with: bash deploy/local/up.sh",
              file=sys.stderr)
        return 2
    print(f"{'process':10} {'state':9} {'pid':>7} {'uptime':>9} {'restarts':>8}  health")
    all_well = True
    for p in processes:
        running = p["statename"] == "RUNNING"
        healthy, health = _health(_health_url(p["name"], settings)) if running else (False, p["spawnerr"] or "-")
        uptime = str(timedelta(seconds=p["now"] - p["start"])) if running else "-"
        print(f"{p['name']:10} {p['statename']:9} {p['pid'] or '-':>7} {uptime:>9} {restarts.get(p['name'], 0):>8}  "
              f"{'healthy' if healthy else 'UNHEALTHY'} ({health})")
        all_well &= running and healthy
    return 0 if all_well else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host")
    gateway.add_argument("--port", type=int)
    gateway.set_defaults(func=cmd_gateway)

    sub.add_parser("process", help="run a stream processor (one consumer-group member)").set_defaults(func=cmd_process)
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("maintenance", help="create events partitions (also for months left in the default one) and"
                   " prune event keys and counter windows past their retention").set_defaults(func=cmd_maintenance)

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="one line per dead letter: position, stage, error, origin, message")
    dlq_show = dlq.add_parser("show", help="headers and payload of dead letters")
    dlq_show.add_argument("position", type=_dlq_position, help="PARTITION:OFFSET in the dead-letter topic")
    dlq_replay = dlq.add_parser("replay", help="re-publish dead letters to their source topic (safe to repeat)")
    dlq_replay.add_argument("--dry-run", action="store_true")
    for p in (dlq_list, dlq_replay):
        p.add_argument("--position", type=_dlq_position, help="only PARTITION:OFFSET")
    for p in (dlq_list, dlq_show, dlq_replay):
        p.add_argument("--stage", help="only letters of this stage (decode, validate, meter, store, conflict)")
        p.add_argument("--error-class", help="only letters of this error class")
        p.set_defaults(func=cmd_dlq)

    topics = sub.add_parser("topics", help="manage Kafka topics").add_subparsers(dest="topics_command", required=True)
    topics.add_parser("create", help="create the topics (idempotent)").set_defaults(func=cmd_topics_create)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant; prints the secret once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--scope", action="append", help="repeatable; default events:write and logs:write")
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.set_defaults(func=cmd_keys)

    plans = sub.add_parser("plans", help="usage plans").add_subparsers(dest="plans_command", required=True)
    plan_create = plans.add_parser("create", help="create or replace a plan from a YAML or JSON file")
    plan_create.add_argument("--file", required=True)
    plan_list = plans.add_parser("list", help="one line per plan and meter (current versions)")
    plan_show = plans.add_parser("show", help="every version of one plan")
    plan_show.add_argument("--id", required=True)
    for p in (plan_create, plan_list, plan_show):
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=cmd_plans)

    alert_rules = sub.add_parser("alert-rules", help="alert rules kept in a YAML file").add_subparsers(
        dest="alert_rules_command", required=True)
    rules_apply = alert_rules.add_parser("apply", help="make the tenant's file rules exactly the file's (API rules are"
                                         " left alone); a file with any problem is refused whole (exit 2)")
    rules_apply.add_argument("file")
    rules_list = alert_rules.add_parser("list", help="one line per rule: id, origin (api or file), version")
    for p in (rules_apply, rules_list):
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=cmd_alert_rules)

    subs = sub.add_parser("subscriptions", help="subjects' plans").add_subparsers(dest="subscriptions_command",
                                                                                   required=True)
    sub_set = subs.add_parser("set", help="subscribe a subject, or change only what is named (a plan or customer "
                              "change is a new version from now; the anchor is fixed once a period began)")
    sub_set.add_argument("--tenant", required=True)
    sub_set.add_argument("--subject", required=True)
    sub_set.add_argument("--plan", help="required to create a subscription")
    sub_set.add_argument("--stripe-customer")
    sub_set.add_argument("--anchor-day", type=int, help="on creation default 1")
    sub_set.add_argument("--time-zone", help="on creation default UTC")
    sub_set.add_argument("--start-date", type=_date, help="YYYY-MM-DD; on creation default today")
    sub_list = subs.add_parser("list")
    sub_list.add_argument("--tenant")
    sub_show = subs.add_parser("show", help="every version of one subscription")
    sub_show.add_argument("--tenant", required=True)
    sub_show.add_argument("--subject", required=True)
    for p in (sub_set, sub_list, sub_show):
        p.set_defaults(func=cmd_subscriptions)

    jobs = sub.add_parser("jobs", help="the billing jobs worker (hard limits, Stripe reports, close, reconcile)")
    jobs.set_defaults(func=cmd_jobs, jobs_command="work")
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    jobs_run = jobs_sub.add_parser("run", help="run one job now, recorded like the worker's runs")
    jobs_run.add_argument("name")
    jobs_run.add_argument("--key", help="the period or day to run it for (default: the one due now)")
    jobs_sub.add_parser("list", help="the jobs and what they do")

    rec = sub.add_parser("reconcile", help="recompute counter windows from raw events; compare counters, Redis, "
                                           "the counter topic and Stripe reports (exit 1 on drift)")
    rec.add_argument("--since", required=True, help="ISO date or time (from the start of that UTC day)")
    rec.add_argument("--until", help="ISO time; default the end of today (UTC)")
    rec.add_argument("--tenant")
    rec.add_argument("--fix", action="store_true", help="repair drifting windows under their row locks, through the "
                                                        "outbox (safe while the processor counts)")
    rec.set_defaults(func=cmd_reconcile)

    _billing_parser(sub)

    sub.add_parser("alerts", help="evaluate alert rules on the counter topic; publish and deliver transitions"
                   ).set_defaults(func=cmd_alerts)

    demo = sub.add_parser("demo", help="post a few events to the gateway and show them persisted")
    demo.add_argument("--url", default=None)
    demo.add_argument("--count", type=int, default=5)
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("status", help="the local stack's processes under supervisord: state, pid, uptime, restarts, "
                   "health (exit 1 if one is not running and healthy)").set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    settings = get_settings()
    try:
        return args.func(args, settings)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"tally {args.command}: {exc}", file=sys.stderr)
        print("  is the stack up? start it with: bash deploy/local/up.sh", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
