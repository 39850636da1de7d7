"""The alerts product's HTTP routes: a tenant's alert rules (`alerts:write` to change, `alerts:read` to read), the
history of their transitions and the groups firing now. The tenant always comes from the API key: another
tenant's rule is simply not found."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tally.alerts import history, rules, stored
from tally.alerts.history import AlertsQuery
from tally.alerts.openapi import paths
from tally.alerts.policy import AlertPolicy
from tally.edge.body import parse_document, read_body
from tally.edge.problems import Problem, validation_errors
from tally.edge.products import Edge, resource
from tally.meters.fresh import LiveCatalog
from tally.query.cursor import Cursors, invalid_cursor
from tally.query.filters import parse
from tally.schemas.alerts import AlertRule

READ, WRITE = "alerts:read", "alerts:write"
MAX_RULE_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _not_found(rule_id: str) -> Problem:
    return Problem(404, "Not Found", f"no alert rule {rule_id!r}")


def _file_owned(rule_id: str) -> Problem:
    return Problem(409, "Rule owned by a rules file",
                   f"rule {rule_id!r} comes from a rules file: change the file and run `tally alert-rules apply`")


class AlertsProduct:
    """`tally.edge.products.Product` for alerts; the tenant's meters in `catalog` decide which rules can be evaluated
    (`rules.problems`), `policy` what targets and how many rules a tenant may have."""

    def __init__(self, catalog: LiveCatalog, cursor_secret: str, policy: AlertPolicy) -> None:
        self._catalog = catalog
        self._policy = policy
        # Without a configured secret, cursors are good for this gateway process only.
        self._cursors = Cursors(cursor_secret.encode() or secrets.token_bytes(32))
        self._edge: Edge

    def routes(self, edge: Edge) -> list[BaseRoute]:
        self._edge = edge
        return [
            *resource("/v1/alert-rules", "id", listing=self.list_rules, create=self.create_rule, get=self.get_rule,
                      put=self.put_rule, delete=self.delete_rule),
            Route("/v1/alerts", self.get_alerts, methods=["GET"]),
            Route("/v1/alerts/active", self.get_active, methods=["GET"]),
        ]

    async def list_rules(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        box = self._policy.box
        return _json({"rules": [stored.shown(row, box) for row in await stored.listing(self._edge.pool, tenant)]})

    async def get_rule(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        row = await stored.one(self._edge.pool, tenant, request.path_params["id"])
        if row is None:
            raise _not_found(request.path_params["id"])
        return _json(stored.shown(row, self._policy.box))

    async def create_rule(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, WRITE)
        rule = await self._rule(request, tenant, None)
        async with self._edge.pool.acquire() as conn, conn.transaction():
            if await stored.claim(conn, tenant, rule.id) is not None:
                raise Problem(409, "Rule exists", f"rule {rule.id!r} exists; PUT /v1/alert-rules/{rule.id} replaces it")
            await self._within_quota(conn, tenant)
            await stored.save(conn, tenant, rule, self._policy.box)
            row = await stored.one(conn, tenant, rule.id)
        return _json(stored.shown(row, self._policy.box), 201, {"Location": f"/v1/alert-rules/{rule.id}"})

    async def put_rule(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, WRITE)
        rule = await self._rule(request, tenant, request.path_params["id"])
        async with self._edge.pool.acquire() as conn, conn.transaction():
            row = await stored.claim(conn, tenant, rule.id)
            if row is not None and row["origin"] != "api":
                raise _file_owned(rule.id)
            if row is None:
                await self._within_quota(conn, tenant)
            created = await stored.save(conn, tenant, rule, self._policy.box)
            row = await stored.one(conn, tenant, rule.id)
        return _json(stored.shown(row, self._policy.box), 201 if created else 200)

    async def delete_rule(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, WRITE)
        rule_id = request.path_params["id"]
        async with self._edge.pool.acquire() as conn, conn.transaction():
            row = await stored.claim(conn, tenant, rule_id)
            if row is None:
                raise _not_found(rule_id)
            if row["origin"] != "api":
                raise _file_owned(rule_id)
            await stored.delete(conn, tenant, [rule_id])
        return Response(status_code=204)

    async def _rule(self, request: Request, tenant: str, rule_id: str | None) -> AlertRule:
        """The body as a rule that can be evaluated: 400 naming each invalid field, 422 naming each problem."""
        body = parse_document(await read_body(request.receive, request.headers, MAX_RULE_BYTES, BODY_TIMEOUT_S))
        if not isinstance(body, dict):
            raise Problem(400, "Invalid request", "a rule is a JSON object",
                          errors=[{"field": "(body)", "message": "an object"}])
        if rule_id is not None:
            if body.setdefault("id", rule_id) != rule_id:
                raise Problem(400, "Invalid request", "the body's id is not the one in the path",
                              errors=[{"field": "id", "message": f"{rule_id!r} or absent"}])
        try:
            rule = AlertRule.model_validate(body)
        except ValidationError as exc:
            raise Problem(400, "Invalid request", "the rule does not match the schema",
                          errors=validation_errors(exc)) from None
        found = rules.problems(rule, await self._catalog.fresh(self._edge.pool, tenant))
        if found:
            raise Problem(422, "Rule cannot be evaluated", "; ".join(found), problems=found,
                          errors=[{"field": "(rule)", "message": p} for p in found])
        refused = await self._policy.problems(rule)
        if refused:
            raise Problem(422, "Rule not allowed", "; ".join(f"{field}: {message}" for field, message in refused),
                          errors=[{"field": field, "message": message} for field, message in refused])
        return rule

    async def _within_quota(self, conn: asyncpg.Connection, tenant: str) -> None:
        """Called with the new rule's id claimed; two creations at once may both pass (a bound, not a ledger)."""
        over = self._policy.quota(await stored.count(conn, tenant))
        if over:
            raise Problem(422, "Rule quota reached", over, errors=[{"field": "(rule)", "message": over}])

    async def get_alerts(self, request: Request) -> Response:
        """Transitions newest first; `next` carries a cursor signed for this tenant and these filters."""
        tenant = await self._edge.tenant(request, READ)
        query = parse(AlertsQuery, request.query_params)
        params = query.model_dump(mode="json", exclude_none=True, exclude={"cursor"})
        signed = orjson.dumps({k: v for k, v in params.items() if k != "limit"}, option=orjson.OPT_SORT_KEYS).decode()
        before = self._before(tenant, signed, query.cursor) if query.cursor else None
        async with self._edge.pool.acquire() as conn:
            found = await history.page(conn, tenant, query, before)
        body: dict[str, Any] = {"alerts": [shown for _, shown in found[:query.limit]], "next": None}
        if len(found) > query.limit:
            last = found[query.limit - 1][0]
            cursor = self._cursors.encode(tenant, signed, (last["at"], "alert_transitions", str(last["id"])))
            body["next"] = f"{request.url.path}?{urlencode({**params, 'cursor': cursor})}"
        return _json(body)

    def _before(self, tenant: str, signed: str, cursor: str) -> int:
        _, _, last_id = self._cursors.decode(tenant, signed, cursor)
        try:
            return int(last_id)
        except ValueError:
            raise invalid_cursor() from None

    async def get_active(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        async with self._edge.pool.acquire() as conn:
            return _json({"active": await history.firing(conn, tenant)})

    async def close(self) -> None:
        """Nothing of its own runs in the background."""

    def openapi_paths(self) -> dict[str, Any]:
        return paths(READ, WRITE, MAX_RULE_BYTES)
