"""Query parameters as models: the routes validate with them and the OpenAPI document is made from them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import re
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tally.edge.problems import Problem, validation_errors
from tally.schemas.envelope import MAX_SOURCE, MAX_SUBJECT, MAX_TYPE
from tally.schemas.logs import Level

DEFAULT_RANGE = timedelta(hours=1)
MAX_RANGE = timedelta(days=31)
MAX_LIMIT = 1000
NO_NUL = "^[^\\u0000]*$"
_RFC3339 = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})$")


def _rfc3339(value: object) -> object:
    """pydantic would also read a number as a Unix time; a query's times are RFC 3339, as documented."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("an RFC 3339 date-time with an offset, such as 2026-01-02T03:04:05Z")
    return value


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]


class TimeRange(BaseModel):
    """`start` (inclusive) to `end` (exclusive), by event time; the last hour unless given; at most 31 days."""

    model_config = ConfigDict(extra="forbid")

    start: Rfc3339 | None = None
    end: Rfc3339 | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "TimeRange":
        end = self.end or datetime.now(timezone.utc)
        start = self.start or end - DEFAULT_RANGE
        if start > end:
            raise ValueError("start must not be after end")
        if end - start > MAX_RANGE:
            raise ValueError(f"the range may span at most {MAX_RANGE.days} days")
        self.start, self.end = start, end
        return self


class Page(TimeRange):
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    order: Literal["desc", "asc"] = "desc"
    cursor: str | None = Field(None, max_length=2048)


class LogQuery(Page):
    service: str | None = Field(None, min_length=1, max_length=MAX_SUBJECT)
    level: Level | None = Field(None, description="this level and the ones above it")
    trace_id: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")
    q: str | None = Field(None, min_length=1, max_length=256, description="words that all occur in the message")


class EventQuery(Page):
    type: str | None = Field(None, min_length=1, max_length=MAX_TYPE)
    subject: str | None = Field(None, min_length=1, max_length=MAX_SUBJECT)
    source: str | None = Field(None, min_length=1, max_length=MAX_SOURCE)


class LogStatsQuery(TimeRange):
    step: Literal["minute", "hour"] = "minute"
    by: Literal["service", "level", "service,level"] = "service,level"
    service: str | None = Field(None, min_length=1, max_length=MAX_SUBJECT)


class EventStatsQuery(TimeRange):
    step: Literal["hour", "day"] = "hour"
    by: Literal["type", "subject", "type,subject"] = "type"
    type: str | None = Field(None, min_length=1, max_length=MAX_TYPE)
    subject: str | None = Field(None, min_length=1, max_length=MAX_SUBJECT)


def parse(model: type[BaseModel], params: Any) -> Any:
    """The validated query, or a 400 problem naming each bad parameter."""
    unknown = sorted(set(params.keys()) - set(model.model_fields))
    if unknown:
        raise Problem(400, "Invalid query", f"unknown parameter {unknown[0]!r}",
                      errors=[{"field": name, "message": "unknown parameter"} for name in unknown])
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise Problem(400, "Invalid query", "the query parameters are not valid", errors=validation_errors(exc)) from None


def parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters from the model's JSON schema."""
    schema = model.model_json_schema()
    definitions = schema.get("$defs", {})
    out = []
    for name, prop in schema["properties"].items():
        if "$ref" in prop:
            prop = {**definitions[prop["$ref"].rsplit("/", 1)[1]]}
        if "anyOf" in prop:
            options = [definitions[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
                       for p in prop["anyOf"] if p.get("type") != "null"]
            inner = options[0] if len(options) == 1 else {"anyOf": options}
            prop = {**inner, **{k: v for k, v in prop.items() if k in ("description", "default")}}
        if prop.get("default", 0) is None:
            prop = {k: v for k, v in prop.items() if k != "default"}
        if prop.get("type") == "string" and "pattern" not in prop and "enum" not in prop and "format" not in prop:
            prop = {**prop, "pattern": NO_NUL}  # the gateway refuses a NUL in any product parameter
        required = name in schema.get("required", ())
        out.append({"name": name, "in": "query", "required": required, "schema": prop})
    return out
