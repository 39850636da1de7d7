"""The allowed imports between packages, written as contracts in pyproject.toml, hold: `meters` imports no
product and not the processor, the processor imports no product, no product imports the processor or the gateway,
the shared edge imports neither, the producer SDK imports only `schemas`, nothing imports the command line, and
no import cycle (ADR 0121, ADR 0128)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_product_importing_the_gateway_breaks_the_contract(tmp_path: Path) -> None:
    """The contract is not vacuous: the same tree with one product module importing `tally.ingest` fails it."""
    shutil.copytree(ROOT / "tally", tmp_path / "tally", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    product = tmp_path / "tally" / "usage" / "figures.py"
    product.write_text(product.read_text() + "\nimport tally.ingest.config  # noqa: E402\n")
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0, done.stdout
    assert "products do not import the gateway BROKEN" in done.stdout
    assert "tally.usage.figures -> tally.ingest.config" in done.stdout
