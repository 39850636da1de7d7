"""OpenTelemetry logs over OTLP/HTTP, at `/v1/logs`: the path an OTLP exporter posts logs to by default.

A Collector or SDK needs only the endpoint and an `Authorization` header. Binary protobuf and OTLP/JSON
bodies (`resourceLogs → scopeLogs → logRecords`) become Tally log records (`tally.ingest.logs`), validated and
published like any other; `service.name` comes from the resource, severity numbers map to levels, trace
and span ids are kept. Rejected records are reported as OTLP's partial success, which exporters do not
retry; a record Kafka did not take makes the whole request 503, which they do retry (records with a time
get an id from their content, so a retry is deduplicated).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
)

from tally.ingest.logs import LEVELS
from tally.edge.problems import Problem

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_SEVERITY = ((21, "fatal"), (17, "error"), (13, "warn"), (9, "info"), (5, "debug"), (1, "trace"))
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def is_otlp(media: str, value: Any) -> bool:
    """A protobuf body, or a JSON object with `resourceLogs` (Tally's own records never have one)."""
    return media == PROTOBUF or (media == JSON and isinstance(value, dict) and "resourceLogs" in value)


def decode_protobuf(body: bytes) -> dict[str, Any]:
    """The request in OTLP/JSON's shape, ids as hex, so one walker reads both encodings."""
    request = ExportLogsServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise Problem(400, "Invalid OTLP request", f"the body is not an ExportLogsServiceRequest: {exc}",
                      errors=[{"field": "(body)", "message": "not OTLP protobuf"}]) from None
    return MessageToDict(request, use_integers_for_enums=True)


def records(document: dict[str, Any], *, ids_in_base64: bool) -> list[Any]:
    """Tally log records, one per OTLP log record (a record that cannot be read is left for validation to refuse)."""
    hexify: Callable[[str], str] = _base64_to_hex if ids_in_base64 else str
    return list(_walk(document, hexify))


def answer(media: str, rejected: int, reason: str) -> tuple[bytes, str]:
    """An ExportLogsServiceResponse in the request's encoding; partial success names what was rejected."""
    if media == PROTOBUF:
        response = ExportLogsServiceResponse()
        if rejected:
            response.partial_success.CopyFrom(ExportLogsPartialSuccess(rejected_log_records=rejected,
                                                                       error_message=reason))
        return response.SerializeToString(), PROTOBUF
    body = {"partialSuccess": {"rejectedLogRecords": rejected, "errorMessage": reason}} if rejected else {}
    return orjson.dumps(body), JSON


def _walk(document: dict[str, Any], hexify: Callable[[str], str]) -> Iterator[Any]:
    for resource_logs in _list(document.get("resourceLogs")):
        resource = _attributes(_dict(_dict(resource_logs).get("resource")).get("attributes"))
        service = str(resource.pop("service.name", "") or "unknown_service")
        for scope_logs in _list(_dict(resource_logs).get("scopeLogs")):
            scope = _dict(_dict(scope_logs).get("scope")).get("name")
            for record in _list(_dict(scope_logs).get("logRecords")):
                yield _record(_dict(record), service, resource, scope, hexify)


def _record(record: dict[str, Any], service: str, resource: dict[str, Any], scope: Any,
            hexify: Callable[[str], str]) -> dict[str, Any]:
    attributes = {**resource, **_attributes(record.get("attributes"))}
    if scope:
        attributes["otel.scope.name"] = scope
    out: dict[str, Any] = {"service": service, "level": _level(record.get("severityNumber"), record.get("severityText")),
                           "message": _text(_value(record.get("body"))), "attributes": attributes}
    nanos = _int(record.get("timeUnixNano")) or _int(record.get("observedTimeUnixNano"))
    if nanos:
        out["time"] = (_EPOCH + timedelta(microseconds=nanos // 1000)).isoformat()
    for name, field in (("trace_id", "traceId"), ("span_id", "spanId")):
        value = record.get(field)
        if value:
            identifier = hexify(value)
            if identifier.strip("0"):
                out[name] = identifier
    return out


def _level(number: Any, text: Any) -> str:
    severity = _int(number)
    for floor, level in _SEVERITY:
        if severity >= floor:
            return level
    return LEVELS.get(str(text or "").strip().lower(), "info")


def _attributes(pairs: Any) -> dict[str, Any]:
    return {str(pair.get("key")): _value(pair.get("value")) for pair in _list(pairs) if isinstance(pair, dict)}


def _value(any_value: Any) -> Any:
    """An OTLP AnyValue as plain JSON."""
    value = _dict(any_value)
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return value["boolValue"]
    if "intValue" in value:
        number = _int(value["intValue"])
        return number if -2**63 <= number < 2**63 else str(number)  # OTLP's ints are 64-bit; JSON may say more
    if "doubleValue" in value:
        return value["doubleValue"]
    if "arrayValue" in value:
        return [_value(v) for v in _list(_dict(value["arrayValue"]).get("values"))]
    if "kvlistValue" in value:
        return _attributes(_dict(value["kvlistValue"]).get("values"))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else orjson.dumps(value).decode()


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _base64_to_hex(value: str) -> str:
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return ""
