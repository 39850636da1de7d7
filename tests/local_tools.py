"""The Go-built tools of deploy/local/ (helm, kubeconform, promtool), built on first use into .local/bin.

deploy/local/test.sh builds them before the suite; a test that still finds one missing builds it and
fails, never skips, when that is impossible: the checks they run are part of the test command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tally.settings import ROOT


def built(tool: str) -> Path:
    """The newest .local/bin/<tool>-<version>, built by deploy/local/<tool>.sh if absent."""
    found = sorted((ROOT / ".local" / "bin").glob(f"{tool}-*"))
    if not found:
        build = subprocess.run(["bash", str(ROOT / "deploy" / "local" / f"{tool}.sh")], capture_output=True,
                               text=True, timeout=3000)
        found = sorted((ROOT / ".local" / "bin").glob(f"{tool}-*"))
        if not found:
            pytest.fail(f"{tool} could not be built by deploy/local/{tool}.sh: {build.stderr.strip()[-800:]}")
    return found[-1]
