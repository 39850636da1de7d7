"""Query parameters as models: the routes validate with them and the OpenAPI document is made from them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.problems import Problem, validation_errors
from schemas.envelope import MAX_SOURCE, MAX_SUBJECT, MAX_TYPE
from schemas.logs import Level

DEFAULT_RANGE = timedelta(hours=1)
MAX_RANGE = timedelta(days=31)
MAX_LIMIT = 1000


class TimeRange(BaseModel):
    """`start` (inclusive) to `end` (exclusive), by event time; the last hour unless given; at most 31 days."""

    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime | None = None
    end: AwareDatetime | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "TimeRange":
        end = self.end or datetime.now(timezone.utc)
        start = self.start or end - DEFAULT_RANGE
        if start >= end:
            raise ValueError("start must be before end")
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
            options = [p for p in prop["anyOf"] if p.get("type") != "null"]
            inner = definitions[options[0]["$ref"].rsplit("/", 1)[1]] if "$ref" in options[0] else options[0]
            prop = {**inner, **{k: v for k, v in prop.items() if k in ("description", "default")}}
        if prop.get("default", 0) is None:
            prop = {k: v for k, v in prop.items() if k != "default"}
        out.append({"name": name, "in": "query", "required": False, "schema": prop})
    return out
