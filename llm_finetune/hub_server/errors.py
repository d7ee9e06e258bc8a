"""The two ways a request ends early: an error reply (:class:`HubError`) or a hang-up."""

from __future__ import annotations

from typing import Any

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class HubError(Exception):
    """An HTTP error reply, shaped like the Hub's so the client maps it to the right exception."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class HangUp(Exception):
    """Raised inside a handler to close the connection without any reply."""
