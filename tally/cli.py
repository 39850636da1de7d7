"""`tally`: one entry point for every service and admin task."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

import asyncpg

from tally.settings import Settings, get_settings


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from tally import wiring
    from tally.ingest.service import run

    return run(wiring.gateway(settings, args.host, args.port))


def cmd_process(_args: argparse.Namespace, settings: Settings) -> int:
    from tally import wiring
    from tally.processors.service import run

    return run(wiring.processor(settings))


def cmd_maintenance(_args: argparse.Namespace, settings: Settings) -> int:
    from tally import wiring
    from tally.sinks.maintenance import Maintenance

    async def run() -> str:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            return (await Maintenance(pool, wiring.retention(settings)).run()).summary()
        finally:
            await pool.close()

    print(asyncio.run(run()))
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
    from tally.schemas.envelope import MAX_BYTES

    if args.keys_command == "create" and not 0 < len(args.tenant.encode()) <= MAX_BYTES["tenant"]:
        print(f"the tenant must be 1 to {MAX_BYTES['tenant']} bytes in UTF-8 (every event carries it)", file=sys.stderr)
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

    from tally import wiring
    from tally.usage.plans import Plan, QuotaExceeded, Refused, check_meters, load_plans, plan_history, save_plan

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.plans_command == "create":
                with open(args.file) as f:
                    try:
                        plan = Plan.model_validate(yaml.safe_load(f))
                        check_meters(plan, await wiring.catalog(settings).fresh(conn, args.tenant))
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
    from tally import wiring
    from tally.alerts import rulesfile, stored

    async def apply(conn: asyncpg.Connection) -> int:
        try:
            with open(args.file) as f:
                wanted = rulesfile.parse(f.read(), await wiring.catalog(settings).fresh(conn, args.tenant))
            done = await rulesfile.apply(conn, args.tenant, wanted, wiring.alert_policy(settings))
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


def cmd_meters(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from tally import wiring
    from tally.edge.problems import Problem
    from tally.meters import api, stored

    def refuse(problems: list[str]) -> int:
        for problem in problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        print(f"{args.file}: refused, nothing applied", file=sys.stderr)
        return 2

    async def apply(conn: asyncpg.Connection) -> int:
        """The file's meters, each created or changed as by PUT /v1/meters/{slug}, all or none."""
        catalog = wiring.catalog(settings)
        with open(args.file) as f:
            document = yaml.safe_load(f)
        entries = document.get("meters") if isinstance(document, dict) else None
        if not isinstance(entries, list) or set(document) != {"meters"}:
            return refuse(["the file holds `meters:`, a list of meters (and nothing else)"])
        wanted, problems = [], []
        for i, entry in enumerate(entries):
            try:
                meter, labels = api.parse(entry)
            except Problem as exc:
                problems += [f"meters[{i}].{e['field']}: {e['message']}" for e in exc.extensions.get("errors", [])]
                continue
            if catalog.built_in(meter.slug):
                problems.append(f"meters[{i}].slug: {meter.slug!r} is a deploy-time meter")
            wanted.append((meter, labels))
        if problems:
            return refuse(problems)
        try:
            async with conn.transaction():
                done = [(meter.slug, await stored.save(conn, args.tenant, meter, labels, settings.meters_max_per_tenant,
                                                       wiring.meter_readers()))
                        for meter, labels in wanted]
        except stored.QuotaExceeded as exc:
            return refuse([str(exc)])
        except stored.Refused as exc:
            return refuse([f"{e['field']}: {e['message']}" for e in exc.errors])
        for slug, outcome in done:
            print(f"  {outcome:9} {slug}")
        print(f"{args.tenant}: {len(done)} meter(s) applied")
        return 0

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.meters_command == "apply":
                return await apply(conn)
            for versions in (await stored.shown(conn, args.tenant)).values():
                newest = versions[-1]
                if not newest["retired"]:
                    backfill = newest["backfill"] or {}
                    print(f"{newest['slug']:24} v{newest['version']:<4} counter {newest['counter']:28} "
                          f"{newest['aggregation']:12} {newest['event_type']:24} backfill {backfill.get('state')}")
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


def cmd_jobs(_args: argparse.Namespace, settings: Settings) -> int:
    from tally import wiring
    from tally.billing.service import run

    return run(wiring.jobs(settings))


def cmd_jobs_run(args: argparse.Namespace, settings: Settings) -> int:
    """One job now, recorded like the worker's runs."""
    from datetime import datetime, timezone

    from tally import wiring
    from tally.billing.context import JobContext
    from tally.billing.jobs import run_job
    from tally.billing.registry import BY_NAME
    from tally.billing.service import refused

    config = wiring.billing(settings)
    if refused(config):
        return 2
    job = BY_NAME.get(args.name)
    if job is None:
        print(f"no job {args.name!r}; jobs: {', '.join(sorted(BY_NAME))}", file=sys.stderr)
        return 1

    async def run() -> int:
        ctx = await JobContext.open(config)
        try:
            now = datetime.now(timezone.utc)
            result = await run_job(ctx, job, args.key or job.key(now), now, force=True)
        finally:
            await ctx.close()
        print(f"{result.job} {result.key}: {result.status} {result.figures}")
        return 0 if result.status == "ok" else 1

    return asyncio.run(run())


def cmd_meters_status(args: argparse.Namespace, settings: Settings) -> int:
    """Each meter version's backfill; readable while it runs (each chunk commits its progress)."""
    from tally.meters.backfill import status

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await status(conn, args.tenant)
        finally:
            await conn.close()

    def at(t: object) -> str:
        return "-" if t is None else t.isoformat(timespec="seconds")  # type: ignore[attr-defined]

    for r in asyncio.run(run()):
        total = "?" if r["total"] is None else r["total"]
        line = (f"{r['tenant']} {r['slug']} v{r['version']}: {r['state']} {r['counted']}/{total} events,"
                f" from {at(r['backfilled_from'])}, started {at(r['started_at'])}, finished {at(r['finished_at'])}")
        if r["state"] == "waiting" and r["waiting_for"]:
            line += f"; waits: {r['waiting_for']}"
        print(line)
    return 0


def cmd_jobs_list(_args: argparse.Namespace, _settings: Settings) -> int:
    from tally.billing.registry import BY_NAME

    for name, job in sorted(BY_NAME.items()):
        print(f"{name:16} {job.doc}")
    return 0


def cmd_billing(args: argparse.Namespace, settings: Settings) -> int:
    """Stripe accounts per tenant, rows that need a person, and the invoice-line proof (billing/)."""
    from datetime import date, datetime, timezone

    from tally import wiring
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
        config = wiring.billing(settings)
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

    from tally import wiring
    from tally.billing.context import JobContext
    from tally.billing.reconcile import reconcile

    async def run() -> int:
        config = wiring.billing(settings)
        ctx = await JobContext.open(config)
        try:
            report = await reconcile(ctx, datetime.fromisoformat(args.since),
                                     datetime.fromisoformat(args.until) if args.until else None, args.tenant,
                                     args.fix, config.topic_states)
        finally:
            await ctx.close()
        for d in report.drift:
            print(f"drift {d.place:8} {d.key}  expected {d.expected}  found {d.found}")
        for counter in report.skipped:
            print(f"not compared: {counter} (its backfill is not done)")
        fixed = f", {len(report.fixed)} counter window(s) fixed" if args.fix else ""
        if args.fix and report.unfixed:
            fixed += f", {len(report.unfixed)} not (their recount took over the fix budget; see the log)"
        print(f"{report.windows} windows from {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC: "
              f"{len(report.drift)} drift(s)" + fixed)
        return 1 if (report.unfixed if args.fix else report.drift) else 0

    return asyncio.run(run())


def cmd_alerts(_args: argparse.Namespace, settings: Settings) -> int:
    from tally import wiring
    from tally.alerts.service import run

    return run(wiring.alerts(settings))


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


def _file_commands(sub: argparse._SubParsersAction, name: str, what: str, func: Callable[..., int], apply_help: str,
                   list_help: str) -> argparse._SubParsersAction:
    """`tally NAME apply FILE --tenant T` and `tally NAME list --tenant T`, the pair every tenant's file-kept
    resource has; the subcommand is in `args.<name>_command`."""
    commands = sub.add_parser(name, help=what).add_subparsers(dest=f"{name.replace('-', '_')}_command", required=True)
    applying = commands.add_parser("apply", help=apply_help)
    applying.add_argument("file")
    for p in (applying, commands.add_parser("list", help=list_help)):
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=func)
    return commands


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

    _file_commands(sub, "alert-rules", "alert rules kept in a YAML file", cmd_alert_rules,
                   "make the tenant's file rules exactly the file's (API rules are left alone); a file with any problem"
                   " is refused whole (exit 2)", "one line per rule: id, origin (api or file), version")
    meters = _file_commands(sub, "meters", "a tenant's own meters (ADR 0140)", cmd_meters,
                            "create or change each meter of a meters file (`meters: [...]`) as PUT /v1/meters/{slug}"
                            " does; a file with any problem is refused whole (exit 2)",
                            "one line per meter: its newest version, counter and backfill")
    meters_status = meters.add_parser("status", help="each version's backfill: state, events counted of the total, "
                                      "from when (older events are past the retention of events), why it waits")
    meters_status.add_argument("--tenant")
    meters_status.set_defaults(func=cmd_meters_status)

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
    jobs.set_defaults(func=cmd_jobs)
    jobs_sub = jobs.add_subparsers()
    jobs_run = jobs_sub.add_parser("run", help="run one job now, recorded like the worker's runs")
    jobs_run.add_argument("name")
    jobs_run.add_argument("--key", help="the period or day to run it for (default: the one due now)")
    jobs_run.set_defaults(func=cmd_jobs_run)
    jobs_sub.add_parser("list", help="the jobs and what they do").set_defaults(func=cmd_jobs_list)


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
