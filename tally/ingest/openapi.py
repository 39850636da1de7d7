"""The OpenAPI 3.1 document, written by hand (no framework generates it), and a docs page that renders it.

Limits come from the same constants the server checks; tests hold the document to the server's
answers (`test_gateway_openapi.py`). Swagger UI is served from the swagger-ui-bundle package, not a CDN.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swagger_ui_bundle import swagger_ui_path

from tally.ingest.config import GatewayConfig
from tally.ingest.logs import LEVELS, MAX_SERVICE_BYTES
from tally.schemas.envelope import MAX_CONTENT_TYPE, MAX_DATASCHEMA, MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TYPE

PROBLEM = {"$ref": "#/components/schemas/Problem"}
STRING = {"type": "string"}
# RFC 3339 with an offset, from 1970 on: what the server accepts (it refuses earlier times)
_CLOCK = r"-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
# (1970 itself only at UTC or west of it: 1970-01-01T00:00:00+01:00 is still 1969)
TIME_PATTERN = (rf"^((197[1-9]|19[89][0-9]|[2-9][0-9]{{3}}){_CLOCK}(Z|z|[+-][0-9]{{2}}:[0-9]{{2}})"
                rf"|1970{_CLOCK}(Z|z|-[0-9]{{2}}:[0-9]{{2}}|[+-]00:00))$")
BYTES = "at most {} bytes in UTF-8"


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": PROBLEM}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        200: "a replay of a webhook already accepted: the id it was accepted under",
        400: "malformed JSON, invalid event or header (the problem names the field)",
        408: "the body did not arrive whole in time",
        401: "no, unknown or revoked API key / bad webhook signature",
        403: "the key lacks the scope",
        404: "unknown webhook source",
        409: "the same Idempotency-Key is still in flight / a replayed webhook",
        413: "body or batch too large",
        415: "unsupported Content-Type",
        422: "Idempotency-Key reused with another payload",
        429: "rate limited; see Retry-After and RateLimit",
        503: "Kafka (or Redis with policy closed) unavailable; see Retry-After",
    }
    return {str(s): _problem(text[s]) for s in statuses if s != 200}


def _json_body(schema: dict[str, Any], *media: str) -> dict[str, Any]:
    return {"required": True, "content": {m: {"schema": schema} for m in media}}


IDEMPOTENCY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "1-255 visible ASCII characters; a retry with the same key gets the first response back",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21\\x23-\\x7e]+$"},
}




def document(config: GatewayConfig, extra_paths: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The document for this configuration (limits shown are the configured ones), with the products' paths."""
    write_errors = _errors(400, 401, 403, 408, 409, 413, 415, 422, 429, 503)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Tally gateway",
            "version": "1",
            "description": "Durable, idempotent, rate-limited HTTP intake. A 2xx means Kafka acknowledged the "
                           "event (acks=all). Errors are RFC 9457 problem+json.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "tly_... API key"}},
            "schemas": {
                "CloudEvent": {
                    "type": "object", "required": ["id", "source", "type"], "additionalProperties": False,
                    "properties": {
                        "specversion": {"type": "string", "enum": ["1.0"]},
                        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID, "description": BYTES.format(MAX_ID)},
                        "source": {"type": "string", "minLength": 1, "maxLength": MAX_SOURCE,
                                   "description": BYTES.format(MAX_SOURCE) + "; not logs/… or webhooks/…"},
                        "type": {"type": "string", "minLength": 1, "maxLength": MAX_TYPE,
                                 "description": BYTES.format(MAX_TYPE) + "; not tally.log"},
                        "time": {"type": "string", "format": "date-time", "pattern": TIME_PATTERN,
                                 "description": f"RFC 3339 with offset, from 1970; at most {config.max_future_s:g} s ahead"},
                        "subject": {"type": "string", "maxLength": MAX_SUBJECT, "description": BYTES.format(MAX_SUBJECT)},
                        "datacontenttype": {"type": "string", "maxLength": MAX_CONTENT_TYPE},
                        "dataschema": {"type": "string", "maxLength": MAX_DATASCHEMA},
                        "data": {"description": "any JSON; nesting, NUL characters and integers beyond 64 bits are refused"},
                    },
                },
                "LogRecord": {
                    "type": "object", "required": ["service", "message"],
                    "properties": {
                        "service": {"type": "string", "minLength": 1, "maxLength": MAX_SERVICE_BYTES,
                                    "description": BYTES.format(MAX_SERVICE_BYTES)},
                        "level": {"type": "string", "enum": sorted(LEVELS)},
                        "message": {"type": "string", "maxLength": 65536},
                        "time": {"type": "string", "format": "date-time", "pattern": TIME_PATTERN},
                        "attributes": {"type": "object"},
                        "trace_id": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
                        "span_id": {"type": "string", "pattern": "^[0-9a-fA-F]{16}$"},
                        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID,
                               "description": BYTES.format(MAX_ID)},
                    },
                },
                "Accepted": {"type": "object", "properties": {"id": STRING, "status": {"const": "accepted"}}},
                "ItemResults": {
                    "type": "object",
                    "properties": {
                        "accepted": {"type": "integer"}, "rejected": {"type": "integer"}, "failed": {"type": "integer"},
                        "results": {"type": "array", "items": {"type": "object", "properties": {
                            "index": {"type": "integer"}, "id": STRING,
                            "status": {"enum": ["accepted", "rejected", "failed"]}, "problem": PROBLEM}}},
                    },
                },
                "Problem": {
                    "type": "object",
                    "properties": {"type": STRING, "title": STRING, "status": {"type": "integer"}, "detail": STRING,
                                   "errors": {"type": "array", "items": {"type": "object", "properties": {
                                       "field": STRING, "message": STRING}}}},
                },
            },
        },
        "paths": {
            "/v1/events": {"post": {
                "summary": "Publish one CloudEvent (structured mode, or binary mode with ce-* headers)",
                "security": [{"apiKey": []}], "parameters": [IDEMPOTENCY],
                "requestBody": _json_body({"$ref": "#/components/schemas/CloudEvent"},
                                          "application/cloudevents+json", "application/json"),
                "responses": {"202": {"description": "acknowledged by Kafka", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}}, **write_errors},
            }},
            "/v1/events/batch": {"post": {
                "summary": f"Publish up to {config.max_batch_items} CloudEvents; each item is accepted or rejected alone",
                "security": [{"apiKey": []}], "parameters": [IDEMPOTENCY],
                "requestBody": _json_body({"type": "array", "minItems": 1, "maxItems": config.max_batch_items,
                                           "items": {"$ref": "#/components/schemas/CloudEvent"}},
                                          "application/cloudevents-batch+json", "application/json"),
                "responses": {"202": {"description": "at least one item acknowledged by Kafka; see results",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/ItemResults"}}}}, **write_errors},
            }},
            "/v1/logs": {"post": {
                "summary": "Publish log records (an object, an array, or application/x-ndjson lines), or OTLP/HTTP logs",
                "description": "An OTLP ExportLogsServiceRequest (application/x-protobuf, or OTLP/JSON: an object with"
                               " resourceLogs) is answered as OTLP expects: 200 with an ExportLogsServiceResponse whose"
                               " partialSuccess counts the refused records.",
                "security": [{"apiKey": []}], "parameters": [IDEMPOTENCY],
                "requestBody": _json_body({"oneOf": [{"$ref": "#/components/schemas/LogRecord"}, {
                    "type": "array", "minItems": 1, "maxItems": config.max_batch_items,
                    "items": {"$ref": "#/components/schemas/LogRecord"}}]}, "application/json"),
                "responses": {"202": {"description": "at least one record acknowledged by Kafka; see results",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/ItemResults"}}}},
                              "200": {"description": "an OTLP request: every record acknowledged by Kafka or refused",
                                      "content": {"application/json": {"schema": {"type": "object"}},
                                                  "application/x-protobuf": {"schema": {"type": "string",
                                                                                        "format": "binary"}}}},
                              **write_errors},
            }},
            "/v1/webhooks/{source}": {"post": {
                "summary": "A third party's signed webhook (Stripe, Standard Webhooks, MercadoPago or HMAC, per source)",
                "parameters": [{"name": "source", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"202": {"description": "verified and acknowledged by Kafka", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "200": {"description": "a replay of a webhook already accepted: the id it was accepted under",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    **_errors(400, 401, 404, 408, 409, 413, 429, 503)},
            }},
            "/healthz": {"get": {"summary": "alive", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Kafka (and Redis) reachable", "responses": {
                "200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
        },
    }
    for paths in extra_paths:  # a product may add a method to an intake path (GET beside POST /v1/logs)
        for path, item in paths.items():
            doc["paths"][path] = {**doc["paths"].get(path, {}), **item}
    return doc


DOCS_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Tally gateway API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""
DOCS_INIT = b'SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});\n'


def docs_assets() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once from the installed package."""
    folder = Path(swagger_ui_path)
    return {
        "swagger-ui-bundle.js": ((folder / "swagger-ui-bundle.js").read_bytes(), "text/javascript"),
        "swagger-ui.css": ((folder / "swagger-ui.css").read_bytes(), "text/css"),
        "init.js": (DOCS_INIT, "text/javascript"),
    }
