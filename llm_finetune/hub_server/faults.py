"""Injected failures, used only by tests: they make the real client meet what a network does.

Tests add them with :meth:`HubServer.inject <llm_finetune.hub_server.server.HubServer.inject>`:
a status reply, a connection dropped after part of the request body, a stall before or after
handling, or a reply that never comes (the request took effect but the client cannot know).
The handler calls the functions here at three points of a request: before routing
(:func:`before_routing`), when the body reaches a fault's offset (:func:`trip`) and before
replying (:func:`before_reply`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from llm_finetune.hub_server.errors import INVALID_CREDENTIALS, HangUp, HubError

FaultAction = Literal["status", "drop", "stall", "stall_reply", "lose_reply"]
FAULT_ACTIONS = ("status", "drop", "stall", "stall_reply", "lose_reply")


@dataclass(eq=False)
class Fault:
    """One injected failure: which requests it hits, what it does to them, and how often.

    ``action``:
      * ``"status"``: read the whole body, then answer ``status`` (nothing else happens);
      * ``"drop"``: read ``after_bytes`` of the body (all of it if shorter), then hang up
        without an answer and without handling the request;
      * ``"stall"``: read ``after_bytes`` of the body, wait ``seconds``, then go on normally;
      * ``"stall_reply"``: handle the request, then wait ``seconds`` before answering;
      * ``"lose_reply"``: handle the request (a commit lands), then hang up instead of answering.

    ``path`` is a regex searched in the URL path (no query string); ``method`` None means any.
    ``times`` bounds how many requests the rule claims (None: every matching request).
    """

    action: FaultAction
    method: str | None = None
    path: str = ""
    status: int = 503
    after_bytes: int = 0
    seconds: float = 0.0
    times: int | None = 1
    claimed: int = 0  # requests this rule was applied to
    fired: threading.Event = field(default_factory=threading.Event)  # set when it first acted
    released: threading.Event = field(default_factory=threading.Event)  # ends stalls early
    hang_up: bool = False  # set with `released`: stalled requests end without an answer

    def wait_fired(self, timeout: float) -> bool:
        """Block until the fault has acted on a request (tests use it to time a kill)."""
        return self.fired.wait(timeout)


class _Counters(Protocol):
    def _count(self, key: str, n: int = 1) -> None: ...


class FaultedRequest(Protocol):
    """What a fault reads and sets on the request it claimed (the handler in ``server``)."""

    fault: Fault | None
    tripwire: int | None
    body_pending: bool
    hub: _Counters

    def iter_body(self) -> Iterator[bytes]: ...


def before_routing(req: FaultedRequest) -> None:
    """Act on the request's claimed fault; body-offset faults arm the request's tripwire instead."""
    fault = req.fault
    assert fault is not None
    if fault.action == "status":
        for _ in req.iter_body():  # drain, so the client reads our answer, not a reset
            pass
        _fire(req, fault)
        message = INVALID_CREDENTIALS if fault.status == 401 else "Injected fault"
        raise HubError(fault.status, f"{message} ({fault.status})")
    if fault.action in ("drop", "stall"):
        if fault.after_bytes <= 0 or not req.body_pending:
            trip(req)
        else:
            req.tripwire = fault.after_bytes  # fires in Handler._read_exact or at the body end


def trip(req: FaultedRequest) -> None:
    """The body offset was reached: drop the connection, or stall and carry on."""
    fault, req.tripwire = req.fault, None
    assert fault is not None
    _fire(req, fault)
    if fault.action == "drop":
        raise HangUp
    _stall(fault)


def before_reply(req: FaultedRequest) -> None:
    """A handled request's reply is delayed or lost (``stall_reply`` / ``lose_reply``)."""
    fault = req.fault
    if fault is not None and fault.action in ("stall_reply", "lose_reply"):
        _fire(req, fault)
        if fault.action == "lose_reply":
            raise HangUp
        _stall(fault)


def _fire(req: FaultedRequest, fault: Fault) -> None:
    fault.fired.set()
    req.hub._count("faults_fired")


def _stall(fault: Fault) -> None:
    fault.released.wait(fault.seconds)
    if fault.hang_up:  # like a client killed mid-request: the rest never arrives
        raise HangUp
