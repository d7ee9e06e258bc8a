"""A small local stand-in for the Hugging Face Hub HTTP API.

It speaks enough of the Hub's protocol for the real, unpatched ``huggingface_hub`` client and
``transformers``' ``from_pretrained`` to work against it, so demos and tests never need the network.
Point clients at it with ``HF_ENDPOINT=<server.url>`` and ``HF_HUB_DISABLE_XET=1`` (only the
legacy git-LFS upload protocol is implemented, not Xet).

Storage is plain files under ``storage`` and survives restarts::

    objects/<sha256>                        content-addressed file contents (regular and LFS)
    tmp/                                    temp files, renamed into place with os.replace
    repos/<type>s/<ns>/<name>/repo.json     {id, type, private, createdAt, author}
    repos/<type>s/<ns>/<name>/refs.json     {branch: commit oid}
    repos/<type>s/<ns>/<name>/commits/<oid>.json   {parent, title, message, author, date, files}
    repos/<type>s/<ns>/<name>/lfs/<sha256>  marker: this LFS object was uploaded to this repo

Each commit stores the full file table, so reading any revision is a single file read. Ref
updates happen under one lock, which keeps commits atomic within one server process (two
server processes must not share a storage directory).

Faults can be injected for tests (:meth:`HubServer.inject`): a status reply, a connection dropped
after part of the request body, a stall before or after handling, or a reply that never comes
(the request took effect but the client cannot know). ``stats`` counts requests, commits and body
bytes, and ``path_bytes`` the body bytes read per "METHOD /path" (cut-off uploads included), so
tests can count what was re-sent.

Only stdlib is used so the server can run in any environment the project runs in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
# Files uploaded through LFS; everything else small and text-like goes inline in the commit.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf")
LFS_SUFFIXES += (".msgpack", ".npy", ".npz", ".pkl", ".zip", ".gz", ".tar", ".parquet", ".arrow")
REGULAR_MAX_SIZE = 1 << 20
MAX_BODY = 256 << 20  # in-memory request bodies (JSON, commits); LFS uploads stream to disk
CHUNK = 1 << 20
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_BRANCH_RE = re.compile(r"^(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

FaultAction = Literal["status", "drop", "stall", "stall_reply", "lose_reply"]
FAULT_ACTIONS = ("status", "drop", "stall", "stall_reply", "lose_reply")


@dataclass(frozen=True)
class HubUser:
    """An account known to the server; ``users`` maps bearer tokens to these."""

    name: str
    orgs: tuple[str, ...] = ()  # orgs this user can write to
    can_write: bool = True  # False = a read-only token


DEMO_USER = HubUser("demo")


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


class _HangUp(Exception):
    """Raised inside a handler to close the connection without any reply."""


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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which the client uses as ETag / oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _clean_path(path: Any) -> str:
    """Validate a path inside a repo; paths are only dict keys, but keep them git-compatible."""
    parts = path.strip("/").split("/") if isinstance(path, str) else [""]
    if any(p in ("", ".", "..") or "\0" in p for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


@dataclass(frozen=True)
class _Repo:
    type: str  # "model" | "dataset" | "space"
    ns: str
    name: str

    def __post_init__(self) -> None:
        # Names become directory names: reject anything that is not a plain Hub name.
        if not (_NAME_RE.match(self.ns) and _NAME_RE.match(self.name)):
            raise HubError(404, "Repository not found", "RepoNotFound")

    @property
    def id(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def web_path(self) -> str:
        return URL_PREFIXES[self.type] + self.id


class _Store:
    """Repos, commits and objects on disk; every write is temp-file + os.replace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()  # guards refs.json updates and repo creation/deletion
        for sub in ("objects", "tmp", "repos"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _write_json(self, path: Path, obj: Any) -> None:
        self._write(path, json.dumps(obj, sort_keys=True, indent=1).encode())

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None

    # -- objects
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.object_path(sha).exists():
            self._write(self.object_path(sha), data)
        return sha

    def put_stream(self, chunks: Iterator[bytes], sha256: str, size: int) -> int:
        """Store an uploaded object after checking its hash and size; returns bytes received."""
        digest, received = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:  # always drain the body, even if it will be rejected
                    digest.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
            if received != size or digest.hexdigest() != sha256:
                raise HubError(400, f"Uploaded content does not match oid {sha256} / size {size}")
            os.replace(tmp, self.object_path(sha256))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return received

    # -- repos
    def repo_dir(self, repo: _Repo) -> Path:
        return self.root / "repos" / f"{repo.type}s" / repo.ns / repo.name

    def repo_meta(self, repo: _Repo) -> dict[str, Any] | None:
        return self._read_json(self.repo_dir(repo) / "repo.json")

    def refs(self, repo: _Repo) -> dict[str, str]:
        return self._read_json(self.repo_dir(repo) / "refs.json") or {}

    def commit(self, repo: _Repo, oid: str) -> dict[str, Any] | None:
        if not _COMMIT_RE.match(oid):
            return None
        return self._read_json(self.repo_dir(repo) / "commits" / f"{oid}.json")

    def resolve(self, repo: _Repo, rev: str) -> str | None:
        """Branch name (optionally refs/heads/...) or full commit oid -> commit oid."""
        refs = self.refs(repo)
        branch = rev.removeprefix("refs/heads/")
        if branch in refs:
            return refs[branch]
        return rev if self.commit(repo, rev) is not None else None

    def has_lfs(self, repo: _Repo, sha256: str) -> bool:
        marker = self.repo_dir(repo) / "lfs" / sha256
        return (
            bool(_SHA256_RE.match(sha256)) and marker.exists() and self.object_path(sha256).exists()
        )

    def mark_lfs(self, repo: _Repo, sha256: str) -> None:
        (self.repo_dir(repo) / "lfs").mkdir(exist_ok=True)
        (self.repo_dir(repo) / "lfs" / sha256).touch()

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict, title: str, message: str, author: str
    ) -> str:
        commit = {
            "parent": parent,
            "title": title,
            "message": message,
            "author": author,
            "date": _now(),
            "files": files,
        }
        data = json.dumps(commit, sort_keys=True, indent=1).encode()
        oid = hashlib.sha1(data).hexdigest()
        self._write(self.repo_dir(repo) / "commits" / f"{oid}.json", data)
        return oid

    def create_repo(self, repo: _Repo, private: bool, author: str) -> dict[str, Any] | None:
        """Create a repo with an initial commit (like the Hub); None if it already exists."""
        with self.lock:
            rdir = self.repo_dir(repo)
            if (rdir / "repo.json").exists():
                return None
            (rdir / "commits").mkdir(parents=True, exist_ok=True)
            data = GITATTRIBUTES.encode()
            entry = {
                "sha256": self.put_bytes(data),
                "size": len(data),
                "lfs": False,
                "git_oid": _git_blob_oid(data),
            }
            oid = self._new_commit(
                repo, None, {".gitattributes": entry}, "initial commit", "", author
            )
            self._write_json(rdir / "refs.json", {DEFAULT_BRANCH: oid})
            meta = {
                "id": secrets.token_hex(12),
                "type": repo.type,
                "private": private,
                "createdAt": _now(),
                "author": author,
            }
            self._write_json(rdir / "repo.json", meta)  # written last: marks the repo as existing
            return meta

    def delete_repo(self, repo: _Repo) -> None:
        with self.lock:
            trash = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
            os.replace(self.repo_dir(repo), trash / "repo")  # disappears atomically
        shutil.rmtree(trash, ignore_errors=True)

    def commit_changes(
        self,
        repo: _Repo,
        branch: str,
        changes: list[tuple[str, str, dict | None]],
        header: dict[str, Any],
        author: str,
    ) -> str:
        """Apply add/delete changes on top of ``branch`` and move it, all or nothing."""
        with self.lock:
            refs = self.refs(repo)
            if branch not in refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs[branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head})")
            files = dict(self.commit(repo, head)["files"])  # type: ignore[index]
            for kind, path, entry in changes:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise HubError(
                            404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                        )
                else:
                    gone = [p for p in files if p.startswith(path + "/")]
                    if not gone:
                        raise HubError(
                            404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                        )
                    for p in gone:
                        del files[p]
            title, message = str(header.get("summary") or ""), str(header.get("description") or "")
            oid = self._new_commit(repo, head, files, title, message, author)
            refs[branch] = oid
            self._write_json(self.repo_dir(repo) / "refs.json", refs)
            return oid

    def set_branch(self, repo: _Repo, branch: str, oid: str | None, create: bool) -> None:
        """Create (409 if present) or delete (404 if absent) a branch."""
        with self.lock:
            refs = self.refs(repo)
            if create and branch in refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            if not create and branch not in refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if create:
                refs[branch] = oid  # type: ignore[assignment]
            else:
                del refs[branch]
            self._write_json(self.repo_dir(repo) / "refs.json", refs)


def _file_entry(path: str, f: dict[str, Any]) -> dict[str, Any]:
    entry = {"type": "file", "oid": f["git_oid"], "size": f["size"], "path": path}
    if f["lfs"]:
        pointer_size = len(_lfs_pointer(f["sha256"], f["size"]))
        entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": pointer_size}
    return entry


def _dir_entry(path: str, files: dict[str, Any]) -> dict[str, Any]:
    children = sorted((p, f["git_oid"]) for p, f in files.items() if p.startswith(path + "/"))
    oid = hashlib.sha1(json.dumps(children).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    """Weights, big files and binary content go through LFS, like the Hub's .gitattributes."""
    if path.lower().endswith(LFS_SUFFIXES) or size > REGULAR_MAX_SIZE or b"\0" in sample:
        return "lfs"
    return "regular"


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


class _Handler(BaseHTTPRequestHandler):
    """One request: authenticate, route, reply. Tokens are never logged."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the httpx client expects
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _HTTPServer

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - " + format, self.address_string(), *args)

    # -- plumbing
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
                self._apply_fault()
            if not self.replied:
                self.user = self._authenticate()
                self._route([unquote(s) for s in url.path.split("/")[1:]])
        except _HangUp:
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

    # -- injected faults
    def _apply_fault(self) -> None:
        """Act on a claimed fault before routing; body-offset faults arm a tripwire instead."""
        fault = self.fault
        assert fault is not None
        if fault.action == "status":
            for _ in self._iter_body():  # drain, so the client reads our answer, not a reset
                pass
            fault.fired.set()
            self.hub._count("faults_fired")
            message = INVALID_CREDENTIALS if fault.status == 401 else "Injected fault"
            raise HubError(fault.status, f"{message} ({fault.status})")
        if fault.action in ("drop", "stall"):
            if fault.after_bytes <= 0 or not self.body_pending:
                self._trip()
            else:
                self.tripwire = fault.after_bytes  # fires in _read_exact / at the end of the body

    def _trip(self) -> None:
        """The body offset was reached: drop the connection, or stall and carry on."""
        fault, self.tripwire = self.fault, None
        assert fault is not None
        fault.fired.set()
        self.hub._count("faults_fired")
        if fault.action == "drop":
            raise _HangUp
        self._stall(fault)

    @staticmethod
    def _stall(fault: Fault) -> None:
        fault.released.wait(fault.seconds)
        if fault.hang_up:  # like a client killed mid-request: the rest never arrives
            raise _HangUp

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
            self._send_json({"error": e.message, **e.extra}, e.status, headers)
        except _HangUp:  # an injected lost reply applies to error replies too
            self._hang_up()
        except ConnectionError:  # the client gave up (e.g. timed out) before our answer
            self.close_connection = True

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        length: int | None = None,
        content_type: str = "application/json",
    ) -> None:
        fault = self.fault
        if fault is not None and fault.action in ("stall_reply", "lose_reply"):
            fault.fired.set()
            self.hub._count("faults_fired")
            if fault.action == "lose_reply":
                raise _HangUp
            self._stall(fault)
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

    def _send_json(
        self, obj: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self._send(status, json.dumps(obj).encode(), headers or {})

    def _iter_body(self) -> Iterator[bytes]:
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
            self._trip()
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
                self._trip()
            yield chunk

    def _body(self) -> bytes:
        parts, total = [], 0
        for chunk in self._iter_body():
            total += len(chunk)
            if total > MAX_BODY:
                raise HubError(413, "Request body too large")
            parts.append(chunk)
        return b"".join(parts)

    def _json(self) -> dict[str, Any]:
        body = self._body()
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HubError(400, "Expected a JSON object")
        return data

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    @property
    def base_url(self) -> str:
        """Our address as the client sees it, so generated URLs work behind any host name."""
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    # -- auth
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

    def _is_member(self, ns: str) -> bool:
        return self.user is not None and ns in (self.user.name, *self.user.orgs)

    def _require_write(self, ns: str) -> HubUser:
        if self.user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if not self.user.can_write:
            raise HubError(403, "This is a read-only token: write access is required")
        if not self._is_member(ns):
            raise HubError(403, f"You don't have the rights to write to the namespace {ns!r}")
        return self.user

    def _readable(self, repo: _Repo) -> dict[str, Any]:
        meta = self._store.repo_meta(repo)
        if meta is None or (meta["private"] and not self._is_member(repo.ns)):
            raise HubError(404, "Repository not found", "RepoNotFound")  # private looks missing
        return meta

    def _writable(self, repo: _Repo) -> HubUser:
        self._readable(repo)
        return self._require_write(repo.ns)

    @property
    def _store(self) -> _Store:
        return self.hub._store

    def _commit_at(self, repo: _Repo, rev: str) -> tuple[str, dict[str, Any]]:
        oid = self._store.resolve(repo, rev)
        commit = self._store.commit(repo, oid) if oid else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid, commit  # type: ignore[return-value]

    # -- routing
    def _route(self, s: list[str]) -> None:
        m = self.command
        if s[:1] == ["api"]:
            return self._route_api(s[1:])
        if len(s) == 6 and s[0] == "lfs-upload" and s[1] in URL_PREFIXES:
            return self._lfs_object(_Repo(s[1], s[2], s[3]), s[4], s[5])
        if s[-4:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            head = s[:-4]
            if head and head[-1].endswith(".git"):
                head[-1] = head[-1][:-4]
                if repo := self._repo_from(head):
                    return self._lfs_batch(repo)
        if m in ("GET", "HEAD"):
            if len(s) >= 5 and s[0] in REPO_TYPES and s[3] == "resolve":
                return self._resolve(_Repo(REPO_TYPES[s[0]], s[1], s[2]), s[4], "/".join(s[5:]))
            if len(s) >= 4 and s[2] == "resolve":
                return self._resolve(_Repo("model", s[0], s[1]), s[3], "/".join(s[4:]))
        raise self._unknown()

    def _repo_from(self, parts: list[str]) -> _Repo | None:
        if len(parts) == 2:
            return _Repo("model", *parts)
        if len(parts) == 3 and parts[0] in REPO_TYPES:
            return _Repo(REPO_TYPES[parts[0]], parts[1], parts[2])
        return None

    def _route_api(self, s: list[str]) -> None:
        m = self.command
        if s == ["whoami-v2"] and m == "GET":
            return self._whoami()
        if s == ["repos", "create"] and m == "POST":
            return self._create_repo()
        if s == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo()
        if s == ["validate-yaml"] and m == "POST":
            self._body()
            return self._send_json({"errors": [], "warnings": []})
        if s == ["agent-harnesses"] and m == "GET":  # empty registry: no agent detection
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if s[:1] == ["telemetry"]:
            return self._send(200, b"", {})
        if len(s) >= 3 and s[0] in REPO_TYPES:
            repo = _Repo(REPO_TYPES[s[0]], s[1], s[2])
            action, args = (s[3], s[4:]) if len(s) > 3 else ("", [])
            route = (m, action, len(args))
            if route == ("GET", "", 0):
                return self._repo_info(repo, DEFAULT_BRANCH)
            if route == ("GET", "revision", 1):
                return self._repo_info(repo, args[0])
            if route == ("POST", "preupload", 1):
                return self._preupload(repo, args[0])
            if route == ("POST", "commit", 1):
                return self._commit(repo, args[0])
            if m == "GET" and action == "tree" and args:
                return self._tree(repo, args[0], "/".join(args[1:]))
            if route == ("POST", "paths-info", 1):
                return self._paths_info(repo, args[0])
            if route == ("GET", "refs", 0):
                return self._refs(repo)
            if route == ("GET", "commits", 1):
                return self._commits(repo, args[0])
            if route in (("POST", "branch", 1), ("DELETE", "branch", 1)):
                return self._branch(repo, args[0])
        raise self._unknown()

    def _unknown(self) -> HubError:
        route = f"{self.command} {self.url_path}"
        logger.debug("Unknown route: %s", route)
        self.hub._record_unknown(route)
        return HubError(404, f"Not found: {route}")

    # -- account and repos
    def _whoami(self) -> None:
        if (u := self.user) is None:
            raise HubError(401, "Invalid username or password.")
        role = "write" if u.can_write else "read"
        orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": role} for o in u.orgs]
        token = {"displayName": "local", "role": role}
        self._send_json(
            {
                "type": "user",
                "id": u.name,
                "name": u.name,
                "fullname": u.name,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _repo_payload(self) -> tuple[_Repo, dict[str, Any]]:
        body = self._json()
        rtype = body.get("type") or "model"
        if self.user is None:
            raise HubError(401, "You must be authenticated to manage repositories")
        ns, name = body.get("organization") or self.user.name, body.get("name")
        valid = all(isinstance(x, str) and _NAME_RE.match(x) for x in (ns, name))
        if rtype not in URL_PREFIXES or not valid:
            raise HubError(400, f"Invalid repo type or id: {rtype!r} {ns!r}/{name!r}")
        return _Repo(rtype, ns, name), body

    def _create_repo(self) -> None:
        repo, body = self._repo_payload()
        user = self._require_write(repo.ns)
        private = body.get("private")
        private = bool(private) if private is not None else body.get("visibility") == "private"
        url = f"{self.base_url}/{repo.web_path}"
        meta = self._store.create_repo(repo, private, user.name)
        if meta is None:
            raise HubError(409, f"You already created this {repo.type} repo", extra={"url": url})
        self._send_json({"url": url, "name": repo.id, "id": meta["id"]})

    def _delete_repo(self) -> None:
        repo, _ = self._repo_payload()
        self._writable(repo)
        self._store.delete_repo(repo)
        self._send_json({})

    def _repo_info(self, repo: _Repo, rev: str) -> None:
        meta = self._readable(repo)
        oid, commit = self._commit_at(repo, rev)
        siblings = []
        for path, f in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if self._flag("blobs"):
                sibling.update(size=f["size"], blobId=f["git_oid"])
                if f["lfs"]:
                    pointer_size = len(_lfs_pointer(f["sha256"], f["size"]))
                    sibling["lfs"] = {
                        "size": f["size"],
                        "sha256": f["sha256"],
                        "pointerSize": pointer_size,
                    }
            siblings.append(sibling)
        info = {
            "_id": meta["id"],
            "id": repo.id,
            "author": repo.ns,
            "sha": oid,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        self._send_json(info)

    def _refs(self, repo: _Repo) -> None:
        self._readable(repo)
        refs = self._store.refs(repo)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in refs.items()
        ]
        out: dict[str, Any] = {"branches": branches, "tags": [], "converts": []}
        if self._flag("include_prs"):
            out["pullRequests"] = []
        self._send_json(out)

    def _branch(self, repo: _Repo, branch: str) -> None:
        self._writable(repo)
        if self.command == "DELETE":
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            self._store.set_branch(repo, branch, None, create=False)
            return self._send_json({})
        if not _BRANCH_RE.match(branch) or _COMMIT_RE.match(branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        oid, _ = self._commit_at(repo, self._json().get("startingPoint") or DEFAULT_BRANCH)
        self._store.set_branch(repo, branch, oid, create=True)
        self._send_json({})

    def _commits(self, repo: _Repo, rev: str) -> None:
        self._readable(repo)
        oid: str | None = self._commit_at(repo, rev)[0]
        out = []
        while oid and (c := self._store.commit(repo, oid)):
            out.append(
                {
                    "id": oid,
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"]}],
                    "date": c["date"],
                }
            )
            oid = c["parent"]
        self._send_json(out)

    # -- listing
    def _tree(self, repo: _Repo, rev: str, path: str) -> None:
        self._readable(repo)
        files = self._commit_at(repo, rev)[1]["files"]
        path = path.strip("/")
        prefix = path + "/" if path else ""
        dirs: set[str] = set()
        out = []
        for p in sorted(p for p in files if p.startswith(prefix)):
            parts = p[len(prefix) :].split("/")
            depth = len(parts) - 1 if self._flag("recursive") else min(len(parts) - 1, 1)
            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
            if len(parts) == 1 or self._flag("recursive"):
                out.append(_file_entry(p, files[p]))
        if path and not out and not dirs:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._send_json([_dir_entry(d, files) for d in sorted(dirs)] + out)

    def _paths_info(self, repo: _Repo, rev: str) -> None:
        self._readable(repo)
        if "json" in self.headers.get("Content-Type", ""):
            paths = self._json().get("paths", [])
        else:
            paths = parse_qs(self._body().decode()).get("paths", [])
        files = self._commit_at(repo, rev)[1]["files"]
        out = []
        for p in [paths] if isinstance(paths, str) else paths:
            p = p.strip("/")
            if p in files:
                out.append(_file_entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append(_dir_entry(p, files))
        self._send_json(out)

    # -- uploads
    def _preupload(self, repo: _Repo, rev: str) -> None:
        self._writable(repo)
        body = self._json()
        head, commit = self._commit_at(repo, rev)
        out = []
        for f in body.get("files", []):
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                sample = b""
            path, existing = f.get("path"), commit["files"].get(f.get("path"))
            oid = existing and (existing["sha256"] if existing["lfs"] else existing["git_oid"])
            mode = _upload_mode(str(path), int(f.get("size") or 0), sample)
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out, "commitOid": head})

    def _lfs_batch(self, repo: _Repo) -> None:
        self._writable(repo)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else -1,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if not self._store.has_lfs(repo, oid):  # already here: no actions, client skips it
                href = f"{self.base_url}/lfs-upload/{repo.type}/{quote(repo.ns)}/{quote(repo.name)}"
                sig = self.hub._sign(f"{repo.type}/{repo.id}/{oid}/{size}")
                entry["actions"] = {
                    "upload": {"href": f"{href}/{oid}/{size}?sig={sig}"},
                    "verify": {"href": f"{href}/{oid}/{size}?sig={sig}"},
                }
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_object(self, repo: _Repo, oid: str, size_str: str) -> None:
        """PUT uploads (the signed href is the authorisation: no token is sent); POST verifies."""
        sig = self.query.get("sig", [""])[-1]
        if not hmac.compare_digest(sig, self.hub._sign(f"{repo.type}/{repo.id}/{oid}/{size_str}")):
            raise HubError(403, "Invalid or missing upload signature")
        if self._store.repo_meta(repo) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if self.command == "PUT":
            received = self._store.put_stream(self._iter_body(), oid, int(size_str))
            self._store.mark_lfs(repo, oid)
            self.hub._count("lfs_uploads")
            self.hub._count("lfs_bytes_received", received)
            return self._send(200, b"", {})
        if self.command == "POST":
            body = self._json()
            obj = self._store.object_path(oid)
            if not self._store.has_lfs(repo, oid) or obj.stat().st_size != body.get("size"):
                raise HubError(404, f"LFS object {oid} not found")
            return self._send_json({"message": "Verified"})
        raise self._unknown()

    def _commit(self, repo: _Repo, rev: str) -> None:
        user = self._writable(repo)
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this local Hub")
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid ndjson") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        changes: list[tuple[str, str, dict | None]] = []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = _clean_path(value.get("path"))
            if key == "file":
                changes.append(("add", path, self._regular_file(value)))
            elif key == "lfsFile":
                changes.append(("add", path, self._lfs_file(repo, path, value)))
            elif key in ("deletedFile", "deletedFolder"):
                changes.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")
        oid = self._store.commit_changes(repo, rev, changes, lines[0].get("value") or {}, user.name)
        self.hub._count("commits")
        self._send_json(
            {
                "commitUrl": f"{self.base_url}/{repo.web_path}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            }
        )

    def _regular_file(self, value: dict[str, Any]) -> dict[str, Any]:
        try:
            content = value.get("content", "")
            data = (
                base64.b64decode(content, validate=True)
                if value.get("encoding") == "base64"
                else content.encode()
            )
        except (ValueError, AttributeError):
            raise HubError(400, f"Invalid content for {value.get('path')!r}") from None
        return {
            "sha256": self._store.put_bytes(data),
            "size": len(data),
            "lfs": False,
            "git_oid": _git_blob_oid(data),
        }

    def _lfs_file(self, repo: _Repo, path: str, value: dict[str, Any]) -> dict[str, Any]:
        oid = str(value.get("oid"))
        if not self._store.has_lfs(repo, oid):
            raise HubError(422, f"LFS object {oid} for {path!r} was never uploaded to this repo")
        size = self._store.object_path(oid).stat().st_size
        if value.get("size") not in (None, size):
            raise HubError(422, f"LFS object {oid} has size {size}, not {value.get('size')}")
        return {
            "sha256": oid,
            "size": size,
            "lfs": True,
            "git_oid": _git_blob_oid(_lfs_pointer(oid, size)),
        }

    # -- downloads
    def _resolve(self, repo: _Repo, rev: str, path: str) -> None:
        self._readable(repo)
        oid, commit = self._commit_at(repo, rev)
        headers = {"X-Repo-Commit": oid}
        f = commit["files"].get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers=headers)
        size = f["size"]
        headers.update(
            {"ETag": f'"{f["sha256"] if f["lfs"] else f["git_oid"]}"', "Accept-Ranges": "bytes"}
        )
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        if (rng := self.headers.get("Range")) and (
            m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        ):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m[2]:
                start = max(0, size - int(m[2]))
            if start > end:
                raise HubError(
                    416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self._send(status, b"", headers, length=length, content_type="application/octet-stream")
        if self.command == "GET":
            with open(self._store.object_path(f["sha256"]), "rb") as fh:
                fh.seek(start)
                while length > 0 and (chunk := fh.read(min(length, CHUNK))):
                    self.wfile.write(chunk)
                    length -= len(chunk)


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
        self._store = _Store(self.storage)
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
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.hub = self
        return self._httpd

    def start(self) -> HubServer:
        """Serve in a daemon thread; returns self so ``HubServer(...).start()`` chains."""
        httpd = self._bind()
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
