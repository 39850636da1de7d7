"""Several runs' results.json trees folded into one: each figure becomes the median of the runs, and
`spread` holds its [min, max] at the same path. Lists (time series) and text come from the first run;
a yes/no (an exact-count verdict) holds only if it held in every run."""

from __future__ import annotations

from statistics import median
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fold(values: list[Any]) -> tuple[Any, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    if all(_number(v) for v in present):
        middle = median(present)
        if all(isinstance(v, int) for v in present):
            middle = round(middle)  # a count stays a count
        return middle, [min(present), max(present)]
    if all(isinstance(v, dict) for v in present):
        keys = [k for k in present[0] if all(k in v for v in present)]
        folded = {k: _fold([v[k] for v in present]) for k in keys}
        medians = {k: m for k, (m, _) in folded.items()}
        spreads = {k: s for k, (_, s) in folded.items() if s is not None}
        return medians, spreads or None
    if all(isinstance(v, bool) for v in present):
        return all(present), None
    return present[0], None


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' shared figures as medians, with `spread` beside them; notes and skipped steps of every run."""
    medians, spreads = _fold(runs)
    medians["spread"] = spreads or {}
    medians["notes"] = [note for run in runs for note in run.get("notes", [])]
    medians["skipped"] = [step for run in runs for step in run.get("skipped", [])]
    return medians
