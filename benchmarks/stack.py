"""An isolated slice of the shared services for one benchmark run, and the processes started on it.

Each run gets its own database, topic prefix, Redis prefix and consumer groups, and starts its
own gateway, processors and bare servers on free ports; nothing shared is stopped or touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
from confluent_kafka.admin import AdminClient

from tally.ingest import auth
from tally.sinks.migrations import migrate
from tally.settings import ROOT, Settings
from tally.topics import create_topics

VENV_BIN = ROOT / ".venv" / "bin"
# `python -m` from the checkout, not the venv's `tally` script: that one runs whichever checkout the
# venv was installed from, which need not be the one being measured.
TALLY = [str(VENV_BIN / "python"), "-m", "tally.cli"]
OUT = ROOT / "benchmarks" / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a `tally` subprocess use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    for name, value in settings.model_dump().items():
        env[f"TALLY_{name.upper()}"] = str(value)
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    port: int | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Bench:
    """The run's isolated settings, its API key and every process it started."""

    base: Settings
    run: str
    settings: Settings
    key: str = ""
    services: list[Service] = field(default_factory=list)

    @classmethod
    def create(cls, base: Settings) -> "Bench":
        run = time.strftime("%m%d%H%M%S")
        parts = urlsplit(base.database_url)
        settings = base.model_copy(update={
            "database_url": urlunsplit(parts._replace(path=f"/tally_bench_{run}")),
            "topic_prefix": f"bench.{run}.",
            "redis_prefix": f"bench:{run}:",
            "consumer_group": f"bench-{run}",
        })
        return cls(base, run, settings)

    @property
    def log_dir(self) -> Path:
        path = OUT / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scoped(self, name: str, **update: object) -> Settings:
        """Settings with a topic prefix and consumer group of this part of the run."""
        return self.settings.model_copy(update={
            "topic_prefix": f"{self.settings.topic_prefix}{name}.",
            "consumer_group": f"{self.settings.consumer_group}-{name}",
            **update,
        })

    async def create_database(self, name: str) -> str:
        """An empty database; its URL. Teardown drops the run's and those named after it (`<run's name>_<part>`)."""
        conn = await asyncpg.connect(self.base.database_url)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        return urlunsplit(urlsplit(self.settings.database_url)._replace(path=f"/{name}"))

    async def setup(self) -> None:
        await self.create_database(self.db_name)
        await migrate(self.settings.database_url, self.settings.migrations_dir)
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            _, self.key = await auth.create_key(conn, "bench", "bench", ["events:write", "logs:write"])
        finally:
            await conn.close()

    @property
    def db_name(self) -> str:
        return urlsplit(self.settings.database_url).path.lstrip("/")

    def topics(self, settings: Settings) -> None:
        create_topics(settings)

    def start(self, name: str, argv: list[str], settings: Settings, port: int | None = None,
              health: str | None = None, checkout: Path = ROOT, **env: str) -> Service:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(argv, cwd=checkout, env=env_for(settings, **env), stdout=log,
                                   stderr=subprocess.STDOUT)
        service = Service(name, process, port)
        self.services.append(service)
        if health:
            wait_http(health, process, name)
        return service

    def gateway(self, settings: Settings, name: str = "gateway", checkout: Path = ROOT, **env: str) -> Service:
        """A gateway of this checkout, or of another one (its code, this checkout's virtual environment)."""
        port = free_port()
        return self.start(name, [*TALLY, "gateway", "--port", str(port)], settings, port,
                          health=f"http://127.0.0.1:{port}/healthz", checkout=checkout, **env)

    def processor(self, settings: Settings, name: str = "processor") -> Service:
        return self.start(name, [*TALLY, "process"], settings)

    def bare(self, app: str) -> Service:
        port = free_port()
        argv = [str(VENV_BIN / "python"), "-m", "uvicorn", f"benchmarks.bare:{app}", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", "--no-access-log"]
        service = self.start(f"bare-{app}", argv, self.settings, port)
        wait_port(port, service.process, service.name)
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        self.services.remove(service)

    async def teardown(self, keep: bool = False) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if keep:
            return
        conn = await asyncpg.connect(self.base.database_url)
        try:
            # The run's database and those a part made beside it, named after it (`<name>_<part>`).
            names = await conn.fetch("select datname from pg_database where datname = $1 or starts_with(datname, $2)",
                                     self.db_name, f"{self.db_name}_")
            for (name,) in names:
                for attempt in range(30):
                    try:
                        await conn.execute(f'drop database if exists "{name}" with (force)')
                        break
                    except asyncpg.InsufficientPrivilegeError:
                        # A session of another role (an autovacuum worker after the bulk load) is still in it:
                        # it ends by itself within seconds, and FORCE may not end it for us.
                        if attempt == 29:
                            raise
                        await asyncio.sleep(1)
        finally:
            await conn.close()
        admin = AdminClient({"bootstrap.servers": self.base.kafka_bootstrap})
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(self.settings.topic_prefix)]
        if names:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in admin.delete_topics(names).values()),
                                 return_exceptions=True)
        client = redis.Redis.from_url(self.base.redis_url)
        keys = list(client.scan_iter(f"{self.settings.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, timeout_s: float,
              what: str) -> None:
    """Until `ready()` (an OSError counts as not yet), failing early if the process exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited during start-up; see benchmarks/out/logs/{name}.log")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not {what} within {timeout_s:.0f}s")


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200


def _listens(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return True


def wait_http(url: str, process: subprocess.Popen[bytes], name: str, timeout_s: float = 30.0) -> None:
    _wait_for(lambda: _answers(url), process, name, timeout_s, f"answer {url}")


def wait_port(port: int, process: subprocess.Popen[bytes], name: str, timeout_s: float = 20.0) -> None:
    _wait_for(lambda: _listens(port), process, name, timeout_s, f"listen on {port}")
