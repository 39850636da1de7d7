"""RFC 9457 problem details: every error at the edge says what went wrong and, where it can, which field."""

from __future__ import annotations

from typing import Any

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type_
        self.headers = headers or {}
        self.extensions = extensions

    def reason(self) -> str:
        """The title as a metric label value."""
        return self.title.lower().replace(" ", "_").replace("-", "_")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        body.update(self.extensions)
        return body

def validation_errors(exc: Any) -> list[dict[str, str]]:
    """pydantic's errors as a list of {field, message} pairs a client can act on."""
    return [
        {"field": ".".join(str(part) for part in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
