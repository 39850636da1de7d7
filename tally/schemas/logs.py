"""Log levels, lowest first: the order `level=warn` ("warn and above") reads in queries and alert rules."""

from __future__ import annotations

from enum import Enum


class Level(str, Enum):
    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    FATAL = "fatal"

    def and_above(self) -> list[str]:
        levels = list(Level)
        return [level.value for level in levels[levels.index(self):]]
