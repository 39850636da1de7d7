"""`tally`: one entry point for every service and admin task."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import asyncpg

from tally.settings import Settings, get_settings


def _gateway_config(settings: Settings):  # noqa: ANN202 - ingest's own type
    from ingest.config import GatewayConfig

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

    from ingest.app import create_app

    uvicorn.run(
        create_app(_gateway_config(settings)),
        host=args.host or settings.gateway_host,
        port=args.port or settings.gateway_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_process(_args: argparse.Namespace, settings: Settings) -> int:
    from processors.consumer import Processor, ProcessorConfig
    from sinks.postgres import PostgresSink

    async def run() -> None:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
        config = ProcessorConfig(
            kafka_bootstrap=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            topic=settings.topics.events,
            batch_max_messages=settings.batch_max_messages,
            batch_max_wait_s=settings.batch_max_wait_ms / 1000,
        )
        processor = Processor(config, PostgresSink(pool))
        processor.install_signal_handlers()
        try:
            await processor.run()
        finally:
            await pool.close()

    asyncio.run(run())
    return 0


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from sinks.migrations import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.migrations_dir))
    for migration in applied:
        print(f"applied {migration.version}_{migration.name}")
    print(f"database is up to date ({len(applied)} applied now)")
    return 0


def cmd_topics_create(_args: argparse.Namespace, settings: Settings) -> int:
    from tally.topics import create_topics

    for name, outcome in create_topics(settings).items():
        print(f"{outcome:8} {name}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from ingest import auth

    async def run() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if args.keys_command == "create":
                scopes = args.scope or list(auth.DEFAULT_SCOPES)
                key_id, secret = await auth.create_key(conn, args.tenant, args.name, scopes)
                print(f"id:     {key_id}\ntenant: {args.tenant}\nkey:    {secret}\n(the key is shown once; store it now)")
            elif args.keys_command == "list":
                for row in await auth.list_keys(conn, args.tenant):
                    state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
                    print(f"{row['id']}  {row['tenant']:20} {row['name']:20} {','.join(row['scopes']):30} {state}")
            elif not await auth.revoke_key(conn, args.key_id):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.key_id}")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from tally.demo import run_demo

    return asyncio.run(run_demo(settings, args.url, args.count))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host")
    gateway.add_argument("--port", type=int)
    gateway.set_defaults(func=cmd_gateway)

    sub.add_parser("process", help="run a stream processor (one consumer-group member)").set_defaults(func=cmd_process)
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(func=cmd_migrate)

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

    demo = sub.add_parser("demo", help="post a few events to the gateway and show them persisted")
    demo.add_argument("--url", default=None)
    demo.add_argument("--count", type=int, default=5)
    demo.set_defaults(func=cmd_demo)
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
