"""The usage product's HTTP routes: plans and subscriptions (scope admin:write to change, usage:read to
read), `GET /v1/usage` and `GET /v1/usage/history`. The tenant always comes from the API key."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import date, datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import orjson
import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tally.alerts.policy import AlertPolicy
from tally.egress import Refused as TargetRefused, check_target, endpoint
from tally.edge.body import parse_document, read_body
from tally.edge.openapi import json_schema
from tally.edge.problems import Problem, validation_errors
from tally.edge.products import Edge
from tally.meters.fresh import LiveCatalog
from tally.query.filters import NO_NUL, parameters, parse
from tally.usage import links
from tally.usage.alerts import message
from tally.usage.changes import SubjectChanges
from tally.usage.figures import NotFound, Unreadable, UsageService
from tally.usage.periods import PeriodError
from tally.usage.plan_changes import PlanChanges
from tally.usage.plans import (SLUG, Plan, PlanMeter, QuotaExceeded, Refused, SubscriptionChange, UnknownPlan,
                         change_subscription, check_meters, load_plans, load_subscriptions, plan_history, save_plan,
                         subscription_history)
from tally.usage.windows import WindowReader

ADMIN, READ = "admin:write", "usage:read"
METER = PlanMeter.model_fields["meter"].metadata[0].pattern
STATIC = Path(__file__).parent / "static"
PAGE = (STATIC / "page.html").read_text()
ASSETS = {"page.js": ((STATIC / "page.js").read_bytes(), "text/javascript"),
          "page.css": ((STATIC / "page.css").read_bytes(), "text/css")}
PAGE_HEADERS = {"Content-Security-Policy":
                "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


MAX_BODY_BYTES = 64 * 1024  # the largest plan a tenant may send; every usage route reads at most this
BODY_TIMEOUT_S = 30.0
MAX_ID = 2**63 - 1


async def _body(request: Request) -> Any:
    """The JSON body, refused with 413 past MAX_BODY_BYTES before it is read whole (security review M3)."""
    return parse_document(await read_body(request.receive, request.headers, MAX_BODY_BYTES, BODY_TIMEOUT_S))


class UsageQuery(BaseModel):
    """The query of GET /v1/usage and /v1/usage/history; the OpenAPI parameters are made from it."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=256)
    meter: str | None = Field(None, pattern=METER)
    period: Literal["current", "previous"] | date = Field("current", description="or a date inside the period")


class AlertsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str | None = Field(None, min_length=1, max_length=256)
    unread: bool = Field(False, description="only those not yet read")


def _shown(row: Any) -> dict[str, Any]:
    """An alert as the link holder sees it: not the tenant's name nor the platform-wide ids (security review)."""
    return {k: v for k, v in message(row).items() if k not in ("id", "tenant", "alert")}


def _invalid(exc: ValidationError | ValueError) -> Problem:
    if isinstance(exc, ValidationError):
        return Problem(400, "Invalid request", "the request does not match the schema", errors=validation_errors(exc))
    return Problem(400, "Invalid request", str(exc))


def _refusal(exc: Refused | QuotaExceeded | UnknownPlan) -> Problem:
    """A plan or subscription change that is well formed but cannot be applied."""
    if isinstance(exc, Refused):
        return Problem(422, "Unprocessable request", str(exc), errors=exc.errors)
    if isinstance(exc, QuotaExceeded):
        return Problem(409, "Quota exceeded", str(exc))
    return Problem(404, "Unknown plan", str(exc), errors=[{"field": "plan_id", "message": str(exc)}])


def _subject(subject: str) -> str:
    if len(subject.encode()) > 256 or "\x00" in subject:
        raise Problem(400, "Invalid request", "subject is at most 256 bytes, without NUL characters",
                      errors=[{"field": "subject", "message": "at most 256 bytes, without NUL characters"}])
    return subject


class UsageProduct:
    """`tally.edge.products.Product` for usage; Redis is its own client on the gateway's loop, made on first use."""

    def __init__(self, database_url: str, redis_url: str, redis_prefix: str, cache_ttl_s: int, catalog: LiveCatalog,
                 link_secret: str = "", page_poll_s: float = 30.0, max_plans: int | None = None,
                 max_subscriptions: int | None = None, link_previous_secrets: Sequence[str] = (),
                 links_per_tenant: int = 10_000, *, alert_policy: AlertPolicy) -> None:
        self._database_url = database_url
        self._alert_policy = alert_policy  # a usage Slack URL is checked and sealed as alert targets are
        self._catalog = catalog  # the tenants' meters, live: plans are checked and usage read against them
        self._max_plans = max_plans
        self._max_subscriptions = max_subscriptions
        self._redis_url = redis_url
        self._prefix = redis_prefix
        self._cache_ttl_s = cache_ttl_s
        self._links = links.Signer(link_secret, link_previous_secrets)
        self._links_per_tenant = links_per_tenant
        self._page_poll_s = page_poll_s
        self._service: UsageService | None = None
        self._client: redis.Redis  # with the service, made on first use
        self._plans: PlanChanges
        self._edge: Edge

    def routes(self, edge: Edge) -> list[BaseRoute]:
        self._edge = edge
        return [
            Route("/v1/plans", self.put_plan, methods=["POST"]),
            Route("/v1/plans", self.get_plans, methods=["GET"]),
            Route("/v1/plans/{plan_id}", self.get_plan, methods=["GET"]),
            Route("/v1/subscriptions/{subject}", self.put_subscription, methods=["PUT"]),
            Route("/v1/subscriptions/{subject}", self.get_subscription, methods=["GET"]),
            Route("/v1/subscriptions", self.get_subscriptions, methods=["GET"]),
            Route("/v1/usage", self.get_usage, methods=["GET"]),
            Route("/v1/usage/history", self.get_history, methods=["GET"]),
            Route("/v1/usage/alerts", self.get_alerts, methods=["GET"]),
            Route("/v1/usage/alerts/{id:int}/read", self.read_alert, methods=["POST"]),
            Route("/v1/usage/slack", self.put_slack, methods=["PUT"]),
            Route("/v1/usage/links", self.post_link, methods=["POST"]),
            Route("/v1/usage/links", self.revoke_links, methods=["DELETE"]),
            Route("/v1/usage/links/{id:int}", self.revoke_link, methods=["DELETE"]),
            Route("/usage/{subject}", self.page, methods=["GET"]),
            Route("/usage/{subject}/data", self.page_data, methods=["GET"]),
            Route("/usage-assets/{name}", self.asset, methods=["GET"]),
        ]

    def service(self) -> UsageService:
        if self._service is None:
            self._client = redis.Redis.from_url(self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            self._plans = PlanChanges(self._database_url)
            reader = WindowReader(self._edge.pool, self._client, self._prefix, self._cache_ttl_s)
            self._service = UsageService(self._edge.pool, reader, changes=SubjectChanges(self._client, self._prefix),
                                         plans=self._plans, catalog=self._catalog)
        return self._service

    async def close(self) -> None:
        """The usage figures' background refreshes (docs/adr/0162), which read Redis and are told of plan changes,
        then the listening connection and the Redis client."""
        if self._service is not None:
            await self._service.close()
            await self._plans.close()
            await self._client.aclose()

    async def put_plan(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, ADMIN)
        try:
            plan = Plan.model_validate(await _body(request))
            async with self._edge.pool.acquire() as conn:
                check_meters(plan, await self._catalog.fresh(conn, tenant))
                version = await save_plan(conn, tenant, plan, self._max_plans)
        except ValidationError as exc:
            raise _invalid(exc) from None
        except (Refused, QuotaExceeded) as exc:
            raise _refusal(exc) from None
        return _json({**plan.model_dump(mode="json"), "version": version}, 201)

    async def get_plans(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        return _json({"plans": [{**p.model_dump(mode="json"), "version": v}
                                for v, p in await load_plans(self._edge.pool, tenant)]})

    async def get_plan(self, request: Request) -> Response:
        """The plan's current version with every version it had."""
        tenant = await self._edge.tenant(request, READ)
        plan_id = request.path_params["plan_id"]
        found = re.match(SLUG, plan_id) and await load_plans(self._edge.pool, tenant, plan_id)
        if not found:
            raise Problem(404, "Not Found", "no such plan")
        version, plan = found[0]
        return _json({**plan.model_dump(mode="json"), "version": version,
                      "versions": await plan_history(self._edge.pool, tenant, plan.id)})

    async def put_subscription(self, request: Request) -> Response:
        """Create a subscription, or change what the body names and keep the rest (docs/adr/0060)."""
        tenant = await self._edge.tenant(request, ADMIN)
        subject = _subject(request.path_params["subject"])
        body = await _body(request)
        try:
            change = SubscriptionChange.model_validate(body)
            async with self._edge.pool.acquire() as conn:
                await change_subscription(conn, tenant, subject, change, self._max_subscriptions)
        except ValidationError as exc:
            raise _invalid(exc) from None
        except (Refused, QuotaExceeded, UnknownPlan) as exc:
            raise _refusal(exc) from None
        return _json(await self._subscription(tenant, subject))

    async def get_subscription(self, request: Request) -> Response:
        """The subscription with every version it had, oldest first."""
        tenant = await self._edge.tenant(request, READ)
        return _json(await self._subscription(tenant, _subject(request.path_params["subject"])))

    async def _subscription(self, tenant: str, subject: str) -> dict[str, Any]:
        found = await load_subscriptions(self._edge.pool, tenant, subject)
        if not found:
            raise Problem(404, "Not Found", f"subject {subject!r} has no subscription")
        return {**found[0][1].model_dump(mode="json"),
                "versions": await subscription_history(self._edge.pool, tenant, subject)}

    async def get_subscriptions(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
        subject = request.query_params.get("subject")
        subs = await load_subscriptions(self._edge.pool, tenant, subject and _subject(subject))
        return _json({"subscriptions": [s.model_dump(mode="json") for _, s in subs]})

    async def get_usage(self, request: Request) -> Response:
        return await self._read(request, self.service().usage)

    async def get_history(self, request: Request) -> Response:
        return await self._read(request, self.service().history)

    async def get_alerts(self, request: Request) -> Response:
        """Newest first; `subject` narrows to one subject, `unread=true` to those not yet read."""
        tenant = await self._edge.tenant(request, READ)
        q = parse(AlertsQuery, request.query_params)
        rows = await self._edge.pool.fetch(
            "select * from usage_alerts where tenant = $1 and ($2::text is null or subject = $2)"
            " and (not $3 or read_at is null) order by id desc limit 200", tenant, q.subject, q.unread)
        return _json({"alerts": [message(r) for r in rows]})

    async def read_alert(self, request: Request) -> Response:
        """Marking an alert read changes data: a write scope (security review, lows)."""
        tenant = await self._edge.tenant(request, ADMIN)
        if request.path_params["id"] > MAX_ID:
            raise Problem(404, "Not Found", "no such alert")
        row = await self._edge.pool.fetchrow(
            "update usage_alerts set read_at = coalesce(read_at, now()) where tenant = $1 and id = $2 returning *",
            tenant, request.path_params["id"])
        if row is None:
            raise Problem(404, "Not Found", "no such alert")
        return _json(message(row))

    async def put_slack(self, request: Request) -> Response:
        """The tenant's Slack incoming-webhook URL for usage alerts (null turns Slack off): checked as `tally alerts`
        checks it before each delivery (egress.check_target), stored sealed, answered masked (scheme and host)."""
        tenant = await self._edge.tenant(request, ADMIN)
        body = await _body(request)
        if not isinstance(body, dict) or set(body) != {"webhook_url"}:
            raise Problem(400, "Invalid request", 'the body is {"webhook_url": <URL or null>}',
                          errors=[{"field": "(body)", "message": "an object with webhook_url alone"}])
        url, policy = body["webhook_url"], self._alert_policy
        if url is not None:
            try:
                url = await check_target(url, "slack", policy.egress)
            except TargetRefused as exc:
                raise Problem(422, "Slack URL not allowed", f"webhook_url: {exc}",
                              errors=[{"field": "webhook_url", "message": str(exc)}]) from None
        await self._edge.pool.execute(
            "insert into usage_settings (tenant, slack_webhook_url) values ($1, $2) on conflict (tenant)"
            " do update set slack_webhook_url = excluded.slack_webhook_url, updated_at = now()", tenant,
            url and policy.box.seal(url))
        return _json({"webhook_url": url and endpoint(url)})

    async def post_link(self, request: Request) -> Response:
        """A signed link to one subject's usage page, valid `ttl_s` seconds (default 7 days, at most 90).
        Sharing a subject's usage is a change a read-only key may not make (security review M2)."""
        principal = await self._edge.key(request, ADMIN)
        if not self._links.configured:
            raise Problem(503, "Usage links are not configured", "set TALLY_USAGE_LINK_SECRET on the gateway")
        body = await _body(request)
        if not isinstance(body, dict) or not set(body) <= {"subject", "ttl_s"}:
            raise Problem(400, "Invalid request", "the body is an object with subject and ttl_s",
                          errors=[{"field": "(body)", "message": "an object of subject and ttl_s"}])
        subject, ttl_s = body.get("subject"), body.get("ttl_s", 7 * 86400)
        if isinstance(ttl_s, float) and ttl_s.is_integer():
            ttl_s = int(ttl_s)  # 600.0 is an integer to JSON Schema
        if not isinstance(subject, str) or not subject or "/" in subject or "\x00" in subject or len(subject) > 256:
            raise Problem(400, "Invalid request", "subject is required",
                          errors=[{"field": "subject", "message": "1 to 256 characters without '/' or NUL"}])
        if type(ttl_s) is not int or not 60 <= ttl_s <= 90 * 86400:
            raise Problem(400, "Invalid request", "ttl_s is 60 to 7776000 seconds",
                          errors=[{"field": "ttl_s", "message": "60 to 7776000"}])
        expires = int(time.time()) + ttl_s
        try:
            link = await links.mint(self._edge.pool, principal.tenant, principal.key_id, subject, expires,
                                    self._links_per_tenant)
        except links.TooManyLinks as exc:
            raise Problem(409, "Quota exceeded", str(exc)) from None
        token = self._links.sign(links.Claims(link, principal.tenant, subject, expires))
        return _json({"id": link, "url": f"/usage/{quote(subject, safe='')}?token={token}", "key_id": principal.key_id,
                      "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat()}, 201)

    async def revoke_link(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, ADMIN)
        link = request.path_params["id"]
        if link > MAX_ID or not await links.revoke(self._edge.pool, tenant, link=link):
            raise Problem(404, "Not Found", "no live usage link with this id")
        return Response(status_code=204)

    async def revoke_links(self, request: Request) -> Response:
        """Every live link minted by one API key (`key_id`), as when the key leaked."""
        tenant = await self._edge.tenant(request, ADMIN)
        key_id = request.query_params.get("key_id", "")
        if not 0 < len(key_id) <= 64 or set(request.query_params) != {"key_id"}:
            raise Problem(400, "Invalid request", "key_id, the id of the key whose links to revoke, is required",
                          errors=[{"field": "key_id", "message": "required, at most 64 characters"}])
        return _json({"revoked": await links.revoke(self._edge.pool, tenant, key_id=key_id)})

    async def _link_tenant(self, request: Request) -> str:
        if not self._links.configured:
            raise Problem(404, "Not Found")
        try:
            claims = self._links.verify(request.query_params.get("token", ""), request.path_params["subject"])
        except links.BadLink as exc:
            raise Problem(403, "Forbidden", str(exc)) from None
        if not await links.live(self._edge.pool, claims):
            raise Problem(403, "Forbidden", "the link was revoked; ask for a new one")
        return claims.tenant

    async def page(self, request: Request) -> Response:
        """The usage page itself; everything it loads comes from this server (CSP default-src 'self')."""
        await self._link_tenant(request)
        html = PAGE.replace("{poll_s}", f"{self._page_poll_s:g}")
        return Response(html, 200, PAGE_HEADERS, media_type="text/html")

    async def page_data(self, request: Request) -> Response:
        """What the page polls: the subject's current usage, its days and unread alerts."""
        tenant = await self._link_tenant(request)
        subject = request.path_params["subject"]
        now = datetime.now(timezone.utc)
        try:
            usage = await self.service().usage(tenant, subject, None, "current", now)
            history = await self.service().history(tenant, subject, None, "current", now)
        except NotFound as exc:
            raise Problem(404, "Not Found", str(exc)) from None
        except Unreadable as exc:
            raise Problem(409, "Subscription cannot be read", str(exc)) from None
        alerts = await self._edge.pool.fetch(
            "select * from usage_alerts where tenant = $1 and subject = $2 and read_at is null order by id desc"
            " limit 20", tenant, subject)
        return Response(orjson.dumps({"usage": usage, "history": history, "alerts": [_shown(a) for a in alerts]}),
                        200, {"Cache-Control": "no-store"}, media_type="application/json")

    async def asset(self, request: Request) -> Response:
        found = ASSETS.get(request.path_params["name"])
        if found is None:
            raise Problem(404, "Not Found")
        return Response(found[0], 200, {"Cache-Control": "max-age=300"}, media_type=found[1])

    async def _read(self, request: Request, read: Any) -> Response:
        tenant = await self._edge.tenant(request, READ)
        q = parse(UsageQuery, request.query_params)
        try:
            body = await read(tenant, q.subject, q.meter, str(q.period), datetime.now(timezone.utc))
        except PeriodError as exc:
            raise Problem(400, "Invalid request", str(exc), errors=[{"field": "period", "message": str(exc)}]) from None
        except NotFound as exc:
            raise Problem(404, "Not Found", str(exc)) from None
        except Unreadable as exc:
            raise Problem(409, "Subscription cannot be read", str(exc)) from None
        return _json(body)

    def openapi_paths(self) -> dict[str, Any]:
        def op(summary: str, scope: str, params: list[dict[str, Any]] | None = None, ok: str = "200",
               body: dict[str, Any] | None = None, errors: tuple[int, ...] = (400, 404),
               answer: dict[str, Any] | None = None) -> dict[str, Any]:
            statuses = sorted({*errors, 401, 403, 429, 503, *((413,) if body else ())})
            operation: dict[str, Any] = {
                "summary": summary, "description": f"Needs an API key with scope `{scope}`.",
                "security": [{"apiKey": []}], "parameters": params or [],
                "responses": {ok: {"description": "OK", **({} if ok == "204" else {"content": {
                    "application/json": {"schema": answer or {"type": "object"}}}})},
                              **{str(s): _problem_response(s) for s in statuses}}}
            if body is not None:
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
            return operation

        def path(name: str, schema: dict[str, Any]) -> list[dict[str, Any]]:
            if schema["type"] == "string":
                schema = {**schema, "pattern": NO_NUL}
            return [{"name": name, "in": "path", "required": True, "schema": schema}]

        link_body = {"type": "object", "required": ["subject"], "additionalProperties": False,
                     "properties": {"subject": {"type": "string", "minLength": 1, "maxLength": 256,
                                                "pattern": "^[^/\\u0000]*$"},
                                    "ttl_s": {"type": "integer", "minimum": 60, "maximum": 7776000}}}
        slack_body = {"type": "object", "required": ["webhook_url"], "additionalProperties": False,
                      "properties": {"webhook_url": {
                          "anyOf": [{"type": "string", "maxLength": 2048, "pattern": "^https?://[^\\u0000]*$"},
                                    {"type": "null"}],
                          "description": "a Slack incoming webhook (on a Slack hook host), or null to turn Slack off;"
                                         " a URL that may not be called is a 422 naming webhook_url"}}}
        subject = path("subject", {"type": "string", "minLength": 1, "maxLength": 256})
        return {
            "/v1/plans": {"post": op("Create a plan, or a new version of it effective from now (docs/adr/0060); every"
                                     " meter must be a configured COUNT or SUM meter with an hour window and no"
                                     " group_by (422); 409 past the tenant's bound on plans", ADMIN, ok="201",
                                     body=json_schema(Plan), errors=(400, 409, 422)),
                          "get": op("List plans (current versions)", READ, errors=(400,))},
            "/v1/plans/{plan_id}": {"get": op("A plan's current version and every version it had", READ,
                                              path("plan_id", {"type": "string", "minLength": 1, "maxLength": 64}))},
            "/v1/subscriptions/{subject}": {
                "put": op("Create a subscription (plan_id required; anchor day 1, UTC, from today unless named) or"
                          " change only what the body names: a plan or customer change is a new version, billed"
                          " from the next whole hour; anchor_day, time_zone and start_date cannot change once the"
                          " first period has begun (422); 409 past the tenant's bound on subscriptions", ADMIN,
                          subject, body=json_schema(SubscriptionChange), errors=(400, 404, 409, 422)),
                "get": op("A subscription with every version it had", READ, subject)},
            "/v1/subscriptions": {"get": op("List subscriptions", READ, [
                {"name": "subject", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": NO_NUL}}], errors=(400,))},
            "/v1/usage": {"get": op("A subject's usage per meter in a billing period (409: the stored subscription's"
                                    " periods cannot be computed)", READ, parameters(UsageQuery),
                                    errors=(400, 404, 409), answer=_answer(USAGE_FIGURES))},
            "/v1/usage/history": {"get": op("A subject's usage per day of a billing period (409: the stored"
                                            " subscription's periods cannot be computed)", READ,
                                            parameters(UsageQuery), errors=(400, 404, 409),
                                            answer=_answer(HISTORY_FIGURES))},
            "/v1/usage/alerts": {"get": op("Usage alerts, newest first", READ, parameters(AlertsQuery),
                                           errors=(400,))},
            "/v1/usage/alerts/{id}/read": {"post": op("Mark an alert read", ADMIN, path("id", {"type": "integer"}))},
            "/v1/usage/slack": {"put": op("Set the Slack incoming-webhook URL for usage alerts (null: none)", ADMIN,
                                          body=slack_body, errors=(400, 422))},
            "/v1/usage/links": {
                "post": op("A signed, expiring link to a subject's usage page; 503 until the gateway has "
                           "TALLY_USAGE_LINK_SECRET, 409 past the tenant's live links", ADMIN, ok="201",
                           body=link_body, errors=(400, 409)),
                "delete": op("Revoke every live link minted by one API key", ADMIN, [
                    {"name": "key_id", "in": "query", "required": True,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": NO_NUL}}],
                    errors=(400,))},
            "/v1/usage/links/{id}": {"delete": op("Revoke one usage link", ADMIN, path("id", {"type": "integer"}),
                                                  ok="204")},
        }


_TEXT = {"type": "string"}
_DECIMAL = {"type": "string", "description": "an exact decimal"}
_BACKFILLING = {"type": "boolean", "description": "the meter is new and its stored past is still being counted: "
                                                  "`used` is short of it until this turns false (docs/adr/0140)"}
USAGE_FIGURES = {
    "type": "object",
    "required": ["meter", "used", "included", "remaining", "overage", "percent", "limit_mode", "as_of", "backfilling",
                 "period_start", "period_end"],
    "properties": {"meter": _TEXT, "used": _DECIMAL, "included": _DECIMAL, "remaining": _DECIMAL, "overage": _DECIMAL,
                   "percent": {"type": ["number", "null"]}, "limit_mode": {"enum": ["soft", "hard"]},
                   "as_of": {"type": ["string", "null"], "format": "date-time"}, "backfilling": _BACKFILLING,
                   "period_start": _TEXT, "period_end": _TEXT}}
HISTORY_FIGURES = {
    "type": "object", "required": ["meter", "included", "days", "backfilling"],
    "properties": {"meter": _TEXT, "included": _DECIMAL, "backfilling": _BACKFILLING,
                   "days": {"type": "array", "items": {
                       "type": "object", "required": ["date", "used", "cumulative"],
                       "properties": {"date": {"type": "string", "format": "date"}, "used": _DECIMAL,
                                      "cumulative": _DECIMAL}}}}}


def _answer(figures: dict[str, Any]) -> dict[str, Any]:
    """A usage read's answer: the period and the figures of each meter of the plan."""
    return {"type": "object", "required": ["subject", "plan", "period_start", "period_end", "meters"],
            "properties": {"subject": _TEXT, "plan": _TEXT, "period_start": _TEXT, "period_end": _TEXT,
                           "meters": {"type": "array", "items": figures}}}


def _problem_response(status: int) -> dict[str, Any]:
    return {"description": HTTPStatus(status).phrase,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
