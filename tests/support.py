"""Helpers for tests: run Tally's real processes against an isolated slice of the real services."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tally.settings import ROOT, Settings

LOG_DIR = ROOT / ".local" / "log" / "tests"


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a `tally` subprocess use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"TALLY_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DoubleHandler(BaseHTTPRequestHandler):
    """What every third-party double's handler does alike: read the body, answer with a length, log nothing."""

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A test double's HTTP server on a loopback port of its own, served from a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0, every_s: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class TallyProcess:
    """A `tally ...` subprocess with its output in a log file under .local/log/tests."""

    def __init__(self, name: str, args: list[str], settings: Settings, **extra_env: str) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", *args],
            env=env_for(settings, **extra_env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running(name: str, args: list[str], settings: Settings, **extra_env: str) -> Iterator[TallyProcess]:
    process = TallyProcess(name, args, settings, **extra_env)
    try:
        yield process
    finally:
        process.stop()


_NO_LEADER_YET = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
                  KafkaError._UNKNOWN_PARTITION}


def _watermarks(consumer: Consumer, topic: str, deadline: float) -> dict[int, tuple[int, int]]:
    """(low, high) per partition; a topic created a moment ago may not have its leaders yet."""
    while True:
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
        except KafkaException as exc:
            if exc.args[0].code() not in _NO_LEADER_YET or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Message]:
    """Every message of a topic up to the end offsets it had when called: an empty answer means the
    topic was empty then, never that a fetch was slow. A message carrying an error fails the read."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-reader-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    try:
        deadline = time.monotonic() + timeout_s
        ends = {p: (low, high) for p, (low, high) in _watermarks(consumer, topic, deadline).items() if high > low}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items()])
        out: list[Message] = []
        reached: dict[int, int] = {p: low for p, (low, _) in ends.items()}
        while any(reached[p] < high for p, (_, high) in ends.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: read up to {reached}, end offsets were {ends}")
            for msg in consumer.consume(1000, 0.2):
                error = msg.error()
                if error is None:
                    out.append(msg)
                    reached[msg.partition()] = max(reached[msg.partition()], msg.offset() + 1)
                elif error.code() == KafkaError._PARTITION_EOF:
                    reached[msg.partition()] = max(reached[msg.partition()], msg.offset())
                else:
                    raise AssertionError(f"{topic}: {error}")
        return [m for m in out if m.offset() < ends[m.partition()][1]]
    finally:
        consumer.close()


def readme_blocks(section: str, language: str) -> list[str]:
    """The code blocks of one `## section` of the README, in order."""
    body = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def readme_walkthrough(section: str) -> list[str]:
    """The shell blocks of a README walk-through, refused if one exports a setting or restarts a process: a
    walk-through runs on the stack `up.sh` started, as it runs."""
    blocks = readme_blocks(section, "sh")
    for block in blocks:
        assert not re.search(r"^\s*export |apps\.sh", block, re.M), f"the walk-through restarts or exports:\n{block}"
    return blocks


def run_walkthrough(script: str, gateway_url: str, tenant: str, settings: Settings) -> str:
    """A README shell walk-through as a user pastes it, pointed at a test's gateway, tenant and settings;
    returns its output and fails with it when the script fails."""
    script = (script.replace("http://127.0.0.1:8080", gateway_url)
              .replace(".venv/bin/tally", f"{sys.executable} -m tally.cli")
              .replace("--tenant acme", f"--tenant {tenant}"))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, text=True, capture_output=True,
                         timeout=300, env=env_for(settings))
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    return run.stdout
