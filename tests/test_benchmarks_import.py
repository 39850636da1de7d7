"""Every benchmark module imports: a module moved in `tally/` must not leave a benchmark broken until someone runs
it (the chart, drawn with matplotlib from the benchmarks' own environment, aside)."""

from __future__ import annotations

import importlib

import pytest

from tally.settings import ROOT

MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "chart"))


@pytest.mark.parametrize("name", MODULES)
def test_the_benchmark_module_imports(name: str) -> None:
    importlib.import_module(f"benchmarks.{name}")
