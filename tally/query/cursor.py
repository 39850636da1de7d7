"""Opaque page cursors: where the last page ended, signed for one tenant and one query.

A cursor names a position in the total order (time, source, id), so pages never skip or repeat a
row however many arrive meanwhile. It is signed with the tenant and the query's filters (the read API
puts its route in them too), so it is refused (not silently misread) by another tenant, beside other
filters or on another route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

import orjson

from tally.edge.problems import Problem

Position = tuple[datetime, str, str]


class Cursors:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, tenant: str, query: str, position: Position) -> str:
        moment, source, id_ = position
        payload = base64.urlsafe_b64encode(orjson.dumps([moment.isoformat(), source, id_])).rstrip(b"=")
        return f"{payload.decode()}.{self._mac(tenant, query, payload)}"

    def decode(self, tenant: str, query: str, token: str) -> Position:
        payload, _, mac = token.encode().partition(b".")
        if not hmac.compare_digest(mac, self._mac(tenant, query, payload).encode()):
            raise invalid_cursor()
        try:
            moment, source, id_ = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
            return datetime.fromisoformat(moment), source, id_
        except (ValueError, TypeError):
            raise invalid_cursor() from None

    def _mac(self, tenant: str, query: str, payload: bytes) -> str:
        message = orjson.dumps([tenant, query, payload.decode()])
        return base64.urlsafe_b64encode(hmac.new(self._secret, message, hashlib.sha256).digest()[:18]).decode()


def invalid_cursor() -> Problem:
    return Problem(400, "Invalid cursor", "the cursor is not one this query's previous page returned",
                   errors=[{"field": "cursor", "message": "unknown, altered, or from another query"}])
