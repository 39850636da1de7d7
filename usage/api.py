"""The usage product's HTTP routes: plans and subscriptions (scope admin:write to change, usage:read to
read), `GET /v1/usage` and `GET /v1/usage/history`. The tenant always comes from the API key."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import redis.asyncio as redis
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from alerts.policy import configured as alert_policy
from egress import Refused as TargetRefused, check_target, endpoint
from ingest.problems import Problem, validation_errors
from ingest.products import Edge
from meters.definitions import MetersConfig
from usage import links
from usage.alerts import message
from usage.changes import SubjectChanges
from usage.figures import NotFound, Unreadable, UsageService
from usage.periods import PeriodError
from usage.plan_changes import PlanChanges
from usage.plans import (SLUG, Plan, QuotaExceeded, Refused, SubscriptionChange, UnknownPlan, change_subscription,
                         check_meters, load_plans, load_subscriptions, plan_history, save_plan, subscription_history)
from usage.windows import WindowReader

ADMIN, READ = "admin:write", "usage:read"
STATIC = Path(__file__).parent / "static"
PAGE = (STATIC / "page.html").read_text()
ASSETS = {"page.js": ((STATIC / "page.js").read_bytes(), "text/javascript"),
          "page.css": ((STATIC / "page.css").read_bytes(), "text/css")}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "Invalid JSON", str(exc)) from None


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


def _with(operation: dict[str, Any], extra: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    return {**operation, **extra, "responses": {**operation["responses"], **responses}}


def _subject(subject: str) -> str:
    if len(subject.encode()) > 256 or "\x00" in subject:
        raise Problem(400, "Invalid request", "subject is at most 256 bytes, without NUL characters",
                      errors=[{"field": "subject", "message": "at most 256 bytes, without NUL characters"}])
    return subject


class UsageProduct:
    """`ingest.products.Product` for usage; Redis is its own client on the gateway's loop, made on first use."""

    def __init__(self, database_url: str, redis_url: str, redis_prefix: str, cache_ttl_s: int, meters: MetersConfig,
                 link_secret: str = "", page_poll_s: float = 30.0, max_plans: int | None = None,
                 max_subscriptions: int | None = None) -> None:
        self._database_url = database_url
        self._meters = meters
        self._max_plans = max_plans
        self._max_subscriptions = max_subscriptions
        self._redis_url = redis_url
        self._prefix = redis_prefix
        self._cache_ttl_s = cache_ttl_s
        self._link_secret = link_secret
        self._page_poll_s = page_poll_s
        self._service: UsageService | None = None
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
            Route("/usage/{subject}", self.page, methods=["GET"]),
            Route("/usage/{subject}/data", self.page_data, methods=["GET"]),
            Route("/usage-assets/{name}", self.asset, methods=["GET"]),
        ]

    def service(self) -> UsageService:
        if self._service is None:
            client = redis.Redis.from_url(self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            reader = WindowReader(self._edge.pool, client, self._prefix, self._cache_ttl_s)
            self._service = UsageService(self._edge.pool, reader, changes=SubjectChanges(client, self._prefix),
                                         plans=PlanChanges(self._database_url))
        return self._service

    async def put_plan(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, ADMIN)
        try:
            plan = Plan.model_validate(await _body(request))
            check_meters(plan, self._meters)
            async with self._edge.pool.acquire() as conn:
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
        q = request.query_params
        rows = await self._edge.pool.fetch(
            "select * from usage_alerts where tenant = $1 and ($2::text is null or subject = $2)"
            " and (not $3 or read_at is null) order by id desc limit 200",
            tenant, q.get("subject"), q.get("unread") == "true")
        return _json({"alerts": [message(r) for r in rows]})

    async def read_alert(self, request: Request) -> Response:
        tenant = await self._edge.tenant(request, READ)
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
        if not isinstance(body, dict) or "webhook_url" not in body:
            raise Problem(400, "Invalid request", "the body is an object with webhook_url (a URL or null)",
                          errors=[{"field": "webhook_url", "message": "required: a Slack incoming-webhook URL or null"}])
        url, policy = body["webhook_url"], alert_policy()
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
        """A signed link to one subject's usage page, valid `ttl_s` seconds (default 7 days, at most 90)."""
        tenant = await self._edge.tenant(request, READ)
        if not self._link_secret:
            raise Problem(503, "Usage links are not configured", "set TALLY_USAGE_LINK_SECRET on the gateway")
        body = await _body(request)
        subject = body.get("subject") if isinstance(body, dict) else None
        ttl_s = body.get("ttl_s", 7 * 86400) if isinstance(body, dict) else None
        if not isinstance(subject, str) or not subject or "/" in subject:
            raise Problem(400, "Invalid request", "subject is required",
                          errors=[{"field": "subject", "message": "a subject without '/'"}])
        if not isinstance(ttl_s, int) or not 60 <= ttl_s <= 90 * 86400:
            raise Problem(400, "Invalid request", "ttl_s is 60 to 7776000 seconds",
                          errors=[{"field": "ttl_s", "message": "60 to 7776000"}])
        expires = int(time.time()) + ttl_s
        token = links.sign(self._link_secret, tenant, subject, expires)
        return _json({"url": f"/usage/{quote(subject, safe='')}?token={token}",
                      "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat()}, 201)

    def _link_tenant(self, request: Request) -> str:
        if not self._link_secret:
            raise Problem(404, "Not Found")
        try:
            return links.verify(self._link_secret, request.query_params.get("token", ""),
                                request.path_params["subject"])
        except links.BadLink as exc:
            raise Problem(403, "Forbidden", str(exc)) from None

    async def page(self, request: Request) -> Response:
        """The usage page itself; everything it loads comes from this server (CSP default-src 'self')."""
        self._link_tenant(request)
        html = PAGE.replace("{poll_s}", f"{self._page_poll_s:g}")
        return Response(html, 200, PAGE_HEADERS, media_type="text/html")

    async def page_data(self, request: Request) -> Response:
        """What the page polls: the subject's current usage, its days and unread alerts."""
        tenant = self._link_tenant(request)
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
        return Response(orjson.dumps({"usage": usage, "history": history, "alerts": [message(a) for a in alerts]}),
                        200, {"Cache-Control": "no-store"}, media_type="application/json")

    async def asset(self, request: Request) -> Response:
        found = ASSETS.get(request.path_params["name"])
        if found is None:
            raise Problem(404, "Not Found")
        return Response(found[0], 200, {"Cache-Control": "max-age=300"}, media_type=found[1])

    async def _read(self, request: Request, read: Any) -> Response:
        tenant = await self._edge.tenant(request, READ)
        q = request.query_params
        subject = q.get("subject")
        if not subject:
            raise Problem(400, "Invalid request", "subject is required",
                          errors=[{"field": "subject", "message": "required"}])
        try:
            body = await read(tenant, subject, q.get("meter"), q.get("period", "current"), datetime.now(timezone.utc))
        except PeriodError as exc:
            raise Problem(400, "Invalid request", str(exc), errors=[{"field": "period", "message": str(exc)}]) from None
        except NotFound as exc:
            raise Problem(404, "Not Found", str(exc)) from None
        except Unreadable as exc:
            raise Problem(409, "Subscription cannot be read", str(exc)) from None
        return _json(body)

    @staticmethod
    def _slack_openapi(operation: dict[str, Any]) -> dict[str, Any]:
        """PUT /v1/usage/slack: its body, and 422 for a URL `tally alerts` would not call."""
        operation["responses"]["422"] = {"description": "a URL that may not be called (the reason names webhook_url)"}
        return {**operation, "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["webhook_url"], "properties": {"webhook_url": {
                "type": ["string", "null"], "maxLength": 2048,
                "description": "a Slack incoming webhook (on a Slack hook host), or null to turn Slack off"}}}}}}}

    def openapi_paths(self) -> dict[str, Any]:
        def op(summary: str, scope: str, params: list[str] = ()) -> dict[str, Any]:
            return {"summary": summary, "description": f"Needs an API key with scope `{scope}`.",
                    "parameters": [{"name": p, "in": "query", "required": p == "subject", "schema": {"type": "string"}}
                                   for p in params],
                    "responses": {"200": {"description": "OK"}, "400": {"description": "invalid request"},
                                  "404": {"description": "no such subscription, plan or meter"}}}

        json_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}
        refusals = {"409": {"description": "the tenant's bound on plans or subscriptions is reached"},
                    "422": {"description": "the change cannot be applied; `errors` names each field and why"}}
        subject = [{"name": "subject", "in": "path", "required": True, "schema": {"type": "string"}}]
        unreadable = {"409": {"description": "the stored subscription's periods cannot be computed (its zone)"}}
        return {
            "/v1/plans": {"post": _with(op("Create a plan, or a new version of it effective from now (docs/adr/0060);"
                                           " every meter must be a configured COUNT or SUM meter with an hour"
                                           " window and no group_by", ADMIN), json_body, refusals),
                          "get": op("List plans (current versions)", READ)},
            "/v1/plans/{plan_id}": {"get": {
                **op("A plan's current version and every version it had", READ),
                "parameters": [{"name": "plan_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
            "/v1/subscriptions/{subject}": {
                "put": _with(op("Create a subscription (plan_id required; anchor day 1, UTC, from today unless"
                                " named) or change only what the body names: a plan or customer change is a new"
                                " version, billed from the next whole hour; anchor_day, time_zone and start_date"
                                " cannot change once the first period has begun (422)", ADMIN),
                             {"parameters": subject, **json_body}, refusals),
                "get": {**op("A subscription with every version it had", READ), "parameters": subject}},
            "/v1/subscriptions": {"get": op("List subscriptions", READ, ["subject"])},
            "/v1/usage": {"get": _with(op("A subject's usage per meter in a billing period", READ,
                                          ["subject", "meter", "period"]), {}, unreadable)},
            "/v1/usage/history": {"get": _with(op("A subject's usage per day of a billing period", READ,
                                                  ["subject", "meter", "period"]), {}, unreadable)},
            "/v1/usage/alerts": {"get": op("Usage alerts, newest first", READ, ["subject", "unread"])},
            "/v1/usage/alerts/{id}/read": {"post": {
                **op("Mark an alert read", READ),
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]}},
            "/v1/usage/slack": {"put": self._slack_openapi(op("Set the Slack incoming-webhook URL for usage alerts",
                                                              ADMIN))},
            "/v1/usage/links": {"post": {**op("A signed, expiring link to a subject's usage page", READ),
                                         **json_body}},
        }
