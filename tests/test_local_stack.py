"""The stack scripts: a missing prerequisite ends with a message that says what to do."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tally.settings import ROOT

SCRIPTS = ROOT / "deploy" / "local"


def _path_without(tmp_path: Path, *missing: str, failing: tuple[str, ...] = ()) -> str:
    """A PATH holding every usual command except `missing`; `failing` commands exit 1 (no network)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            target = bin_dir / name
            if name in missing or name in failing or target.exists():
                continue
            target.symlink_to(os.path.join(directory, name))
    for name in failing:
        fake = bin_dir / name
        fake.write_text("#!/bin/sh\necho 'network is unreachable' >&2\nexit 1\n")
        fake.chmod(0o755)
    return str(bin_dir)


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TALLY_STATE_DIR": str(tmp_path / "state"), **env}
    return subprocess.run(["bash", str(SCRIPTS / script), "start"], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_a_taken_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = _run("redis.sh", tmp_path, REDIS_PORT=str(port))
    assert result.returncode == 1
    assert f"port {port} is already taken" in result.stderr
    assert "what to do:" in result.stderr
    assert "Traceback" not in result.stderr


def test_kafka_without_java_says_how_to_install_it(tmp_path: Path) -> None:
    result = _run("kafka.sh", tmp_path, PATH=_path_without(tmp_path, "java"), KAFKA_INSTANCE="nojava")
    assert result.returncode == 1
    assert "Java is not installed" in result.stderr
    assert "openjdk" in result.stderr


def test_kafka_without_network_to_maven_central_says_what_to_do(tmp_path: Path) -> None:
    path = _path_without(tmp_path, failing=("mvn", "curl"))
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = a.getsockname()[1], b.getsockname()[1]
    result = _run("kafka.sh", tmp_path, PATH=path, KAFKA_INSTANCE="offline",
                  KAFKA_PORT=str(ports[0]), KAFKA_CONTROLLER_PORT=str(ports[1]), KAFKA_HOME="")
    assert result.returncode == 1
    assert "Maven could not fetch Kafka's jars" in result.stderr
    assert "KAFKA_HOME" in result.stderr


def test_stripe_mock_without_go_says_how_to_install_it(tmp_path: Path) -> None:
    result = _run("stripe-mock.sh", tmp_path, PATH=_path_without(tmp_path, "go"))
    assert result.returncode == 1
    assert "Go is not installed" in result.stderr
