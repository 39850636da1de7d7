"""OTLP/HTTP logs at /v1/logs: the OpenTelemetry SDK's exporter, pointed at the gateway with only an
endpoint and a header, delivers its records as Tally log events; refused records are partial success."""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import LogRecordExportResult, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from opentelemetry import context as otel_context

from tests.gateway.helpers import Gateway, for_tenant


def _ship(gateway: Gateway, secret: str, service: str) -> list[LogRecordExportResult]:
    exporter = OTLPLogExporter(endpoint=f"{gateway.url}/v1/logs", headers={"Authorization": f"Bearer {secret}"})
    results: list[LogRecordExportResult] = []
    export = exporter.export

    def recording(batch):  # noqa: ANN001, ANN202
        results.append(export(batch))
        return results[-1]

    exporter.export = recording
    provider = LoggerProvider(resource=Resource.create({"service.name": service, "deployment": "test"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    log = logging.getLogger(f"otel.{service}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = LoggingHandler(logger_provider=provider)
    log.addHandler(handler)
    span = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0x00F067AA0BA902B7, is_remote=False,
                       trace_flags=TraceFlags(1))
    token = otel_context.attach(set_span_in_context(NonRecordingSpan(span)))
    try:
        log.warning("card declined for order %s", 7, extra={"order": 7})
    finally:
        otel_context.detach(token)
    log.debug("cache miss")
    log.removeHandler(handler)
    provider.shutdown()
    return results


async def test_the_sdk_exporter_delivers_records_with_service_level_and_trace(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    service = f"checkout-{uuid.uuid4().hex[:6]}"
    results = await asyncio.to_thread(_ship, gateway, secret, service)
    assert results == [LogRecordExportResult.SUCCESS] * 2

    events = sorted(for_tenant(await asyncio.to_thread(gateway.messages), tenant), key=lambda e: e["data"]["level"])
    assert [(e["type"], e["subject"], e["source"]) for e in events] == [("tally.log", service, f"logs/{service}")] * 2
    debug, warn = events
    assert (debug["data"]["level"], debug["data"]["message"]) == ("debug", "cache miss")
    assert (warn["data"]["level"], warn["data"]["message"]) == ("warn", "card declined for order 7")
    assert warn["data"]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert warn["data"]["span_id"] == "00f067aa0ba902b7"
    assert warn["data"]["attributes"]["order"] == 7 and warn["data"]["attributes"]["deployment"] == "test"
    assert "trace_id" not in debug["data"]


def _otlp_json(service: str, *records: dict) -> dict:
    return {"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                              "scopeLogs": [{"scope": {"name": "tests"}, "logRecords": list(records)}]}]}


async def test_otlp_json_refused_records_are_partial_success_and_the_rest_is_accepted(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    service = f"billing-{uuid.uuid4().hex[:6]}"
    good = {"timeUnixNano": "1795400000000000000", "severityNumber": 17, "body": {"stringValue": "charge failed"},
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "attributes": [{"key": "amount", "value": {"intValue": "42"}}]}
    in_the_future = {**good, "timeUnixNano": str(4_000_000_000 * 10**9), "body": {"stringValue": "from 2096"}}
    async with gateway.client(secret) as client:
        response = await client.post("/v1/logs", content=orjson.dumps(_otlp_json(service, good, in_the_future)),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        assert response.json()["partialSuccess"]["rejectedLogRecords"] == 1
        assert "time" in response.json()["partialSuccess"]["errorMessage"]

        whole = await client.post("/v1/logs", content=orjson.dumps(_otlp_json(service, good)),
                                  headers={"Content-Type": "application/json"})
        assert (whole.status_code, whole.json()) == (200, {})

        garbage = await client.post("/v1/logs", content=b"\xff\x00not protobuf",
                                    headers={"Content-Type": "application/x-protobuf"})
        assert garbage.status_code == 400
        assert garbage.headers["content-type"] == "application/problem+json"

    events = for_tenant(await asyncio.to_thread(gateway.messages), tenant)
    # The same record twice (a retry): one id, so the processor keeps it once.
    assert len({e["id"] for e in events}) == 1 and len(events) == 2
    data = events[0]["data"]
    assert (data["level"], data["message"], data["trace_id"]) == ("error", "charge failed",
                                                                  "5b8efff798038103d269b633813fc60c")
    assert events[0]["time"] == "2026-11-23T02:13:20Z"  # timeUnixNano, to the microsecond


def test_a_protobuf_answer_decodes_as_an_export_response() -> None:
    from tally.ingest.otlp import PROTOBUF, answer

    payload, media = answer(PROTOBUF, 2, "bad time")
    response = ExportLogsServiceResponse.FromString(payload)
    assert media == PROTOBUF
    assert (response.partial_success.rejected_log_records, response.partial_success.error_message) == (2, "bad time")
