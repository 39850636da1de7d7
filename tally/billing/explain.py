"""The invoice-line proof: for one subject and period, per meter, the hour windows, the same windows
recomputed from the raw events, every Stripe report row with its status, Stripe's own summary, and
whether they all agree. It is what answers a customer's dispute in a minute.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

import asyncpg
import stripe

from tally.billing.accounts import accounts
from tally.billing.context import JobContext
from tally.billing.reconcile import recompute
from tally.billing.stripe_report import COUNTED, StripeSender, whole
from tally.usage.periods import Period, PeriodError, period_of_date
from tally.usage.plans import load_subscriptions
from tally.usage.terms import terms_for
from tally.usage.windows import combine, from_postgres


class NothingToExplain(LookupError):
    pass


@dataclass
class MeterProof:
    meter: str
    counter: str  # the counter its windows are read under: the readable version's (`slug@N` after a change)
    event_name: str
    hours: list[tuple[datetime, Decimal | None, Decimal | None]]  # (hour, stored window, recomputed from events)
    used: Decimal
    used_from_events: Decimal
    billable: Decimal
    rows: list[asyncpg.Record]
    reported: Decimal  # what the rows hold: counted statuses, carries included
    at_stripe: Decimal  # sent rows stamped inside the period, as Stripe's summary should show them
    stripe_summary: Decimal | None  # None: not asked, or no such meter at Stripe
    problems: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return not self.problems


@dataclass
class Proof:
    tenant: str
    subject: str
    period: Period
    plans: str  # the plan versions that billed the period, each from when
    customer: str | None
    account: str | None
    meters: list[MeterProof]

    @property
    def agrees(self) -> bool:
        return all(m.agrees for m in self.meters)


def _check(m: MeterProof, final: bool) -> None:
    if any(stored != recomputed for _, stored, recomputed in m.hours):
        m.problems.append("stored windows differ from the raw events (tally reconcile --fix)")
    gap = m.billable - m.reported
    if gap < 0:
        m.problems.append(f"rows hold {m.reported}, {-gap} more than billable: taken back by the next report (a "
                          "cancel within 24 h, else a credit on the next period)")
    elif gap >= 1 or (final and gap > 0):  # below one unit waits while the period runs (docs/adr/0065)
        m.problems.append(f"{gap} billable not in rows yet: the next report writes or carries it")
    if any(r["status"] in ("failed", "held") for r in m.rows):
        m.problems.append("rows wait for a person: tally billing rows")


def _check_stripe(m: MeterProof) -> None:
    if m.stripe_summary is not None and m.stripe_summary != m.at_stripe:
        m.problems.append(f"Stripe's summary is {m.stripe_summary}, our sent rows stamped in the period hold "
                          f"{m.at_stripe} (Stripe aggregates asynchronously; rows of other subjects with the same "
                          "customer count there too)")


async def explain(ctx: JobContext, tenant: str, subject: str, day: date, sender: StripeSender | None,
                  now: datetime) -> Proof:
    async with ctx.pool.acquire() as conn:
        found = await load_subscriptions(conn, tenant, subject)
        if not found:
            raise NothingToExplain(f"{tenant} has no subscription for {subject!r}")
        sub = found[0][1]
        try:
            period = period_of_date(sub.anchor(), day)
        except PeriodError as exc:
            raise NothingToExplain(str(exc)) from None
        terms = await terms_for(conn, tenant, subject, period)
        if terms is None:
            raise NothingToExplain(f"{subject} had no plan in the period {period.label}")
        account = (await accounts(conn)).get(tenant)
        counters = (await ctx.catalog()).counters(tenant, terms.meters())
        windows = await from_postgres(conn, tenant, subject, terms.meters(), period.start, period.end, counters)
        rows = await conn.fetch("select * from stripe_reports where tenant = $1 and subject = $2 and period_label = $3"
                                " order by meter, seq", tenant, subject, period.label)
    raw = await recompute(ctx, period.start, period.end, tenant, subject)
    final = now >= period.end
    proofs = []
    for meter in terms.meters():
        pm = terms.meter(meter)[1]
        events = {d.key.window_start: d.value for d in raw.values() if d.key.subject == subject
                  and d.key.meter == counters[pm.meter] and d.key.window == "hour" and not d.key.group}
        stored = {start: w.value for start, w in windows[pm.meter].items()}
        hours = [(h, stored.get(h), events.get(h)) for h in sorted(stored.keys() | events.keys())]
        mine = [r for r in rows if r["meter"] == pm.meter]
        used = combine(list(windows[pm.meter].values()))
        proof = MeterProof(
            pm.meter, counters[pm.meter], pm.stripe_event or pm.meter, hours, used, sum(events.values(), Decimal(0)),
            terms.billable(meter, windows[meter]), mine, sum((r["value"] for r in mine if r["status"] in COUNTED), Decimal(0)),
            sum((r["value"] for r in mine if r["status"] == "sent" and period.start <= r["event_time"] < period.end),
                Decimal(0)), None)
        _check(proof, final)
        if sender is not None and account and sub.stripe_customer_id:
            try:
                proof.stripe_summary = await asyncio.to_thread(sender.summary, account, proof.event_name,
                                                               sub.stripe_customer_id, period.start, period.end)
            except (stripe.StripeError, OSError) as exc:
                proof.problems.append(f"Stripe's summary could not be read: {type(exc).__name__}: {exc}")
            _check_stripe(proof)
        proofs.append(proof)
    plans = ", ".join(f"{s.plan.id} v{s.version} from {s.start:%Y-%m-%d %H:%M}" for s in terms.segments)
    return Proof(tenant, subject, period, plans, sub.stripe_customer_id, account, proofs)


def lines(proof: Proof) -> list[str]:
    """The proof as text, one fact a line."""
    p = proof.period
    account = proof.account or "- (not reported)"
    out = [f"{proof.tenant} / {proof.subject}: period {p.label} [{p.start:%Y-%m-%d %H:%M}, {p.end:%Y-%m-%d %H:%M}) UTC,"
           f" plans {proof.plans}, Stripe customer {proof.customer or '-'} in account {account}"]
    for m in proof.meters:
        out.append(f"meter {m.meter} (counter {m.counter}, Stripe event {m.event_name})")
        for hour, stored, recomputed in m.hours:
            mark = "" if stored == recomputed else "  DIFFERS"
            out.append(f"  hour {hour:%Y-%m-%d %H:%M}  window {stored if stored is not None else '-'}  "
                       f"raw events {recomputed if recomputed is not None else '-'}{mark}")
        out.append(f"  used {m.used} (raw events {m.used_from_events}), billable {m.billable}, whole units "
                   f"{whole(m.billable)}, rows hold {m.reported}")
        for r in m.rows:
            out.append(f"  row {r['id']} seq {r['seq']} {r['kind']} {r['value']} {r['status']} stamped "
                       f"{r['event_time']:%Y-%m-%d %H:%M:%S} {r['identifier']}"
                       + (f" (carried {'to' if r['carried_from'] > r['period_label'] else 'from'} {r['carried_from']})"
                          if r["carried_from"] else "") + (f" - {r['error']}" if r["error"] else ""))
        summary = "not available" if m.stripe_summary is None else str(m.stripe_summary)
        out.append(f"  Stripe's summary for the period: {summary}; sent rows stamped in it: {m.at_stripe}")
        out.extend(f"  ! {problem}" for problem in m.problems)
        out.append(f"  agree: {'yes' if m.agrees else 'no'}")
    out.append(f"all agree: {'yes' if proof.agrees else 'no'}")
    return out
