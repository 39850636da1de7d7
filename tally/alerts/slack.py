"""An alert transition as a Slack message: Block Kit for the channel, `text` for the notification that
announces it (and for clients that show no blocks)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tally.schemas.alerts import AlertTransition

_HEADER_MAX = 150  # Slack refuses a longer header


def _escape(text: str) -> str:
    """mrkdwn reads &, < and > as markup (a comparison `>` would vanish)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _window(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds // 60}m"


def _utc(at: datetime) -> datetime:
    return at.astimezone(timezone.utc)


def _group(alert: AlertTransition) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(alert.group.items())) or "all"


def message(alert: AlertTransition) -> dict[str, Any]:
    """The incoming-webhook body for one transition."""
    state = "Firing" if alert.type == "alert.firing" else "Resolved"
    value = alert.value if alert.value is not None else "no data"
    group = _group(alert)
    text = (f"{state}: {alert.rule['name']} ({group}): {value}, threshold {alert.comparison} {alert.threshold} "
            f"over {_window(alert.window_s)}")
    fields = [
        f"*Rule*\n{_escape(alert.rule['name'])} (`{_escape(alert.rule['id'])}`)",
        f"*Group*\n{_escape(group)}",
        f"*Value*\n{_escape(value)}",
        f"*Threshold*\n{_escape(alert.comparison)} {alert.threshold}",
        f"*Window*\n{_window(alert.window_s)}",
        f"*Firing since*\n{_utc(alert.fired_at):%Y-%m-%d %H:%M:%S} UTC",
    ]
    return {"text": _escape(text), "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": f"{state}: {alert.rule['name']}"[:_HEADER_MAX]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": field} for field in fields]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(
            f"tenant {alert.tenant} · {alert.id} · {_utc(alert.at):%Y-%m-%dT%H:%M:%SZ}")}]},
    ]}
