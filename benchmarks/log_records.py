"""Realistic log records made in SQL, so 10 million of them cost one statement per chunk, not a Python loop.

One generator serves both the seeded read database (inserted as the processor's rows) and the intake
drain (selected and published to Kafka as the gateway publishes): the rows are the same either way.
Record n is a pure function of n and of the time range, so a seed can be rebuilt identically.

Skew as in real fleets: service k of 50 gets a share falling with k (the first 14%, the last 1%);
levels are 2% trace, 13% debug, 70% info, 10% warn, 4.5% error, 0.5% fatal; warn and above come
from the failure templates. Words range from common ("shipped", ~9% of records) to one-off order ids,
so a word search meets every selectivity. 70% of records carry a trace id shared by 8 neighbours.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

SERVICES = [f"{name}-{kind}" for kind in ("api", "worker") for name in (
    "checkout", "payments", "auth", "search", "catalog", "cart", "orders", "shipping", "billing", "users",
    "inventory", "pricing", "recommend", "email", "sms", "notify", "ledger", "invoices", "reports", "export",
    "import", "media", "thumbnails", "webhooks", "gateway")]
LEVELS = [("trace", 0.02), ("debug", 0.15), ("info", 0.85), ("warn", 0.95), ("error", 0.995), ("fatal", 1.0)]
RESOURCES = ["users", "orders", "invoices", "carts", "sessions", "products", "payments", "shipments", "coupons",
             "accounts", "reports", "webhooks"]
METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
STATUSES = ["200", "200", "200", "201", "204", "301", "400", "401", "403", "404", "409", "429", "500", "503"]
HOSTS = ["db-primary", "db-replica-1", "db-replica-2", "redis-cache", "kafka-broker-2", "search-cluster",
         "payments-gateway", "smtp-relay", "object-storage", "geo-service"]
REASONS = ["insufficient funds", "card expired", "fraud suspected", "limit exceeded", "invalid cvc",
           "issuer unavailable"]
ERRORS = ["connection refused", "deadline exceeded", "broken pipe", "connection reset by peer",
          "tls handshake failed", "out of memory", "disk quota exceeded", "too many open files"]
COUNTRIES = ["germany", "france", "spain", "italy", "norway", "sweden", "poland", "austria", "portugal", "ireland",
             "japan", "canada", "brazil", "mexico", "india", "kenya", "egypt", "chile", "peru", "vietnam"]
CARRIERS = ["dhl", "ups", "fedex", "postnl", "gls"]
TABLES = ["users", "orders", "line_items", "invoices", "audit_log", "sessions", "products", "payments"]
# What a GET /v1/logs?q= load searches for: common words, rarer pairs, and id-like words ({n} a random
# number below the bound) that occur a few times a week or not at all.
SEARCHES = ["shipped", "declined", "insufficient funds", "connection refused", "audit_log", "shipped norway",
            "tls handshake failed", "job-{n}:10000", "user-{n}:200000", "ord-{n}:3000000"]

_PICK = "({0})[1 + abs(({1}) % cardinality({0}))]"
_UNIT = "(({0} & 1048575) / 1048576.0)"

# $1 first n, $2 last n, $3 rows in all, $4 end of the time range, $5 its length; then the word lists.
ROWS = f"""
select n, svc, lvl, t, t + make_interval(secs => 0.05 + abs(h4 % 500) / 1000.0) as received_at,
       md5('log' || n) as id,
       jsonb_strip_nulls(jsonb_build_object(
           'service', svc, 'level', lvl, 'message', message,
           'attributes', jsonb_build_object('host', 'pod-' || abs(h4 % 40), 'route', '/api/v1/' || res,
                                            'status', status::int),
           'trace_id', case when abs(h2 % 10) < 7 then md5('trace' || (n / 8)) end,
           'span_id', case when abs(h2 % 10) < 7 then substr(md5('span' || n), 1, 16) end)) as data
from (
    select n, h2, h4, svc, lvl, t, res, status,
           case tpl
               when 0 then {_PICK.format('$7::text[]', 'h4 >> 3')} || ' /api/v1/' || res || '/' || abs(h4 % 100000)
                           || ' returned ' || status || ' in ' || ms || ' ms'
               when 1 then 'user user-' || abs((h4 >> 5) % 200000) || ' signed in from 10.' || abs(h4 % 256) || '.'
                           || abs((h4 >> 8) % 256) || '.' || abs((h4 >> 16) % 256)
               when 2 then 'payment for order ord-' || abs((h4 >> 7) % 3000000) || ' declined: '
                           || {_PICK.format('$10::text[]', 'h4 >> 2')}
               when 3 then 'connection to ' || host || ' failed: ' || err || ' after ' || ms || ' ms'
               when 4 then 'cache miss for ' || res || ' ' || abs(h4 % 100000) || ', loaded from ' || host || ' in '
                           || ms || ' ms'
               when 5 then 'retrying job job-' || abs((h4 >> 9) % 10000) || ' (attempt ' || (1 + abs(h4 % 4))
                           || ' of 5): ' || err
               when 6 then 'order ord-' || abs((h4 >> 7) % 3000000) || ' shipped to '
                           || {_PICK.format('$12::text[]', 'h4 >> 4')} || ' via '
                           || {_PICK.format('$13::text[]', 'h4 >> 11')}
               when 7 then 'slow query on ' || {_PICK.format('$14::text[]', 'h4 >> 6')} || ' took ' || ms || ' ms'
               when 8 then 'published ' || abs(h4 % 500) || ' events to topic ' || res || '.changes'
               else 'health check passed for ' || host
           end as message
    from (
        select n, h2, h4, t,
               {_PICK.format('$6::text[]', 'floor(50 * power(' + _UNIT.format('h1') + ', 2))::int')} as svc,
               lvl,
               case when lvl in ('warn', 'error', 'fatal') then (array[2, 3, 5, 7])[1 + abs(h3 % 4)]
                    else abs(h3 % 10) end as tpl,
               {_PICK.format('$15::text[]', 'h3 >> 4')} as res,
               {_PICK.format('$8::text[]', 'h3 >> 8')} as status,
               {_PICK.format('$9::text[]', 'h3 >> 12')} as host,
               {_PICK.format('$11::text[]', 'h3 >> 16')} as err,
               abs((h3 >> 20) % 2000) as ms
        from (
            select n, h1, h2, h3, h4,
                   $4::timestamptz - $5::interval + $5::interval * ((n + {_UNIT.format('h4')}) / $3::float8) as t,
                   case {' '.join(f"when {_UNIT.format('h2')} < {bound} then '{level}'" for level, bound in LEVELS[:-1])}
                        else '{LEVELS[-1][0]}' end as lvl
            from generate_series($1::bigint, $2::bigint) as n,
                 lateral (select hashint8extended(n, 1) as h1, hashint8extended(n, 2) as h2,
                                 hashint8extended(n, 3) as h3, hashint8extended(n, 4) as h4) as h
        ) as drawn
    ) as picked
) as made
"""


def arguments(first: int, last: int, total: int, until: datetime, span: timedelta) -> list[Any]:
    """ROWS's parameters: records first..last of `total` spread evenly over the `span` before `until`."""
    return [first, last, total, until, span, SERVICES, METHODS, STATUSES, HOSTS, REASONS, ERRORS, COUNTRIES,
            CARRIERS, TABLES, RESOURCES]
