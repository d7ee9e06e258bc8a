"""Publishing: preflight before training, a model card, one commit with the whole model.

A publish either lands the whole folder in one commit on the branch, checked file by file
against what the server lists afterwards, or leaves the branch as it was: the Hub applies a
commit atomically, and LFS objects uploaded by an interrupted attempt are only ever referenced
by a later complete commit. Transient failures (5xx, timeouts, dropped connections) are retried
with bounded exponential backoff around the whole upload; each retry asks the server what it
already has, so only missing LFS objects are sent again.

The token comes from `HF_TOKEN` or huggingface_hub's login cache (or, for the embedded local
server, from memory) and is passed to the client only: it is never printed, logged, written
to a file or put into an error message (messages are scrubbed of it as a last line of defence).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from llm_finetune.errors import UserError, first_line
from llm_finetune.manifest import MANIFEST, check_manifest, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
WRITE_ROLES = {"admin", "write", "contributor"}
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
FolderKind = Literal["model", "adapter"]
REQUIRED_FILE: dict[str, str] = {"model": "config.json", "adapter": "adapter_config.json"}


@dataclass
class PreflightReport:
    endpoint: str
    user: str
    repo_id: str
    repo_existed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass(frozen=True)
class RetryPolicy:
    """How much a flaky Hub may cost: a bounded number of whole-upload attempts.

    Waits double from `first_wait` up to `max_wait` (1, 2, 4 s by default: at most 4 attempts).
    Inside an attempt the client retries a failed LFS/preupload request `client_retries` times
    (same waits) before the attempt fails, so one blip on one shard costs one request, and a
    persistent failure sends each file at most attempts * (client_retries + 1) times.
    `timeout` bounds each wait for the server (connect, each read, each write), so a stalled
    connection becomes a retry instead of a hang; None keeps the client's default (no limit).
    """

    attempts: int = 4
    first_wait: float = 1.0
    max_wait: float = 8.0
    timeout: float | None = 120.0
    client_retries: int = 1

    def wait(self, failed_attempt: int) -> float:
        """Seconds to sleep after attempt number `failed_attempt` (1-based) failed."""
        return min(self.max_wait, self.first_wait * 2 ** (failed_attempt - 1))


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_loopback(endpoint: str) -> bool:
    return urlparse(endpoint).hostname in {"127.0.0.1", "localhost", "::1"}


def resolve_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` stored; never a token from the config."""
    from huggingface_hub import get_token

    return get_token()


@contextlib.contextmanager
def hub_client_settings(endpoint: str) -> Iterator[None]:
    """Client settings for one endpoint, restored afterwards.

    A loopback endpoint is this machine, not the Hub: HF_HUB_OFFLINE does not forbid it, and it
    speaks the plain LFS protocol rather than Xet. huggingface_hub reads both from module
    constants at call time.
    """
    from huggingface_hub import constants

    if not is_loopback(endpoint):
        yield
        return
    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET)
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


@contextlib.contextmanager
def client_timeout(seconds: float | None) -> Iterator[None]:
    """Give the client's shared HTTP session a timeout, restored afterwards.

    huggingface_hub 1.x creates its httpx client with `timeout=None` and passes no timeout on
    uploads, commits or listings, so a stalled server would hang a publish forever. The client
    is rebuilt by its factory after some errors, so the timeout goes into the factory.
    """
    if seconds is None:
        yield
        return
    import httpx
    from huggingface_hub.utils import _http, set_client_factory

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory() -> httpx.Client:
        client = previous()
        client.timeout = httpx.Timeout(seconds)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


@contextlib.contextmanager
def client_backoff(retries: int, first_wait: float, max_wait: float) -> Iterator[None]:
    """Bound the client's own per-request retries (LFS batch, PUT, verify, preupload).

    By default each of those requests is tried 6 times (waits 1..8 s) inside every one of our
    attempts: nested, a persistent 503 would send each shard 24 times over minutes. Here they
    follow our policy instead. The defaults of `http_backoff` are the only knob the client has;
    if a future client changes them, its own behaviour is kept.
    """
    from huggingface_hub.utils import _http

    defaults = getattr(_http.http_backoff, "__kwdefaults__", None) or {}
    keys = ("max_retries", "base_wait_time", "max_wait_time")
    if not all(key in defaults for key in keys):
        yield
        return
    saved = {key: defaults[key] for key in keys}
    defaults.update(max_retries=retries, base_wait_time=first_wait, max_wait_time=max_wait)
    try:
        yield
    finally:
        defaults.update(saved)


def redact(text: str, token: str | None) -> str:
    """The text with the token replaced: a last line of defence for messages and logs.

    Real tokens are long; a very short test token would only mangle ordinary words.
    """
    return text.replace(token, "<token>") if token and len(token) >= 8 else text


def _explain_http_error(exc: Exception, endpoint: str, repo_id: str) -> UserError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return UserError(
            f"the Hub token was rejected by {endpoint} (401): create a token with write access "
            "at https://huggingface.co/settings/tokens and export HF_TOKEN=<token>"
        )
    if status == 403:
        return UserError(
            f"the token may not write to {repo_id!r} on {endpoint} (403): use a token with "
            "write access to that namespace, or change publish.repo_id"
        )
    if status == 404:
        return UserError(
            f"{repo_id!r} or its revision was not found on {endpoint} (404): check publish.repo_id "
            "and publish.revision, and that the token can see the repo"
        )
    reason = first_line(exc)
    return UserError(f"the Hub at {endpoint} failed for {repo_id!r}: {reason}")


def _api(endpoint: str, token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="llm-finetune")


def check_namespace(whoami: dict[str, Any], repo_id: str) -> None:
    """The namespace must be the token's user or an organisation it can write to."""
    namespace = repo_id.split("/", 1)[0]
    user = whoami.get("name", "?")
    access = (whoami.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise UserError(
            f"the token of {user!r} is read-only: create a token with write access at "
            "https://huggingface.co/settings/tokens and export HF_TOKEN=<token>"
        )
    if namespace == user:
        return
    orgs = {o.get("name"): o.get("roleInOrg") for o in whoami.get("orgs") or []}
    if namespace not in orgs:
        raise UserError(
            f"publish.repo_id {repo_id!r}: the token belongs to {user!r}, who is not a member of "
            f"{namespace!r}; use {user}/<name> or an organisation of {sorted(orgs) or 'none'}"
        )
    if orgs[namespace] and orgs[namespace] not in WRITE_ROLES:
        raise UserError(
            f"publish.repo_id {repo_id!r}: {user!r} has role {orgs[namespace]!r} in {namespace!r}, "
            "which cannot write; ask an admin for write access"
        )


def preflight(repo_id: str, endpoint: str, token: str | None, private: bool) -> PreflightReport:
    """Check everything publishing needs before any training: a bad token costs seconds."""
    if not token:
        raise UserError(
            "publishing is enabled but no Hub token was found: export HF_TOKEN=<token> or run "
            "`hf auth login` (or set publish.enabled: false)"
        )
    from huggingface_hub.errors import HfHubHTTPError

    api = _api(endpoint, token)
    with hub_client_settings(endpoint):
        try:
            whoami = api.whoami()
            check_namespace(whoami, repo_id)
            existed = api.repo_exists(repo_id)
            if not existed:
                api.create_repo(repo_id, private=private, exist_ok=True)
        except HfHubHTTPError as exc:
            raise _explain_http_error(exc, endpoint, repo_id) from None
        except OSError as exc:
            raise UserError(f"cannot reach the Hub at {endpoint}: {exc}") from None
    return PreflightReport(endpoint, whoami.get("name", "?"), repo_id, existed)


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ model_name }} is **{{ base_model_text }}** fine-tuned with LoRA ({{ method }}) by
[llm-finetune](https://github.com/), then merged into the base weights and saved in
**{{ dtype }}** ("merged_16bit"), so it loads with plain transformers, without peft.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
prompt = {{ usage_prompt }}
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Training

| | |
|---|---|
{% for key, value in training_rows %}| {{ key }} | {{ value }} |
{% endfor %}

## Results

| metric | value |
|---|---|
{% for key, value in metric_rows %}| {{ key }} | {{ value }} |
{% endfor %}
"""


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and ":" not in name


def write_model_card(
    folder: Path,
    *,
    repo_id: str,
    base_model: str,
    datasets: list[str],
    method: str,
    dtype: str,
    license: str | None,
    tags: list[str],
    training_rows: list[tuple[str, Any]],
    metric_rows: list[tuple[str, Any]],
    usage_prompt: str,
) -> Path:
    """README.md with Hub metadata (base_model, datasets, tags, license) and the run's facts."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = (
        base_model if looks_like_hub_id(base_model) and not Path(base_model).exists() else None
    )
    data = ModelCardData(
        base_model=hub_base,
        datasets=[d for d in datasets if looks_like_hub_id(d) and not Path(d).exists()] or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["llm-finetune", "lora", method, "merged_16bit", *tags],
        model_name=repo_id.split("/")[-1],
    )
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        base_model_text=base_model,
        repo_id=repo_id,
        method=method.upper(),
        dtype=dtype,
        usage_prompt=repr(usage_prompt),
        training_rows=training_rows,
        metric_rows=metric_rows,
    )
    path = Path(folder) / "README.md"
    card.save(path)
    return path


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
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    exc = _unwrap(exc)
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status is None or status >= 500 or status in TRANSIENT_STATUSES:
            return None
        return _explain_http_error(exc, endpoint, repo_id)
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set: unset it to publish to {endpoint}")
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return None  # timeouts, refused or dropped connections, broken responses
    if isinstance(exc, OSError):
        return UserError(f"cannot read {str(folder)!r} while publishing it: {exc}")
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


def _publish(
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    kind: FolderKind,
    private: bool,
    revision: str,
    commit_message: str | None,
    replace_readme: bool,
    retry: RetryPolicy | None,
) -> PublishReport:
    folder = Path(folder)
    required = REQUIRED_FILE[kind]
    if not (folder / required).is_file():
        what = "a model folder" if kind == "model" else "a LoRA adapter folder"
        raise UserError(f"{str(folder)!r} is not {what} (no {required}): nothing to publish")
    if not token:
        raise UserError("no Hub token found: export HF_TOKEN=<token> or run `hf auth login`")
    files = local_files(folder)  # the manifest check: before anything is sent
    policy = retry or RetryPolicy()
    message = commit_message or f"Upload {folder.name} with llm-finetune"
    api = _api(endpoint, token)
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


def publish_folder(
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    private: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    replace_readme: bool = False,
    retry: RetryPolicy | None = None,
) -> PublishReport:
    """Publish a model folder (config.json, weights, tokenizer) as one verified commit.

    The folder's manifest, if any, is checked first; transient failures are retried per
    `retry`; an existing README.md at `revision` is kept unless `replace_readme`.
    """
    return _publish(
        folder,
        repo_id,
        endpoint,
        token,
        kind="model",
        private=private,
        revision=revision,
        commit_message=commit_message,
        replace_readme=replace_readme,
        retry=retry,
    )


def publish_adapter(
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    private: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    replace_readme: bool = False,
    retry: RetryPolicy | None = None,
) -> PublishReport:
    """Publish a LoRA adapter folder (adapter_config.json + weights) to its own repo.

    The same path as `publish_folder`: manifest check, one verified commit, retries.
    """
    return _publish(
        folder,
        repo_id,
        endpoint,
        token,
        kind="adapter",
        private=private,
        revision=revision,
        commit_message=commit_message,
        replace_readme=replace_readme,
        retry=retry,
    )
