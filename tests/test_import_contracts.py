"""The allowed imports between packages, written as contracts in pyproject.toml, hold: `meters` imports no
product and not the processor, the processor imports no product, no product imports the processor, the producer
SDK imports only `schemas`, nothing imports the command line, and no import cycle (ADR 0128)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
