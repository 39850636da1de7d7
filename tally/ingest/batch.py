"""Many events in one request: every item stands alone, so valid items are accepted even when others are not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tally.ingest import events
from tally.edge import values
from tally.edge.problems import Problem
from tally.ingest.publish import Event, Message, Publisher, headers

BATCH_TYPES = ("application/cloudevents-batch+json", "application/json")


@dataclass(slots=True)
class Item:
    """One entry of a batch: a valid event's attributes, or the problem that keeps it out."""

    event: Event | None = None
    problem: Problem | None = None


@dataclass(frozen=True)
class Outcome:
    status: int
    body: dict[str, Any]
    accepted: int
    rejected: int
    failed: int


def check_items(value: Any, max_items: int, what: str = "a batch") -> list[Any]:
    """The JSON array of a batch, within the configured length."""
    if not isinstance(value, list):
        raise Problem(400, "Invalid batch", f"{what} is a JSON array",
                      errors=[{"field": "(body)", "message": "expected a JSON array"}])
    if not value:
        raise Problem(400, "Invalid batch", f"{what} is empty", errors=[{"field": "(body)", "message": "empty array"}])
    if len(value) > max_items:
        raise Problem(413, "Batch too long", f"{what} holds {len(value)} items; at most {max_items} are accepted",
                      max_items=max_items, errors=[{"field": "(body)", "message": f"more than {max_items} items"}])
    return value


def check_events(value: Any, max_items: int, now: datetime, max_future_s: float,
                 hazards: values.Hazards) -> list[Item]:
    """A batch body's items, each valid or with its own problem."""
    items = []
    for obj in check_items(value, max_items):
        try:
            items.append(Item(event=events.check(obj, now, max_future_s, hazards)))
        except Problem as problem:
            items.append(Item(problem=problem))
    return items


def _problem_body(problem: Problem) -> dict[str, Any]:
    body = problem.body()
    body.pop("type", None)
    return body


async def publish_items(items: list[Item], tenant: str, received_at: datetime, publisher: Publisher) -> Outcome:
    """Publish the valid items, report one result per item; 503 only if Kafka took none of them.

    Each item is encoded first: one that cannot be encoded or is too large becomes a rejected item.
    """
    shared = headers(tenant, received_at)
    valid: list[tuple[int, Event, Message]] = []
    for index, item in enumerate(items):
        if item.event is None:
            continue
        try:
            valid.append((index, item.event, publisher.message(item.event, tenant, shared, received_at)))
        except Problem as problem:
            item.problem, item.event = problem, None
    problems = await publisher.send([message for _, _, message in valid]) if valid else []
    if problems and all(p is not None and p.status >= 500 for p in problems):
        raise problems[0]  # Kafka took none of them: 503 for the whole request
    results: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if item.problem is not None:
            results.append({"index": index, "status": "rejected", "problem": _problem_body(item.problem)})
    for (index, event, _), problem in zip(valid, problems, strict=True):
        if problem is None:
            results.append({"index": index, "id": event["id"], "status": "accepted"})
        else:
            results.append({"index": index, "id": event["id"], "problem": _problem_body(problem),
                            "status": "rejected" if problem.status < 500 else "failed"})
    results.sort(key=lambda r: r["index"])
    accepted = sum(1 for r in results if r["status"] == "accepted")
    rejected = sum(1 for r in results if r["status"] == "rejected")
    failed = len(results) - accepted - rejected
    body = {"accepted": accepted, "rejected": rejected, "failed": failed, "results": results}
    if accepted:
        return Outcome(202, body, accepted, rejected, failed)
    raise Problem(400, "No valid events", "no item of the request is valid; see results", **body)
