"""Scopes mean what they say (security review, lows): a key is never created with a scope no route checks,
so a typo is refused rather than producing a key that silently lacks the intended right."""

from __future__ import annotations

import subprocess
import sys
import uuid

import asyncpg
import pytest

from tally.ingest.auth import SCOPES, create_key
from tally.settings import ROOT, Settings
from tests.support import env_for


def test_tally_keys_create_refuses_an_unknown_scope(settings: Settings) -> None:
    tenant = f"scopes-{uuid.uuid4().hex[:8]}"
    run = subprocess.run([sys.executable, "-m", "tally.cli", "keys", "create", "--tenant", tenant, "--name", "n",
                          "--scope", "usage:read", "--scope", "evnets:write"], capture_output=True, text=True,
                         timeout=60, env=env_for(settings), cwd=ROOT)
    listed = subprocess.run([sys.executable, "-m", "tally.cli", "keys", "list", "--tenant", tenant],
                            capture_output=True, text=True, timeout=60, env=env_for(settings), cwd=ROOT)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "evnets:write" in run.stderr and "events:write" in run.stderr  # names the typo and the known scopes
    assert tenant not in listed.stdout


async def test_create_key_refuses_an_unknown_scope(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        with pytest.raises(ValueError, match="logs:raed"):
            await create_key(conn, "t", "n", ["logs:raed"])
        key_id, _ = await create_key(conn, "t", "n", list(SCOPES))
    finally:
        await conn.close()
    assert key_id
