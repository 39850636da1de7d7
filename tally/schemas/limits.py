"""The hard-limit decision in Redis: written by the usage product (`tally.usage.limits`), read by the gateway
(`tally.ingest.limits`); neither imports the other, both import this layout.

- `{prefix}limits:tenants`: a set of the tenants with any hard-limited plan; the gateway checks no
  other tenant's events;
- `{prefix}limits:tenant:{tenant}`: a hash, subject -> JSON list of blocks `[event type glob, meter, period end]`
  (`tenant:` keeps a tenant named `tenants` off the set's key);
- `{prefix}limits-digest`: the SHA-256 of the whole decision, so the gateway copies the blocks again
  only when they changed (a thousand blocks cost it some 10 ms of its event loop to read).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import orjson

Decision = dict[str, dict[str, list[list[str]]]]  # tenant -> subject -> blocks [event type glob, meter, period end]


def tenants_key(prefix: str) -> str:
    return f"{prefix}limits:tenants"


def tenant_key(prefix: str, tenant: str) -> str:
    return f"{prefix}limits:tenant:{tenant}"


def digest_key(prefix: str) -> str:
    return f"{prefix}limits-digest"


def digest(decision: Decision) -> str:
    return hashlib.sha256(orjson.dumps(decision, option=orjson.OPT_SORT_KEYS)).hexdigest()


def encode_blocks(blocks: list[list[str]]) -> bytes:
    return orjson.dumps(blocks)


def decode_blocks(raw: bytes) -> list[tuple[str, str, datetime]]:
    """A subject's blocks as (event type glob, meter, period end)."""
    return [(glob, meter, datetime.fromisoformat(until)) for glob, meter, until in orjson.loads(raw)]
