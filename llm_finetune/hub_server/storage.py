"""The local Hub's repos, commits and objects, as plain files that survive restarts.

Layout under the storage folder::

    objects/<sha256>                        content-addressed file contents (regular and LFS)
    tmp/                                    temp files, renamed into place with os.replace
    repos/<type>s/<ns>/<name>/repo.json     {id, type, private, createdAt, author}
    repos/<type>s/<ns>/<name>/refs.json     {branch: commit oid}
    repos/<type>s/<ns>/<name>/commits/<oid>.json   {parent, title, message, author, date, files}
    repos/<type>s/<ns>/<name>/lfs/<sha256>  marker: this LFS object was uploaded to this repo

Each commit stores the full file table, so reading any revision is a single file read. Ref
updates happen under one lock, which keeps commits atomic within one server process (two
server processes must not share a storage directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_finetune.hub_server.errors import HubError

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
# Files uploaded through LFS; everything else small and text-like goes inline in the commit.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf")
LFS_SUFFIXES += (".msgpack", ".npy", ".npz", ".pkl", ".zip", ".gz", ".tar", ".parquet", ".arrow")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
CHUNK = 1 << 20  # bytes per read when streaming request bodies and stored objects

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which the client uses as ETag / oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class Repo:
    type: str  # "model" | "dataset" | "space"
    ns: str
    name: str

    def __post_init__(self) -> None:
        # Names become directory names: reject anything that is not a plain Hub name.
        if not (NAME_RE.match(self.ns) and NAME_RE.match(self.name)):
            raise HubError(404, "Repository not found", "RepoNotFound")

    @property
    def id(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def web_path(self) -> str:
        return URL_PREFIXES[self.type] + self.id


class Store:
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
    def repo_dir(self, repo: Repo) -> Path:
        return self.root / "repos" / f"{repo.type}s" / repo.ns / repo.name

    def repo_meta(self, repo: Repo) -> dict[str, Any] | None:
        return self._read_json(self.repo_dir(repo) / "repo.json")

    def refs(self, repo: Repo) -> dict[str, str]:
        return self._read_json(self.repo_dir(repo) / "refs.json") or {}

    def commit(self, repo: Repo, oid: str) -> dict[str, Any] | None:
        if not COMMIT_RE.match(oid):
            return None
        return self._read_json(self.repo_dir(repo) / "commits" / f"{oid}.json")

    def resolve(self, repo: Repo, rev: str) -> str | None:
        """Branch name (optionally refs/heads/...) or full commit oid -> commit oid."""
        refs = self.refs(repo)
        branch = rev.removeprefix("refs/heads/")
        if branch in refs:
            return refs[branch]
        return rev if self.commit(repo, rev) is not None else None

    def has_lfs(self, repo: Repo, sha256: str) -> bool:
        marker = self.repo_dir(repo) / "lfs" / sha256
        return (
            bool(SHA256_RE.match(sha256)) and marker.exists() and self.object_path(sha256).exists()
        )

    def mark_lfs(self, repo: Repo, sha256: str) -> None:
        (self.repo_dir(repo) / "lfs").mkdir(exist_ok=True)
        (self.repo_dir(repo) / "lfs" / sha256).touch()

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict, title: str, message: str, author: str
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

    def create_repo(self, repo: Repo, private: bool, author: str) -> dict[str, Any] | None:
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
                "git_oid": git_blob_oid(data),
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

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            trash = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
            os.replace(self.repo_dir(repo), trash / "repo")  # disappears atomically
        shutil.rmtree(trash, ignore_errors=True)

    def commit_changes(
        self,
        repo: Repo,
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

    def set_branch(self, repo: Repo, branch: str, oid: str | None, create: bool) -> None:
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
