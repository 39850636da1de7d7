"""The alerts routes in the gateway's OpenAPI document, their schemas made from the pydantic models.

The gateway merges only path items, so each schema carries its definitions inline rather than as references.
"""

from __future__ import annotations

from typing import Any

from tally.alerts.history import AlertsQuery
from tally.query.filters import parameters
from tally.schemas.alerts import AlertRule, AlertTransition

DURATIONS = ("window", "every", "for", "cooldown")
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_ERRORS = {401: "no valid key", 403: "the key lacks the scope", 429: "rate limited"}


def inline(schema: Any, definitions: dict[str, Any] | None = None) -> Any:
    """The JSON schema with each `#/$defs/...` reference replaced by its definition (the models have no cycles)."""
    if definitions is None:
        definitions = schema.get("$defs", {})
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inline(definitions[schema["$ref"].rsplit("/", 1)[1]], definitions)
        return {k: inline(v, definitions) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [inline(v, definitions) for v in schema]
    return schema


def rule_schema() -> dict[str, Any]:
    """What a client sends: durations as seconds or text such as `5m`, the threshold a number or its digits."""
    schema = inline(AlertRule.model_json_schema(by_alias=True))
    schema["properties"]["threshold"] = {"anyOf": [{"type": "number"}, {
        "type": "string", "pattern": r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"}]}
    for name in DURATIONS:
        seconds = schema["properties"][name]
        schema["properties"][name] = {
            "description": seconds.pop("description", "a duration"), "default": seconds.pop("default"),
            "anyOf": [seconds, {"type": "string", "pattern": r"^\d+(s|m|h)$"}]}
    return schema


def shown_rule_schema() -> dict[str, Any]:
    """What the API answers: the rule with its targets masked, its origin and version."""
    schema = rule_schema()
    schema.pop("additionalProperties")
    schema["properties"] |= {
        "targets": {"type": "array", "description": "type and url (scheme and host only); a webhook's secret "
                    "masked as `whsec_…`", "items": {"type": "object"}},
        "origin": {"enum": ["api", "file"], "description": "file: owned by a rules file, not changed by the API"},
        "version": {"type": "integer"}, "updated_at": {"type": "string", "format": "date-time"}}
    return schema


def transition_schema() -> dict[str, Any]:
    schema = inline(AlertTransition.model_json_schema(mode="serialization"))
    schema["properties"]["deliveries"] = {"type": "array", "items": {"type": "object", "properties": {
        "target": {"type": "integer", "description": "position in the rule's targets"},
        "kind": {"enum": ["slack", "webhook"]},
        "url": {"type": "string", "description": "the target's scheme and host only"},
        "status": {"enum": ["pending", "sent", "failed", "refused"],
                   "description": "refused: the target may not be called (last_error says why)"},
        "attempts": {"type": "integer"},
        "last_status": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]},
        "sent_at": {"type": ["string", "null"], "format": "date-time"}}}}
    return schema


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, scope: str, ok: dict[str, Any], *problems: tuple[int, str], **more: Any) -> dict[str, Any]:
    errors = {**{status: text for status, text in problems}, **_ERRORS}
    return {"summary": summary, "description": f"Needs an API key with scope `{scope}`.",
            "security": [{"apiKey": []}], **more,
            "responses": {**ok, **{str(s): {"description": d, "content": _PROBLEM} for s, d in sorted(errors.items())}}}


def paths(read: str, write: str, max_rule_bytes: int) -> dict[str, Any]:
    rule_id = [{"name": "id", "in": "path", "required": True,
                "schema": AlertRule.model_json_schema()["properties"]["id"]}]
    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"requestBody": {"required": True, "description": f"at most {max_rule_bytes} bytes",
                                "content": {"application/json": {"schema": schema}}}}

    new = rule_schema()
    named = {**new, "required": [field for field in new["required"] if field != "id"],
             "description": "the rule; its id, if given, is the path's"}
    shown = shown_rule_schema()
    invalid = (400, "invalid JSON or rule (errors name each field)")
    unevaluable = (422, "the configured meters cannot evaluate the rule, a target may not be called, a bound is "
                        "passed or the tenant's rule quota is reached (each problem named)")
    too_large = (413, f"body over {max_rule_bytes} bytes")
    unknown = (404, "no such rule for this tenant")
    file_owned = (409, "the rule belongs to a rules file (or, on create, exists)")
    return {
        "/v1/alert-rules": {
            "get": _op("The tenant's alert rules, secrets masked", read,
                       {"200": _json("the rules", {"type": "object", "properties": {
                           "rules": {"type": "array", "items": shown}}})}),
            "post": _op("Create an alert rule", write, {"201": _json("created", shown)},
                        invalid, too_large, unevaluable, (409, "a rule with this id exists"), **body(new)),
        },
        "/v1/alert-rules/{id}": {
            "get": _op("One alert rule", read, {"200": _json("the rule", shown)}, unknown, parameters=rule_id),
            "put": _op("Create or replace an alert rule", write,
                       {"200": _json("replaced", shown), "201": _json("created", shown)},
                       invalid, too_large, unevaluable, file_owned, (404, "an id no rule can have (a NUL character)"),
                       parameters=rule_id, **body(named)),
            "delete": _op("Delete an alert rule", write, {"204": {"description": "deleted"}}, unknown, file_owned,
                          parameters=rule_id),
        },
        "/v1/alerts": {"get": _op(
            "Alert transitions (firing, resolved) newest first, with their deliveries, a page at a time", read,
            {"200": _json("a page; `next` is the link to the next one, or null", {"type": "object", "properties": {
                "alerts": {"type": "array", "items": transition_schema()},
                "next": {"type": ["string", "null"]}}})},
            (400, "invalid query or cursor"), parameters=parameters(AlertsQuery))},
        "/v1/alerts/active": {"get": _op(
            "The rule-groups firing now, with when they fired", read,
            {"200": _json("the firing groups, the latest first", {"type": "object", "properties": {
                "active": {"type": "array", "items": {"type": "object", "properties": {
                    "rule": {"type": "object"}, "group": {"type": "object"},
                    "breaching_since": {"type": "string", "format": "date-time"},
                    "fired_at": {"type": "string", "format": "date-time"}}}}}})})},
    }
