"""The README's "Logs and alerts" walk-through runs as written against a gateway, a processor and an evaluator
of the test's own, started once (only addresses, the tally command and the tenant swapped; nothing exported or
restarted), and prints what its comments promise; its Python snippet verifies a signature (the kill test verifies
Tally's own deliveries)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import asyncpg
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tally.settings import Settings
from tests.gateway.helpers import start_gateway
from tests.support import readme_blocks, readme_walkthrough, run_walkthrough, running



def test_the_receiving_snippet_verifies_a_signed_body_and_refuses_a_forged_one() -> None:
    namespace: dict = {}
    exec(readme_blocks("Logs and alerts", "python")[0], namespace)  # the README's own code
    secret = "whsec_" + "dGhlLXJlYWRtZS1zZWNyZXQtMTIzNA=="
    body, at = b'{"id": "alert-7", "type": "alert.firing"}', datetime.now(timezone.utc)
    headers = {"webhook-id": "alert-7", "webhook-timestamp": str(int(at.timestamp())),
               "webhook-signature": Webhook(secret).sign("alert-7", at, body.decode())}
    assert namespace["receive"](body, headers, secret)["id"] == "alert-7"
    with pytest.raises(WebhookVerificationError):
        namespace["receive"](body.replace(b"firing", b"resolved"), headers, secret)


async def test_the_walkthrough_runs_and_the_rule_fires(alone: Settings, alone_db: asyncpg.Connection) -> None:
    walk = readme_walkthrough("Logs and alerts")[0]
    settings = alone.model_copy(update={"processor_metrics_port": 0, "alerts_metrics_port": 0})
    tenant = f"walk-{uuid.uuid4().hex[:8]}"
    with start_gateway("gateway", settings) as gw, running("processor", ["process"], settings), \
            running("alerts", ["alerts"], settings):
        out = await asyncio.to_thread(run_walkthrough, walk, gw.url, tenant, settings)
    assert out.count("payment declined for order") == 4
    assert '"level":"error","points":[{' in out and '"total":4}' in out
    assert '{"active":[{"rule":{"id":"checkout-errors","name":"Checkout errors"},"group":{}' in out
    assert '"type":"alert.firing"' in out and '"value":"4","threshold":"3"' in out
    kinds = await alone_db.fetch("select kind from alert_transitions where tenant = $1", tenant)
    assert [r["kind"] for r in kinds] == ["firing"]
