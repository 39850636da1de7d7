"""A throw-away PostgreSQL 15 cluster of a test's own, so a test can stop its database without
touching the shared one."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tally.sinks.migrations import migrate
from tally.settings import Settings
from tests.support import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


class ScratchPostgres:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/tally"

    def _run(self, *args: str) -> None:
        command = [str(BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")


@contextmanager
def scratch_postgres(settings: Settings) -> Iterator[ScratchPostgres]:
    """initdb into a temporary directory, start on a free port, create and migrate the tally database."""
    directory = Path(tempfile.mkdtemp(prefix="tally-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    pg = ScratchPostgres(directory, free_port())
    pg._run("initdb", "-D", str(directory / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg.start()
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-c", "create database tally"],
                       check=True, capture_output=True, timeout=30)
        asyncio.run(migrate(pg.url, settings.migrations_dir))
        yield pg
    finally:
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
