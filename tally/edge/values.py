"""What a parsed JSON value may hold: bounded nesting, no NUL characters, no integer beyond 64 bits.

orjson parses 1,024 levels but encodes only 254, turns integers beyond 64 bits into floats and
keeps NUL characters that PostgreSQL cannot store; each would end as a 500, a changed number or a
dead letter. The raw body tells cheaply whether a value can hold any of these at all, so the walk
over the parsed value runs only for the rare body that might.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tally.edge.problems import Problem
from tally.schemas.envelope import MAX_NESTING

LONG_DIGITS = re.compile(rb"\d{19}")
INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson keeps exact


@dataclass(frozen=True, slots=True)
class Hazards:
    """What the raw body might hold; False means the value surely holds none of it."""

    deep: bool
    nul: bool

    @classmethod
    def of(cls, body: bytes) -> "Hazards":
        return cls(deep=body.count(b"[") + body.count(b"{") > MAX_NESTING, nul=b"\\u0000" in body)


UNKNOWN = Hazards(deep=True, nul=True)  # for a value whose raw body is not at hand: walk it


def invalid(field: str, message: str) -> Problem:
    return Problem(400, "Invalid JSON value", f"{field}: {message}", errors=[{"field": field, "message": message}])


def check(value: Any, hazards: Hazards, field: str = "(body)") -> None:
    """Refuse a value nested deeper than MAX_NESTING or holding a NUL character (in a key or a string)."""
    if not (hazards.deep or hazards.nul):
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_NESTING:
                raise invalid(field, f"nested deeper than {MAX_NESTING} levels")
            for key, inner in item.items():
                if "\x00" in key:
                    raise invalid(field, "holds a NUL character")
                stack.append((inner, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_NESTING:
                raise invalid(field, f"nested deeper than {MAX_NESTING} levels")
            stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, str) and "\x00" in item:
            raise invalid(field, "holds a NUL character")


def _exact_int(text: str) -> int:
    number = int(text)
    if not INT_RANGE[0] <= number <= INT_RANGE[1]:
        raise ValueError(text)
    return number


def check_integers(body: bytes) -> None:
    """Refuse an integer orjson would turn into a float; only bodies with a 19-digit run are parsed again."""
    if LONG_DIGITS.search(body) is None:
        return
    try:
        json.loads(body, parse_int=_exact_int)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            return
        raise invalid("(body)", f"the integer {str(exc)[:40]} is beyond 64 bits; send it as a string") from None
