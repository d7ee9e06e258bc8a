"""The Hub API endpoints: one function per route, each taking the request it answers.

``route`` maps a request to its endpoint. Endpoints check access (anonymous requests read public
repos only; writes need a write token of the namespace), read the body through the request,
change the :class:`~llm_finetune.hub_server.storage.Store`, and reply with the JSON shapes the
``huggingface_hub`` client expects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
from typing import Any
from urllib.parse import parse_qs, quote

from llm_finetune.hub_server.errors import HubError
from llm_finetune.hub_server.request import HubUser, Request
from llm_finetune.hub_server.storage import (
    CHUNK,
    COMMIT_RE,
    DEFAULT_BRANCH,
    LFS_SUFFIXES,
    NAME_RE,
    REPO_TYPES,
    SHA256_RE,
    URL_PREFIXES,
    Repo,
    git_blob_oid,
    lfs_pointer,
)

logger = logging.getLogger(__name__)

REGULAR_MAX_SIZE = 1 << 20
_BRANCH_RE = re.compile(r"^(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


def route(req: Request, s: list[str]) -> None:
    """Answer one authenticated request; ``s`` is its URL path, split at "/" and unquoted."""
    m = req.command
    if s[:1] == ["api"]:
        return _route_api(req, s[1:])
    if len(s) == 6 and s[0] == "lfs-upload" and s[1] in URL_PREFIXES:
        return _lfs_object(req, Repo(s[1], s[2], s[3]), s[4], s[5])
    if s[-4:] == ["info", "lfs", "objects", "batch"] and m == "POST":
        head = s[:-4]
        if head and head[-1].endswith(".git"):
            head[-1] = head[-1][:-4]
            if repo := _repo_from(head):
                return _lfs_batch(req, repo)
    if m in ("GET", "HEAD"):
        if len(s) >= 5 and s[0] in REPO_TYPES and s[3] == "resolve":
            return _resolve(req, Repo(REPO_TYPES[s[0]], s[1], s[2]), s[4], "/".join(s[5:]))
        if len(s) >= 4 and s[2] == "resolve":
            return _resolve(req, Repo("model", s[0], s[1]), s[3], "/".join(s[4:]))
    raise _unknown(req)


def _repo_from(parts: list[str]) -> Repo | None:
    if len(parts) == 2:
        return Repo("model", *parts)
    if len(parts) == 3 and parts[0] in REPO_TYPES:
        return Repo(REPO_TYPES[parts[0]], parts[1], parts[2])
    return None


def _route_api(req: Request, s: list[str]) -> None:
    m = req.command
    if s == ["whoami-v2"] and m == "GET":
        return _whoami(req)
    if s == ["repos", "create"] and m == "POST":
        return _create_repo(req)
    if s == ["repos", "delete"] and m == "DELETE":
        return _delete_repo(req)
    if s == ["validate-yaml"] and m == "POST":
        req.read_body()
        return req.send_json({"errors": [], "warnings": []})
    if s == ["agent-harnesses"] and m == "GET":  # empty registry: no agent detection
        return req.send_json({"standardEnvVars": [], "harnesses": {}})
    if s[:1] == ["telemetry"]:
        return req.send(200, b"", {})
    if len(s) >= 3 and s[0] in REPO_TYPES:
        repo = Repo(REPO_TYPES[s[0]], s[1], s[2])
        action, args = (s[3], s[4:]) if len(s) > 3 else ("", [])
        call = (m, action, len(args))
        if call == ("GET", "", 0):
            return _repo_info(req, repo, DEFAULT_BRANCH)
        if call == ("GET", "revision", 1):
            return _repo_info(req, repo, args[0])
        if call == ("POST", "preupload", 1):
            return _preupload(req, repo, args[0])
        if call == ("POST", "commit", 1):
            return _commit(req, repo, args[0])
        if m == "GET" and action == "tree" and args:
            return _tree(req, repo, args[0], "/".join(args[1:]))
        if call == ("POST", "paths-info", 1):
            return _paths_info(req, repo, args[0])
        if call == ("GET", "refs", 0):
            return _refs(req, repo)
        if call == ("GET", "commits", 1):
            return _commits(req, repo, args[0])
        if call in (("POST", "branch", 1), ("DELETE", "branch", 1)):
            return _branch(req, repo, args[0])
    raise _unknown(req)


def _unknown(req: Request) -> HubError:
    request = f"{req.command} {req.url_path}"
    logger.debug("Unknown route: %s", request)
    req.hub._record_unknown(request)
    return HubError(404, f"Not found: {request}")


# -- access checks
def _is_member(req: Request, ns: str) -> bool:
    return req.user is not None and ns in (req.user.name, *req.user.orgs)


def _require_write(req: Request, ns: str) -> HubUser:
    if req.user is None:
        raise HubError(401, "You must be authenticated to write to the Hub")
    if not req.user.can_write:
        raise HubError(403, "This is a read-only token: write access is required")
    if not _is_member(req, ns):
        raise HubError(403, f"You don't have the rights to write to the namespace {ns!r}")
    return req.user


def _readable(req: Request, repo: Repo) -> dict[str, Any]:
    meta = req.store.repo_meta(repo)
    if meta is None or (meta["private"] and not _is_member(req, repo.ns)):
        raise HubError(404, "Repository not found", "RepoNotFound")  # private looks missing
    return meta


def _writable(req: Request, repo: Repo) -> HubUser:
    _readable(req, repo)
    return _require_write(req, repo.ns)


def _commit_at(req: Request, repo: Repo, rev: str) -> tuple[str, dict[str, Any]]:
    oid = req.store.resolve(repo, rev)
    commit = req.store.commit(repo, oid) if oid else None
    if commit is None:
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return oid, commit  # type: ignore[return-value]


# -- account and repos
def _whoami(req: Request) -> None:
    if (u := req.user) is None:
        raise HubError(401, "Invalid username or password.")
    role = "write" if u.can_write else "read"
    orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": role} for o in u.orgs]
    token = {"displayName": "local", "role": role}
    req.send_json(
        {
            "type": "user",
            "id": u.name,
            "name": u.name,
            "fullname": u.name,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": token},
        }
    )


def _repo_payload(req: Request) -> tuple[Repo, dict[str, Any]]:
    body = req.read_json()
    rtype = body.get("type") or "model"
    if req.user is None:
        raise HubError(401, "You must be authenticated to manage repositories")
    ns, name = body.get("organization") or req.user.name, body.get("name")
    valid = all(isinstance(x, str) and NAME_RE.match(x) for x in (ns, name))
    if rtype not in URL_PREFIXES or not valid:
        raise HubError(400, f"Invalid repo type or id: {rtype!r} {ns!r}/{name!r}")
    return Repo(rtype, ns, name), body


def _create_repo(req: Request) -> None:
    repo, body = _repo_payload(req)
    user = _require_write(req, repo.ns)
    private = body.get("private")
    private = bool(private) if private is not None else body.get("visibility") == "private"
    url = f"{req.base_url}/{repo.web_path}"
    meta = req.store.create_repo(repo, private, user.name)
    if meta is None:
        raise HubError(409, f"You already created this {repo.type} repo", extra={"url": url})
    req.send_json({"url": url, "name": repo.id, "id": meta["id"]})


def _delete_repo(req: Request) -> None:
    repo, _ = _repo_payload(req)
    _writable(req, repo)
    req.store.delete_repo(repo)
    req.send_json({})


def _repo_info(req: Request, repo: Repo, rev: str) -> None:
    meta = _readable(req, repo)
    oid, commit = _commit_at(req, repo, rev)
    siblings = []
    for path, f in sorted(commit["files"].items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if req.flag("blobs"):
            sibling.update(size=f["size"], blobId=f["git_oid"])
            if f["lfs"]:
                pointer_size = len(lfs_pointer(f["sha256"], f["size"]))
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
    req.send_json(info)


def _refs(req: Request, repo: Repo) -> None:
    _readable(req, repo)
    refs = req.store.refs(repo)
    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in refs.items()]
    out: dict[str, Any] = {"branches": branches, "tags": [], "converts": []}
    if req.flag("include_prs"):
        out["pullRequests"] = []
    req.send_json(out)


def _branch(req: Request, repo: Repo, branch: str) -> None:
    _writable(req, repo)
    if req.command == "DELETE":
        if branch == DEFAULT_BRANCH:
            raise HubError(403, "Cannot delete the default branch")
        req.store.set_branch(repo, branch, None, create=False)
        return req.send_json({})
    if not _BRANCH_RE.match(branch) or COMMIT_RE.match(branch):
        raise HubError(400, f"Invalid branch name: {branch!r}")
    oid, _ = _commit_at(req, repo, req.read_json().get("startingPoint") or DEFAULT_BRANCH)
    req.store.set_branch(repo, branch, oid, create=True)
    req.send_json({})


def _commits(req: Request, repo: Repo, rev: str) -> None:
    _readable(req, repo)
    oid: str | None = _commit_at(req, repo, rev)[0]
    out = []
    while oid and (c := req.store.commit(repo, oid)):
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
    req.send_json(out)


# -- listing
def _tree(req: Request, repo: Repo, rev: str, path: str) -> None:
    _readable(req, repo)
    files = _commit_at(req, repo, rev)[1]["files"]
    path = path.strip("/")
    prefix = path + "/" if path else ""
    dirs: set[str] = set()
    out = []
    for p in sorted(p for p in files if p.startswith(prefix)):
        parts = p[len(prefix) :].split("/")
        depth = len(parts) - 1 if req.flag("recursive") else min(len(parts) - 1, 1)
        dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        if len(parts) == 1 or req.flag("recursive"):
            out.append(_file_entry(p, files[p]))
    if path and not out and not dirs:
        raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
    req.send_json([_dir_entry(d, files) for d in sorted(dirs)] + out)


def _paths_info(req: Request, repo: Repo, rev: str) -> None:
    _readable(req, repo)
    if "json" in req.headers.get("Content-Type", ""):
        paths = req.read_json().get("paths", [])
    else:
        paths = parse_qs(req.read_body().decode()).get("paths", [])
    files = _commit_at(req, repo, rev)[1]["files"]
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        p = p.strip("/")
        if p in files:
            out.append(_file_entry(p, files[p]))
        elif any(f.startswith(p + "/") for f in files):
            out.append(_dir_entry(p, files))
    req.send_json(out)


# -- uploads
def _preupload(req: Request, repo: Repo, rev: str) -> None:
    _writable(req, repo)
    body = req.read_json()
    head, commit = _commit_at(req, repo, rev)
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
    req.send_json({"files": out, "commitOid": head})


def _lfs_batch(req: Request, repo: Repo) -> None:
    _writable(req, repo)
    body = req.read_json()
    if body.get("operation") != "upload":
        raise HubError(400, "Only the LFS 'upload' operation is supported")
    objects = []
    for obj in body.get("objects", []):
        oid, size = str(obj.get("oid")), obj.get("size")
        if not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            objects.append(
                {
                    "oid": oid,
                    "size": size if isinstance(size, int) else -1,
                    "error": {"code": 422, "message": "Invalid oid or size"},
                }
            )
            continue
        entry: dict[str, Any] = {"oid": oid, "size": size}
        if not req.store.has_lfs(repo, oid):  # already here: no actions, client skips it
            href = f"{req.base_url}/lfs-upload/{repo.type}/{quote(repo.ns)}/{quote(repo.name)}"
            sig = req.hub._sign(f"{repo.type}/{repo.id}/{oid}/{size}")
            entry["actions"] = {
                "upload": {"href": f"{href}/{oid}/{size}?sig={sig}"},
                "verify": {"href": f"{href}/{oid}/{size}?sig={sig}"},
            }
        objects.append(entry)
    req.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})


def _lfs_object(req: Request, repo: Repo, oid: str, size_str: str) -> None:
    """PUT uploads (the signed href is the authorisation: no token is sent); POST verifies."""
    sig = req.query.get("sig", [""])[-1]
    if not hmac.compare_digest(sig, req.hub._sign(f"{repo.type}/{repo.id}/{oid}/{size_str}")):
        raise HubError(403, "Invalid or missing upload signature")
    if req.store.repo_meta(repo) is None:
        raise HubError(404, "Repository not found", "RepoNotFound")
    if req.command == "PUT":
        received = req.store.put_stream(req.iter_body(), oid, int(size_str))
        req.store.mark_lfs(repo, oid)
        req.hub._count("lfs_uploads")
        req.hub._count("lfs_bytes_received", received)
        return req.send(200, b"", {})
    if req.command == "POST":
        body = req.read_json()
        obj = req.store.object_path(oid)
        if not req.store.has_lfs(repo, oid) or obj.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {oid} not found")
        return req.send_json({"message": "Verified"})
    raise _unknown(req)


def _commit(req: Request, repo: Repo, rev: str) -> None:
    user = _writable(req, repo)
    if req.flag("create_pr"):
        raise HubError(400, "Pull requests are not supported by this local Hub")
    try:
        lines = [json.loads(line) for line in req.read_body().splitlines() if line.strip()]
    except ValueError:
        raise HubError(400, "Commit payload is not valid ndjson") from None
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "Commit payload must start with a header line")
    changes: list[tuple[str, str, dict | None]] = []
    for item in lines[1:]:
        key, value = item.get("key"), item.get("value") or {}
        path = _clean_path(value.get("path"))
        if key == "file":
            changes.append(("add", path, _regular_file(req, value)))
        elif key == "lfsFile":
            changes.append(("add", path, _lfs_file(req, repo, path, value)))
        elif key in ("deletedFile", "deletedFolder"):
            changes.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")
    oid = req.store.commit_changes(repo, rev, changes, lines[0].get("value") or {}, user.name)
    req.hub._count("commits")
    req.send_json(
        {
            "commitUrl": f"{req.base_url}/{repo.web_path}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }
    )


def _regular_file(req: Request, value: dict[str, Any]) -> dict[str, Any]:
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
        "sha256": req.store.put_bytes(data),
        "size": len(data),
        "lfs": False,
        "git_oid": git_blob_oid(data),
    }


def _lfs_file(req: Request, repo: Repo, path: str, value: dict[str, Any]) -> dict[str, Any]:
    oid = str(value.get("oid"))
    if not req.store.has_lfs(repo, oid):
        raise HubError(422, f"LFS object {oid} for {path!r} was never uploaded to this repo")
    size = req.store.object_path(oid).stat().st_size
    if value.get("size") not in (None, size):
        raise HubError(422, f"LFS object {oid} has size {size}, not {value.get('size')}")
    return {
        "sha256": oid,
        "size": size,
        "lfs": True,
        "git_oid": git_blob_oid(lfs_pointer(oid, size)),
    }


# -- downloads
def _resolve(req: Request, repo: Repo, rev: str, path: str) -> None:
    _readable(req, repo)
    oid, commit = _commit_at(req, repo, rev)
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
    if (rng := req.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
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
    req.send(status, b"", headers, length=length, content_type="application/octet-stream")
    if req.command == "GET":
        with open(req.store.object_path(f["sha256"]), "rb") as fh:
            fh.seek(start)
            while length > 0 and (chunk := fh.read(min(length, CHUNK))):
                req.wfile.write(chunk)
                length -= len(chunk)


# -- reply shapes
def _file_entry(path: str, f: dict[str, Any]) -> dict[str, Any]:
    entry = {"type": "file", "oid": f["git_oid"], "size": f["size"], "path": path}
    if f["lfs"]:
        pointer_size = len(lfs_pointer(f["sha256"], f["size"]))
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


def _clean_path(path: Any) -> str:
    """Validate a path inside a repo; paths are only dict keys, but keep them git-compatible."""
    parts = path.strip("/").split("/") if isinstance(path, str) else [""]
    if any(p in ("", ".", "..") or "\0" in p for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)
