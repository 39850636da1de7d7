"""A `logging` handler that ships an application's records to Tally's `/v1/logs`, batched in the background.

    import logging
    from tally.logging import TallyHandler
    logging.getLogger().addHandler(TallyHandler("http://127.0.0.1:8080", api_key, service="checkout"))

`emit` only formats the record and hands it to the producer client's buffer; posting happens on the
client's thread. Each record gets its id when it is emitted, so a retried batch is deduplicated. A
full buffer drops the record (counted in `handler.client.metrics.dropped`) rather than blocking the
application's logging call.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any

from tally.client import LOGS_ROUTE, BufferFull, TallyClient

LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "fatal"}
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def level_name(levelno: int) -> str:
    """Python's level as one of Tally's: the nearest standard level at or below it."""
    for number in sorted(LEVELS, reverse=True):
        if levelno >= number:
            return LEVELS[number]
    return "trace"


class TallyHandler(logging.Handler):
    def __init__(self, url: str, api_key: str, *, service: str, level: int = logging.NOTSET,
                 **client_config: Any) -> None:
        super().__init__(level)
        self.service = service
        self.client = TallyClient(url, api_key, route=LOGS_ROUTE, **{"when_full": "raise", **client_config})

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.client.send(self.to_log(record))
        except BufferFull:
            self.client.metrics.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never raise into the application
            self.handleError(record)

    def to_log(self, record: logging.LogRecord) -> dict[str, Any]:
        attributes = {"logger": record.name, "module": record.module, "line": record.lineno}
        attributes.update({k: _plain(v) for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            attributes["exception"] = self.formatter.formatException(record.exc_info) if self.formatter \
                else logging.Formatter().formatException(record.exc_info)
        return {"id": uuid.uuid4().hex, "service": self.service, "level": level_name(record.levelno),
                "message": record.getMessage(), "attributes": attributes,
                "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat()}

    def flush(self) -> None:
        self.client.flush(5.0)

    def close(self) -> None:
        self.client.close()
        super().close()


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
