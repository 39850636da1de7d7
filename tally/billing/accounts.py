"""Each tenant's own Stripe account (security review H6).

Every report row goes out with the Stripe-Account header of the tenant that owns it, so a tenant's
customer ids and meter event names can only ever reach that tenant's connected account; a tenant
without an account is not reported at all. Only the platform operator sets accounts (the CLI): a
tenant's API key could otherwise name another tenant's account.
"""

from __future__ import annotations

import re

import asyncpg

ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")


class InvalidAccount(ValueError):
    pass


async def set_account(conn: asyncpg.Connection, tenant: str, account: str) -> None:
    if not ACCOUNT.match(account):
        raise InvalidAccount(f"{account!r} is not a Stripe account id (acct_ and up to 64 letters or digits)")
    await conn.execute("insert into billing_accounts (tenant, stripe_account) values ($1, $2) on conflict (tenant)"
                       " do update set stripe_account = excluded.stripe_account, updated_at = now()", tenant, account)


async def accounts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, str]:
    """tenant -> its Stripe account."""
    return {r["tenant"]: r["stripe_account"] for r in await conn.fetch("select * from billing_accounts")}


async def listing(conn: asyncpg.Connection) -> list[tuple[str, str | None]]:
    """Every tenant with subscriptions or an account, and its account (None: not reported)."""
    rows = await conn.fetch("select t.tenant, a.stripe_account from (select tenant from subscriptions union"
                            " select tenant from billing_accounts) t left join billing_accounts a using (tenant)"
                            " order by t.tenant")
    return [(r["tenant"], r["stripe_account"]) for r in rows]
