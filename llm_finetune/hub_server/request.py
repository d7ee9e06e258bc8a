"""What an endpoint may use of the request it answers: the :class:`Request` protocol that the
HTTP handler in ``server`` implements, and the :class:`HubUser` it authenticated.

The endpoints (``routes``) are typed against this protocol rather than the handler class, so
they sit below the server that dispatches to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any, BinaryIO, Protocol

from llm_finetune.hub_server.storage import Store


@dataclass(frozen=True)
class HubUser:
    """An account known to the server; ``users`` maps bearer tokens to these."""

    name: str
    orgs: tuple[str, ...] = ()  # orgs this user can write to
    can_write: bool = True  # False = a read-only token


class HubCounters(Protocol):
    """The server-wide state an endpoint touches: counters, unknown routes, LFS signatures."""

    def _count(self, key: str, n: int = 1) -> None: ...
    def _record_unknown(self, route: str) -> None: ...
    def _sign(self, message: str) -> str: ...


class Request(Protocol):
    """One authenticated request, and the ways to read its body and reply to it."""

    command: str
    url_path: str
    query: dict[str, list[str]]
    headers: Message
    user: HubUser | None
    hub: HubCounters
    wfile: BinaryIO

    def send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        length: int | None = None,
        content_type: str = "application/json",
    ) -> None: ...
    def send_json(
        self, obj: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> None: ...
    def iter_body(self) -> Iterator[bytes]: ...
    def read_body(self) -> bytes: ...
    def read_json(self) -> dict[str, Any]: ...
    def flag(self, name: str) -> bool: ...
    @property
    def base_url(self) -> str: ...
    @property
    def store(self) -> Store: ...
