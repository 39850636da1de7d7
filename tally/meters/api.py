"""The meters product's HTTP routes: a tenant's meters as resources (`meters:admin` to change, `meters:read` to
read; ADR 0140, 0141). The tenant always comes from the API key: another tenant's meter is simply not found."""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from tally.edge.body import parse_document, read_body
from tally.edge.openapi import json_schema
from tally.edge.problems import Problem, validation_errors
from tally.edge.products import Edge, resource
from tally.meters import stored
from tally.meters.catalog import Catalog
from tally.meters.definitions import Meter
from tally.meters.rules import Refused

READ, ADMIN = "meters:read", "meters:admin"
MAX_BODY_BYTES = 16 * 1024
BODY_TIMEOUT_S = 10.0
SLUG = Meter.model_fields["slug"].metadata[0].pattern
_TEXT = r"^[^\x00]*$"


class _Labels(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, pattern=_TEXT)
    description: str = Field("", max_length=2000, pattern=_TEXT)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _not_found(slug: str) -> Problem:
    return Problem(404, "Not Found", f"no meter {slug!r} for this tenant")


def _unprocessable(errors: list[dict[str, str]]) -> Problem:
    return Problem(422, "Unprocessable meter", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                   errors=errors)


def parse(body: Any, slug: str | None = None) -> tuple[Meter, stored.Labels]:
    """A request body (or a file's entry) as a meter and its labels: a Problem naming each field otherwise, 400 for
    the schema, 422 for fields that contradict each other (`tally.meters.rules.definition`)."""
    if not isinstance(body, dict):
        raise Problem(400, "Invalid request", "a meter is a JSON object",
                      errors=[{"field": "(body)", "message": "an object"}])
    if slug is not None and body.setdefault("slug", slug) != slug:
        raise Problem(400, "Invalid request", "the body's slug is not the one in the path",
                      errors=[{"field": "slug", "message": f"{slug!r} or absent"}])
    if "version" in body:
        raise Problem(400, "Invalid request", "a meter's version is made by the server",
                      errors=[{"field": "version", "message": "not accepted: a change to what is counted is a new "
                                                              "version"}])
    fields = {k: v for k, v in body.items() if k not in _Labels.model_fields}
    try:
        labels = _Labels.model_validate({k: v for k, v in body.items() if k in _Labels.model_fields})
        meter = Meter.model_validate(fields)
    except ValidationError as exc:
        refused = [e["ctx"]["error"] for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), Refused)]
        if refused:
            raise _unprocessable(refused[0].errors) from None
        raise Problem(400, "Invalid request", "the meter does not match the schema",
                      errors=validation_errors(exc)) from None
    return meter, stored.Labels(labels.name, labels.description)


class MetersProduct:
    """`tally.edge.products.Product` for meters. `readers` are what reads meters (plans, alert rules): a meter they
    read is not retired, and a new version of it must still be what they need."""

    def __init__(self, catalog: Catalog, readers: tuple[stored.Reader, ...], max_meters: int) -> None:
        self._catalog = catalog
        self._readers = readers
        self._max_meters = max_meters
        self._edge: Edge

    def routes(self, edge: Edge) -> list[BaseRoute]:
        self._edge = edge
        return resource("/v1/meters", "slug", listing=self.list_meters, create=self.create_meter, get=self.get_meter,
                        put=self.put_meter, delete=self.delete_meter)

    async def list_meters(self, request: Request) -> Response:
        """The tenant's meters not retired, each as its newest version."""
        tenant = await self._edge.tenant(request, READ)
        found = await stored.shown(self._edge.pool, tenant)
        return _json({"meters": [versions[-1] for versions in found.values() if not versions[-1]["retired"]]})

    async def get_meter(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        return _json(await self._shown(tenant, request.path_params["slug"]))

    async def create_meter(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, ADMIN)
        meter, labels = await self._meter(request, None)
        await self._save(tenant, meter, labels, create_only=True)
        return _json(await self._shown(tenant, meter.slug), 201, {"Location": f"/v1/meters/{meter.slug}"})

    async def put_meter(self, request: Request) -> Response:
        """Create the meter or make it the body: a new version when what it counts changed, else in place."""
        tenant = await self._edge.tenant(request, ADMIN)
        meter, labels = await self._meter(request, request.path_params["slug"])
        outcome = await self._save(tenant, meter, labels, create_only=False)
        return _json(await self._shown(tenant, meter.slug), 201 if outcome == "created" else 200)

    async def delete_meter(self, request: Request) -> Response:
        """Retire the meter (its versions stay, as history); 422 naming each plan and alert rule still reading it."""
        tenant = await self._edge.tenant(request, ADMIN)
        slug = request.path_params["slug"]
        try:
            async with self._edge.pool.acquire() as conn:
                await stored.retire(conn, tenant, slug, self._readers)
        except stored.NotFound:
            raise _not_found(slug) from None
        except Refused as exc:
            raise _unprocessable(exc.errors) from None
        return Response(status_code=204)

    async def _meter(self, request: Request, slug: str | None) -> tuple[Meter, stored.Labels]:
        body = parse_document(await read_body(request.receive, request.headers, MAX_BODY_BYTES, BODY_TIMEOUT_S))
        meter, labels = parse(body, slug)
        if self._catalog.built_in(meter.slug):
            raise _unprocessable([{"field": "slug", "message": f"{meter.slug!r} is a meter every tenant has "
                                                               "(deploy-time); choose another slug"}])
        return meter, labels

    async def _save(self, tenant: str, meter: Meter, labels: stored.Labels, create_only: bool) -> stored.Outcome:
        try:
            async with self._edge.pool.acquire() as conn:
                return await stored.save(conn, tenant, meter, labels, self._max_meters, self._readers, create_only)
        except stored.Exists:
            raise Problem(409, "Meter exists", f"meter {meter.slug!r} exists; PUT /v1/meters/{meter.slug} changes "
                                               "it") from None
        except stored.QuotaExceeded as exc:
            raise Problem(409, "Quota exceeded", str(exc)) from None
        except Refused as exc:
            raise _unprocessable(exc.errors) from None

    async def _shown(self, tenant: str, slug: str) -> dict[str, Any]:
        """The meter's newest version with every version it had; a retired meter is not found."""
        versions = (await stored.shown(self._edge.pool, tenant, slug)).get(slug) if re.match(SLUG, slug) else None
        if not versions or versions[-1]["retired"]:
            raise _not_found(slug)
        return {**versions[-1], "versions": versions}

    async def close(self) -> None:
        """Nothing of its own runs in the background."""

    def openapi_paths(self) -> dict[str, Any]:
        return paths(self._max_meters)


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_ERRORS = {401: "no valid key", 403: "the key lacks the scope", 429: "rate limited",
           503: "the key could not be checked now"}


def _op(summary: str, scope: str, ok: dict[str, Any], *problems: tuple[int, str], **more: Any) -> dict[str, Any]:
    errors = {**dict(problems), **_ERRORS}
    return {"summary": summary, "description": f"Needs an API key with scope `{scope}`.",
            "security": [{"apiKey": []}], **more,
            "responses": {**ok, **{str(s): {"description": d, "content": _PROBLEM} for s, d in sorted(errors.items())}}}


def _body_schema(slug_required: bool) -> dict[str, Any]:
    """What a client sends: the Meter's fields but its version (made by the server), and its labels."""
    schema = json_schema(Meter)
    schema["properties"].pop("version")
    schema["properties"] |= json_schema(_Labels)["properties"]
    schema["required"] = ["slug"] if slug_required else []
    return schema


def paths(max_meters: int) -> dict[str, Any]:
    slug = [{"name": "slug", "in": "path", "required": True, "schema": {"type": "string", "pattern": SLUG}}]
    shown = {"type": "object", "description": "the newest version: its fields, version, counter (the name its "
             "counters carry), created_at and backfill (state, counted, total, backfilled_from)"}
    one = {**shown, "properties": {"versions": {"type": "array", "items": {"type": "object"}}}}

    def body(slug_required: bool) -> dict[str, Any]:
        return {"requestBody": {"required": True, "description": f"at most {MAX_BODY_BYTES} bytes",
                                "content": {"application/json": {"schema": _body_schema(slug_required)}}}}

    def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    invalid = (400, "invalid JSON or meter (errors name each field)")
    too_large = (413, f"body over {MAX_BODY_BYTES} bytes")
    unprocessable = (422, "fields that contradict each other, a deploy-time meter's slug, or a change a plan or "
                          "alert rule reading the meter cannot follow (errors name each field)")
    unknown = (404, "no such meter for this tenant")
    return {
        "/v1/meters": {
            "get": _op("The tenant's meters (not retired), each as its newest version", READ,
                       {"200": answer("the meters", {"type": "object", "properties": {
                           "meters": {"type": "array", "items": shown}}})}),
            "post": _op("Create a meter (version 1, or the next version of a retired one); its backfill counts the "
                        "tenant's stored events", ADMIN, {"201": answer("created", one)}, invalid, too_large,
                        unprocessable, (409, f"the meter exists, or the tenant has {max_meters} meters (the bound)"),
                        **body(True)),
        },
        "/v1/meters/{slug}": {
            "get": _op("A meter's newest version with every version it had", READ, {"200": answer("the meter", one)},
                       unknown, parameters=slug),
            "put": _op("Create a meter or change it: a change to what is counted is a new version (counter "
                       "`slug@N`, with a backfill), a new name or description is not, the same meter changes "
                       "nothing", ADMIN, {"200": answer("changed or unchanged", one), "201": answer("created", one)},
                       invalid, too_large, unprocessable, (409, f"the tenant has {max_meters} meters (the bound)"),
                       (404, "a path that can name no meter (a NUL character)"), parameters=slug, **body(False)),
            "delete": _op("Retire a meter (its versions stay as history)", ADMIN, {"204": {"description": "retired"}},
                          unknown, (422, "a plan or alert rule reads the meter (errors name each)"), parameters=slug),
        },
    }
