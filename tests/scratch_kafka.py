"""A second single-node broker for tests that stop Kafka, so the shared one is left alone."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tally.settings import ROOT
from tests.support import free_port

KAFKA = ROOT / "deploy" / "local" / "kafka.sh"


class ScratchKafka:
    """deploy/local/kafka.sh with another instance and ports; its data survives stop/start, `reset` removes it."""

    def __init__(self, name: str = "scratch") -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._env = {"KAFKA_INSTANCE": f"{name}-{uuid.uuid4().hex[:6]}", "KAFKA_PORT": str(self.port),
                     "KAFKA_CONTROLLER_PORT": str(free_port())}

    def _run(self, command: str) -> None:
        subprocess.run(["bash", str(KAFKA), command], env={**os.environ, **self._env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")

    def reset(self) -> None:
        self._run("reset")


@pytest.fixture
def scratch_kafka() -> Iterator[ScratchKafka]:
    broker = ScratchKafka()
    broker.start()
    try:
        yield broker
    finally:
        broker.reset()
