"""HTTP plumbing of the local Hub, and :class:`HubServer`, the object its users start.

The handler reads request bodies (Content-Length or chunked), sends replies, authenticates the
bearer token and hands the request to :func:`~llm_finetune.hub_server.routes.route`. The server
counts what it sees in ``HubServer.stats`` (requests, commits, body bytes) and, per
"METHOD /path", the body bytes read in ``HubServer.path_bytes`` (cut-off uploads included), so
tests can count what was re-sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from llm_finetune.hub_server import faults
from llm_finetune.hub_server.errors import INVALID_CREDENTIALS, HangUp, HubError
from llm_finetune.hub_server.faults import FAULT_ACTIONS, Fault, FaultAction
from llm_finetune.hub_server.request import HubUser
from llm_finetune.hub_server.routes import route
from llm_finetune.hub_server.storage import CHUNK, Store

logger = logging.getLogger(__name__)

MAX_BODY = 256 << 20  # in-memory request bodies (JSON, commits); LFS uploads stream to disk


DEMO_USER = HubUser("demo")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open_sockets.discard(request)
        super().shutdown_request(request)


class Handler(BaseHTTPRequestHandler):
    """One request: authenticate, route, reply. Tokens are never logged.

    The routes and the injected faults read the request and reply through its public methods.
    """

    protocol_version = "HTTP/1.1"  # keep-alive, as the httpx client expects
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _HTTPServer
    # Set for each request by _handle:
    hub: HubServer
    url_path: str
    query: dict[str, list[str]]
    user: HubUser | None
    fault: Fault | None  # the injected fault this request claimed
    tripwire: int | None  # body offset at which `fault` acts
    body_read: int
    body_pending: bool  # the body was not read (yet): the connection cannot be kept alive
    replied: bool

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - " + format, self.address_string(), *args)

    def _handle(self) -> None:
        self.hub = self.server.hub
        self.hub._count("requests")
        url = urlsplit(self.path)
        self.url_path, self.query = url.path, parse_qs(url.query)
        self.body_pending, self.replied = True, False  # until proven otherwise
        self.body_read, self.tripwire = 0, None
        self.fault = self.hub._claim_fault(self.command, url.path)
        try:
            te = self.headers.get("Transfer-Encoding", "").lower()
            self.body_pending = "chunked" in te or int(self.headers.get("Content-Length") or 0) > 0
            if self.fault is not None:
                faults.before_routing(self)
            if not self.replied:
                self.user = self._authenticate()
                route(self, [unquote(s) for s in url.path.split("/")[1:]])
        except HangUp:
            self._hang_up()
        except HubError as e:
            self._reply_error(e)
        except (ValueError, TypeError, AttributeError):  # malformed numbers, JSON shapes, ...
            logger.debug("Malformed %s %s", self.command, url.path, exc_info=True)
            self._reply_error(HubError(400, "Malformed request"))
        except ConnectionError:  # the client went away (e.g. aborted download): nothing to say
            logger.debug("Connection lost during %s %s", self.command, url.path)
            self.close_connection = True
        except Exception:
            logger.exception("Error handling %s %s", self.command, url.path)
            self._reply_error(HubError(500, "Internal server error"))

    def _authenticate(self) -> HubUser | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HubError(401, INVALID_CREDENTIALS)
        if self.hub.users is None:
            return DEMO_USER
        for known, user in self.hub.users.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
        raise HubError(401, INVALID_CREDENTIALS)

    # -- replies
    def _hang_up(self) -> None:
        self.replied, self.close_connection = True, True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _reply_error(self, e: HubError) -> None:
        if self.replied:  # headers already out (e.g. mid-download): all we can do is hang up
            self.close_connection = True
            return
        headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode(), **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        try:
            self.send_json({"error": e.message, **e.extra}, e.status, headers)
        except HangUp:  # an injected lost reply applies to error replies too
            self._hang_up()
        except ConnectionError:  # the client gave up (e.g. timed out) before our answer
            self.close_connection = True

    def send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        length: int | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Send the status and headers, then ``body``; with ``length`` the caller writes it."""
        faults.before_reply(self)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if self.body_pending:  # we never read the request body: the connection can't be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.replied = True
        if self.command != "HEAD" and body:  # a HEAD reply must never carry a body
            self.wfile.write(body)

    def send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), headers or {})

    # -- request body
    def iter_body(self) -> Iterator[bytes]:
        """Yield the request body, handling both Content-Length and chunked encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
                yield from self._read_exact(size)
                self.rfile.readline(1024)  # CRLF after each chunk
            while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            yield from self._read_exact(int(self.headers.get("Content-Length") or 0))
        if self.tripwire is not None:  # the body was shorter than after_bytes
            faults.trip(self)
        self.body_pending = False

    def _read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            step = min(n, CHUNK)
            if self.tripwire is not None:
                step = min(step, self.tripwire - self.body_read)
            chunk = self.rfile.read(step)
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            n -= len(chunk)
            self.body_read += len(chunk)
            self.hub._count_body(f"{self.command} {self.url_path}", len(chunk))
            if self.tripwire is not None and self.body_read >= self.tripwire:
                faults.trip(self)
            yield chunk

    def read_body(self) -> bytes:
        parts, total = [], 0
        for chunk in self.iter_body():
            total += len(chunk)
            if total > MAX_BODY:
                raise HubError(413, "Request body too large")
            parts.append(chunk)
        return b"".join(parts)

    def read_json(self) -> dict[str, Any]:
        body = self.read_body()
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HubError(400, "Expected a JSON object")
        return data

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    @property
    def base_url(self) -> str:
        """Our address as the client sees it, so generated URLs work behind any host name."""
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    @property
    def store(self) -> Store:
        assert self.hub._store is not None  # requests arrive only after start()
        return self.hub._store


class HubServer:
    """The local Hub. ``users`` maps bearer token -> :class:`HubUser`.

    With ``users=None`` this is an *open dev server*: any non-empty bearer token authenticates
    as user ``"demo"`` with write access to the ``demo`` namespace. Requests without a token are
    anonymous in both modes (they can read public repos only).
    """

    def __init__(
        self,
        storage: Path | str,
        users: dict[str, HubUser] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.storage = Path(storage)
        self.users = dict(users) if users is not None else None
        self.host, self.port = host, port
        self.stats: dict[str, int] = {
            "requests": 0,
            "commits": 0,
            "lfs_uploads": 0,
            "lfs_bytes_received": 0,  # bytes of LFS objects stored (complete uploads only)
            "body_bytes": 0,  # request body bytes read, including cut-off uploads
            "faults_fired": 0,
        }
        self.path_bytes: dict[str, int] = {}  # "METHOD /url/path" -> request body bytes read
        self.faults: list[Fault] = []
        self.unknown_routes: list[str] = []  # "METHOD /path" of requests we had no route for
        self._store: Store | None = None  # made by start(), once the port is bound
        self._secret = secrets.token_bytes(32)  # signs LFS upload hrefs
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _bind(self) -> _HTTPServer:
        self._httpd = _HTTPServer((self.host, self.port), Handler)
        self._httpd.hub = self
        return self._httpd

    def start(self) -> HubServer:
        """Serve in a daemon thread; returns self so ``HubServer(...).start()`` chains.

        The port is bound before the storage is made: a port in use leaves no folder behind.
        """
        httpd = self._bind()
        try:
            self._store = Store(self.storage)
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="hub-server",
            daemon=True,
        )
        self._thread.start()
        logger.debug("Local Hub serving %s at %s", self.storage, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so no request lands after this."""
        self.clear_faults(hang_up=True)
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        for sock in list(httpd.open_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def _count_body(self, route: str, n: int) -> None:
        with self._lock:
            self.stats["body_bytes"] = self.stats.get("body_bytes", 0) + n
            self.path_bytes[route] = self.path_bytes.get(route, 0) + n

    def bytes_received(self, path: str = "", method: str | None = None) -> int:
        """Request body bytes read for URL paths matching the regex ``path`` (and ``method``)."""
        pattern = re.compile(path)
        with self._lock:
            return sum(
                n
                for route, n in self.path_bytes.items()
                if (method is None or route.split(" ", 1)[0] == method.upper())
                and pattern.search(route.split(" ", 1)[1])
            )

    # -- fault injection
    def inject(
        self,
        action: FaultAction,
        *,
        method: str | None = None,
        path: str = "",
        status: int = 503,
        after_bytes: int = 0,
        seconds: float = 0.0,
        times: int | None = 1,
    ) -> Fault:
        """Make matching requests fail (see :class:`Fault`); rules are tried in order."""
        if action not in FAULT_ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; use one of {FAULT_ACTIONS}")
        if action == "status" and not 400 <= status <= 599:
            raise ValueError(f"an injected status must be an error (4xx/5xx), not {status}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for every matching request)")
        re.compile(path)  # fail here, not in a handler thread
        fault = Fault(action, method and method.upper(), path, status, after_bytes, seconds, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self, hang_up: bool = False) -> None:
        """Remove every rule and end the stalls in progress: they go on as if the wait was over,
        or with ``hang_up`` they end without an answer and without handling the request (what
        a client killed mid-request leaves behind, made deterministic)."""
        with self._lock:
            faults, self.faults = self.faults, []
        for fault in faults:
            fault.hang_up = fault.hang_up or hang_up
            fault.released.set()

    def _claim_fault(self, method: str, path: str) -> Fault | None:
        """The first rule that matches this request and has uses left; the use is taken now."""
        with self._lock:
            for fault in self.faults:
                if fault.times is not None and fault.claimed >= fault.times:
                    continue
                if fault.method not in (None, method) or not re.search(fault.path, path):
                    continue
                fault.claimed += 1
                return fault
        return None

    def _record_unknown(self, route: str) -> None:
        with self._lock:
            self.unknown_routes.append(route)

    def _sign(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()


def serve_forever(port: int, storage: Path, users: dict[str, HubUser] | None) -> None:
    """Run the server until SIGINT/SIGTERM (the ``llm-finetune hub-server`` CLI).

    The server runs in its thread; the main thread only waits for a signal, so a Ctrl-C never
    lands in the middle of a request and shutdown is always clean.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    hub = HubServer(storage, users, port=port).start()
    mode = "open dev server: any token is user 'demo'" if users is None else f"{len(users)} user(s)"
    print(f"Local Hub at {hub.url} (storage {hub.storage}, {mode}). Ctrl-C to stop.", flush=True)
    while not stop.wait(0.5):
        pass
    print("Stopping local Hub.", flush=True)
    hub.stop()
