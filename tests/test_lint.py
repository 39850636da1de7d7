"""The code keeps the lint rule set of pyproject.toml (`[tool.ruff.lint]`, ADR 0128): no unused or undefined
names, none of bugbear's traps, every `except Exception` marked with its reason, annotations throughout, and no
`noqa` the rule set does not need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "tally", "tests", "benchmarks", "deploy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
