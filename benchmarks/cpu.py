"""CPU time per process group from /proc, over a measured interval, divided by the events it carried.

Throughput on two shared cores mostly measures the sharing; CPU per event is the figure that carries
to a bigger machine. Groups: the gateway, the processors (or the peer), the PostgreSQL backends
serving the run's database, the Kafka broker, and the load generator (its children's CPU time).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

import asyncpg

TICKS_S = os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process and all its threads so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS_S  # utime, stime: fields 14 and 15 of stat


def children_seconds() -> float:
    """CPU seconds of the children this process has waited for (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def listener_pid(port: int) -> int | None:
    """The process listening on a local TCP port (the Kafka broker), found through its socket inode."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                inodes.add(f"socket:[{cols[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


async def backend_pids(database_url: str, database: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        me = await conn.fetchval("select pg_backend_pid()")
        rows = await conn.fetch("select pid from pg_stat_activity where datname = $1", database)
    finally:
        await conn.close()
    return [r["pid"] for r in rows if r["pid"] != me]


class CpuMeter:
    """Snapshots of CPU seconds per group; `per_event` turns two of them into µs per event per group."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], database_url: str, database: str,
                 load_generator: bool) -> None:
        self.groups = groups
        self.database_url = database_url
        self.database = database
        self.load_generator = load_generator

    async def snapshot(self) -> dict[str, dict[int, float]]:
        found: dict[str, dict[int, float]] = {}
        pids = dict(self.groups)
        pids["postgresql"] = lambda: []
        for name, group in pids.items():
            found[name] = {pid: s for pid in group() if (s := process_seconds(pid)) is not None}
        for pid in await backend_pids(self.database_url, self.database):
            if (s := process_seconds(pid)) is not None:
                found["postgresql"][pid] = s
        if self.load_generator:
            found["load_generator"] = {0: children_seconds()}
        return found

    @staticmethod
    def per_event(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
                  events: int) -> dict[str, float | None]:
        """µs of CPU per event per group. A process that started within the interval counts from zero;
        one that ended within it is missed (every measured process outlives its interval)."""
        out: dict[str, float | None] = {}
        for name, now in after.items():
            then = before.get(name, {})
            seconds = sum(s - then.get(pid, 0.0) for pid, s in now.items())
            out[name] = seconds * 1e6 / events if events else None
        return out
