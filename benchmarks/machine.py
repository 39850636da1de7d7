"""The machine and the versions a run measured, for RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

import asyncpg

from benchmarks.loadgen import K6
from tally.settings import ROOT, Settings


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unavailable"


def _librdkafka() -> str:
    from confluent_kafka import libversion

    return str(libversion()[0])


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return round(kib / 1024 / 1024, 1)


async def describe(settings: Settings) -> dict[str, str | int | float]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        postgres = await conn.fetchval("show server_version")
    finally:
        await conn.close()
    quix = ROOT / "benchmarks" / ".venv-quix" / "bin" / "python"
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": _first_line(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "revision": _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "kafka": next((ROOT / ".local" / "kafka").glob("libs-*")).name.removeprefix("libs-"),
        "postgresql": postgres,
        "librdkafka": _librdkafka(),
        "confluent_kafka": metadata.version("confluent-kafka"),
        "uvicorn": metadata.version("uvicorn"),
        "starlette": metadata.version("starlette"),
        "k6": " ".join(_first_line([str(K6), "version"]).split()[:2]),
        "wrk": "wrk " + _first_line(["wrk", "-v"]).split()[1],
        "quixstreams": _first_line([str(quix), "-c", "from importlib.metadata import version as v;"
                                    " print(v('quixstreams'), 'with confluent-kafka', v('confluent-kafka'))"]),
    }
