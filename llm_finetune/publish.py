"""Publishing: a model or adapter folder as one verified commit on a Hub branch.

A publish either lands the whole folder in one commit on the branch, checked file by file
against what the server lists afterwards, or leaves the branch as it was: the Hub applies a
commit atomically, and LFS objects uploaded by an interrupted attempt are only ever referenced
by a later complete commit. Transient failures (5xx, timeouts, dropped connections) are retried
with bounded exponential backoff around the whole upload; each retry asks the server what it
already has, so only missing LFS objects are sent again. The token goes to the client only and
is scrubbed from every message (see llm_finetune.hub).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm_finetune.errors import UserError, first_line
from llm_finetune.hub import (
    DEFAULT_ENDPOINT,
    RetryPolicy,
    client_backoff,
    client_timeout,
    connection_error,
    explain_http_error,
    hub_api,
    hub_client_settings,
    not_an_api,
    redact,
    require_token,
)
from llm_finetune.manifest import MANIFEST, check_manifest, sha256_file

logger = logging.getLogger(__name__)

# Files up to this size are read into memory once: the bytes that were checked are the bytes
# sent. Larger files are always LFS on the Hub, whose content is addressed by the sha256 we send.
IN_MEMORY_MAX = 10 << 20
# Files a loader reads: a stale one left beside a new upload (an old single-file checkpoint next
# to new shards, an old tokenizer.model) would make the repo load something else, so a publish
# deletes those the folder no longer has, in the same commit. Other remote files are left alone.
ARTEFACT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
)
# Never uploaded: the manifest holds local paths; these are local caches, as in upload_folder.
SKIPPED_PREFIXES = (".git/", ".cache/huggingface/")
FolderKind = Literal["model", "adapter", "gguf"]
REQUIRED_FILE: dict[str, str] = {
    "model": "config.json",
    "adapter": "adapter_config.json",
    "gguf": "*.gguf",
}
KIND_NAMES = {"model": "a model folder", "adapter": "a LoRA adapter folder", "gguf": "GGUF files"}


@dataclass
class PublishReport:
    repo_id: str
    endpoint: str
    revision: str
    commit: str  # the commit that holds the folder (the existing head if nothing changed)
    url: str
    files: list[str]  # files published from the folder, all verified on the server
    readme_kept: bool = False  # the revision's own README.md was kept (replace_readme=False)
    committed: bool = True  # False: the revision already held exactly these files
    deleted: list[str] = field(default_factory=list)  # stale model files removed by the commit
    # files the branch already held with the same content before the commit (not sent again)
    unchanged: list[str] = field(default_factory=list)
    attempts: int = 1  # 1 + the retries after transient failures
    kind: str = "model"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LocalFile:
    """A file to publish, pinned when it was checked: its size, sha256 and (if small) bytes."""

    path: str  # in the repo, POSIX
    source: Path
    size: int
    sha256: str
    mtime_ns: int
    data: bytes | None = None  # small files: exactly these bytes are sent

    def operation(self) -> Any:
        """A fresh CommitOperationAdd; large files reuse the sha256 instead of re-hashing."""
        from huggingface_hub import CommitOperationAdd

        if self.data is not None:
            return CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=self.data)
        operation = CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=str(self.source))
        if operation.upload_info.size != self.size:
            raise _changed_error(self.folder, self.path)
        operation.upload_info.sha256 = bytes.fromhex(self.sha256)
        return operation

    @property
    def folder(self) -> Path:
        """The folder being published (`source` minus `path`)."""
        return self.source.parents[self.path.count("/")]

    def git_oid(self) -> str:
        """The git blob id, which the Hub lists for regular (non-LFS) files."""
        from huggingface_hub.utils.sha import git_hash

        return git_hash(self.data if self.data is not None else self.source.read_bytes())

    def changed(self) -> bool:
        """Whether a large file was touched since it was hashed (small ones are in memory)."""
        if self.data is not None:
            return False
        try:
            stat = self.source.stat()
        except OSError:
            return True
        return (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns)


def _changed_error(folder: Path, name: str) -> UserError:
    return UserError(
        f"{str(folder)!r} changed after it was checked ({name}); nothing was published: "
        "re-create the folder (or restore the file) and publish again"
    )


def is_artefact(path: str) -> bool:
    """Whether a loader (transformers, peft) reads this file: see ARTEFACT_PATTERNS."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) for pattern in ARTEFACT_PATTERNS)


def local_files(folder: Path) -> list[LocalFile]:
    """Every file to publish, hashed once, and checked against the folder's manifest if any.

    Runs before any network call: a file that changed after the merge was verified is never
    published. The manifest itself is not published (it holds local paths).
    """
    folder = Path(folder)
    found: dict[str, tuple[Path, os.stat_result]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and path.name != MANIFEST and not rel.startswith(SKIPPED_PREFIXES):
            found[rel] = (path, path.stat())  # before the manifest check hashes the files
    expected = check_manifest(folder)["files"] if (folder / MANIFEST).is_file() else None
    files = []
    for rel, (path, stat) in found.items():
        data: bytes | None = None
        if stat.st_size <= IN_MEMORY_MAX:
            data = path.read_bytes()
            size, sha = len(data), hashlib.sha256(data).hexdigest()
        else:
            size = stat.st_size
            sha = expected[rel]["sha256"] if expected and rel in expected else sha256_file(path)
        want = expected.get(rel) if expected is not None else {"sha256": sha, "size": size}
        if want is None or (want.get("sha256"), want.get("size")) != (sha, size):
            raise _changed_error(folder, rel)
        file = LocalFile(rel, path, size, sha, stat.st_mtime_ns, data)
        if file.changed():  # touched while the manifest check was reading it
            raise _changed_error(folder, rel)
        files.append(file)
    return files


def remote_differences(
    files: list[LocalFile], remote: dict[str, Any], *, ignore: tuple[str, ...] = ()
) -> list[str]:
    """How the server's files (path -> RepoFile) differ from the local ones; [] if they match.

    Sizes always, sha256 for LFS files, git blob ids for regular files; and no model file may
    be on the server that the folder does not have (`ignore`: paths left alone on purpose).
    """
    problems = [p for p in (_difference(f, remote.get(f.path)) for f in files) if p]
    local = {file.path for file in files}
    for path in sorted(remote):
        if path not in local and path not in ignore and is_artefact(path):
            problems.append(f"{path} is on the Hub but not in the folder")
    return problems


def _difference(file: LocalFile, entry: Any) -> str | None:
    """How the server's `entry` (a RepoFile, or None) differs from `file`; None if it does not."""
    if entry is None:
        return f"{file.path} is missing"
    if entry.size != file.size:
        return f"{file.path} has {entry.size} bytes, not {file.size}"
    if entry.lfs is not None and entry.lfs.sha256 != file.sha256:
        return f"{file.path} has sha256 {entry.lfs.sha256[:12]}, not {file.sha256[:12]}"
    if entry.lfs is None and entry.blob_id != file.git_oid():
        return f"{file.path} has other content (git blob {entry.blob_id[:12]})"
    return None


def rerun_command(
    folder: Path, repo_id: str, endpoint: str, revision: str = "main", private: bool = False
) -> str:
    """The exact CLI command that resumes this publish (it only sends what the Hub lacks)."""
    parts = ["llm-finetune", "publish", "--folder", str(Path(folder).resolve()), "--repo-id"]
    parts.append(repo_id)
    if endpoint.rstrip("/") != DEFAULT_ENDPOINT:
        parts += ["--endpoint", endpoint]
    if revision != "main":
        parts += ["--revision", revision]
    if private:
        parts.append("--private")
    return shlex.join(parts)


TRANSIENT_STATUSES = {408, 412, 423, 425, 429}  # 412: the branch moved (parent commit check)


def _transient_or_error(
    exc: Exception, endpoint: str, repo_id: str, folder: Path
) -> UserError | None:
    """None for a failure worth retrying; otherwise the UserError to stop with at once."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    exc = _unwrap(exc)
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status is None or status >= 500 or status in TRANSIENT_STATUSES:
            return None
        return explain_http_error(exc, endpoint, repo_id)
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set: unset it to publish to {endpoint}")
    if connection_error(exc) is not None:
        return None  # timeouts, refused or dropped connections, broken responses
    if isinstance(exc, OSError):
        return UserError(f"cannot read {str(folder)!r} while publishing it: {exc}")
    if isinstance(exc, json.JSONDecodeError):  # an HTML page where the Hub answers JSON
        return not_an_api(endpoint, "a request of the upload")
    if isinstance(exc, ValueError):  # the client refused the operation or the server's reply
        return UserError(f"publishing {repo_id!r} to {endpoint} failed: {_first_line(exc)}")
    raise exc


def _unwrap(exc: Exception) -> Exception:
    """The client wraps a failed LFS upload in RuntimeError("Error while uploading ..."): the
    cause (an HTTP status or a transport error) is what says whether to retry."""
    while type(exc) is RuntimeError and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:300]


def _reason(exc: Exception) -> str:
    exc = _unwrap(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _remote_files(api: Any, repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    entries = api.list_repo_tree(repo_id, revision=revision, recursive=True)
    return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}


@dataclass
class _Outcome:
    commit: str
    committed: bool
    readme_kept: bool
    deleted: list[str]
    published: list[LocalFile]
    unchanged: list[str]


def _attempt(
    api: Any,
    files: list[LocalFile],
    repo_id: str,
    *,
    private: bool,
    revision: str,
    message: str,
    replace_readme: bool,
) -> _Outcome:
    """One try at the whole upload: read the branch head, upload what is missing, one commit.

    Everything is recomputed from the server's state, so a retry (or a re-run after a crash)
    resumes: LFS objects the server has are skipped by the LFS batch answer, files already
    committed are no-ops, and `parent_commit` turns a commit racing an earlier attempt's
    (whose reply was lost) into a 412 and another look, never into a second commit.
    """
    from huggingface_hub import CommitOperationDelete

    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision).sha
    remote = _remote_files(api, repo_id, head)
    readme = next((f for f in files if f.path == "README.md"), None)
    readme_kept = (
        readme is not None
        and not replace_readme
        and "README.md" in remote
        and remote["README.md"].blob_id != readme.git_oid()
    )
    published = [f for f in files if not (readme_kept and f.path == "README.md")]
    local = {f.path for f in files}
    stale = sorted(p for p in remote if p not in local and is_artefact(p))
    unchanged = [f.path for f in published if _difference(f, remote.get(f.path)) is None]
    additions = [f.operation() for f in published]
    api.preupload_lfs_files(repo_id, additions=additions, revision=revision, free_memory=False)
    for file in published:  # uploads done; the commit must describe the checked files
        if file.changed():
            raise _changed_error(file.folder, file.path)
    operations = [*additions, *(CommitOperationDelete(path_in_repo=p) for p in stale)]
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=message,
        revision=revision,
        parent_commit=head,
    )
    return _Outcome(info.oid, info.oid != head, readme_kept, stale, published, unchanged)


def folder_kind(folder: Path) -> FolderKind:
    """An adapter folder has adapter_config.json and no config.json, a GGUF repo's folder
    *.gguf files and no config.json; anything else is a model."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return "model"
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    return "gguf" if any(folder.glob("*.gguf")) else "model"


def publish(
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    kind: FolderKind | None = None,
    private: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    replace_readme: bool = False,
    retry: RetryPolicy | None = None,
    files: list[LocalFile] | None = None,
) -> PublishReport:
    """Publish a model folder (config.json, weights, tokenizer), a LoRA adapter folder
    (adapter_config.json, weights) or a folder of GGUF files as one verified commit.

    `kind`: what the folder must be; None takes it from the folder (see `folder_kind`). The
    folder's manifest, if any, is checked first; transient failures are retried per `retry`;
    an existing README.md at `revision` is kept unless `replace_readme`. `files`: the folder
    as `local_files` read it already (the CLI does, before its first request).
    """
    folder = Path(folder)
    kind = kind or folder_kind(folder)
    required = REQUIRED_FILE[kind]
    if not any(path.is_file() for path in folder.glob(required)):
        raise UserError(
            f"{str(folder)!r} is not {KIND_NAMES[kind]} (no {required}): nothing to publish"
        )
    token = require_token(token)
    if files is None:
        files = local_files(folder)  # the manifest check: before anything is sent
    policy = retry or RetryPolicy()
    message = commit_message or f"Upload {folder.name} with llm-finetune"
    api = hub_api(endpoint, token)
    outcome, remote, last = None, {}, ""
    attempt = 0
    with (
        hub_client_settings(endpoint),
        client_timeout(policy.timeout),
        client_backoff(policy.client_retries, policy.first_wait, policy.max_wait),
    ):
        for attempt in range(1, max(1, policy.attempts) + 1):
            try:
                outcome = _attempt(
                    api,
                    files,
                    repo_id,
                    private=private,
                    revision=revision,
                    message=message,
                    replace_readme=replace_readme,
                )
                remote = _remote_files(api, repo_id, outcome.commit)
                break
            except Exception as exc:  # sorted below: transient, the user's to fix, or a bug
                error = _transient_or_error(exc, endpoint, repo_id, folder)
                if error is not None:
                    raise UserError(redact(str(error), token)) from None
                outcome, last = None, redact(_reason(exc), token)
                if attempt < policy.attempts:
                    wait = policy.wait(attempt)
                    logger.warning(
                        "publishing %s: attempt %d of %d failed (%s); retrying in %.1f s",
                        repo_id,
                        attempt,
                        policy.attempts,
                        last,
                        wait,
                    )
                    time.sleep(wait)
    command = rerun_command(folder, repo_id, endpoint, revision, private)
    if outcome is None:
        raise UserError(
            redact(
                f"publishing {str(folder)!r} to {repo_id!r} on {endpoint} failed {attempt} "
                f"times (last: {last}); {revision!r} holds its previous commit or the complete "
                f"upload, never part of it. Re-run `{command}` to resume: it sends only what the "
                "Hub does not have yet",
                token,
            )
        )
    problems = remote_differences(outcome.published, remote, ignore=("README.md",))
    if problems:
        raise UserError(
            redact(
                f"{repo_id!r} at commit {outcome.commit[:12]} on {endpoint} does not match "
                f"{str(folder)!r}: {'; '.join(problems[:3])}{'...' if len(problems) > 3 else ''}."
                f" Re-run `{command}`",
                token,
            )
        )
    return PublishReport(
        repo_id=repo_id,
        endpoint=endpoint,
        revision=revision,
        commit=outcome.commit,
        url=f"{endpoint}/{repo_id}/tree/{revision}",
        files=[f.path for f in outcome.published],
        readme_kept=outcome.readme_kept,
        committed=outcome.committed,
        deleted=outcome.deleted,
        unchanged=outcome.unchanged,
        attempts=attempt,
        kind=kind,
    )
