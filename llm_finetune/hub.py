"""Hub access: endpoint, token, client settings, errors, and the checks made before training.

The token comes from `HF_TOKEN` or huggingface_hub's login cache (or, for the embedded local
server, from memory) and is passed to the client only: it is never printed, logged, written
to a file or put into an error message (messages are scrubbed of it as a last line of defence).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llm_finetune.errors import UserError, cause_in_chain, first_line

DEFAULT_ENDPOINT = "https://huggingface.co"
WRITE_ROLES = {"admin", "write", "contributor"}
ENDPOINT_HINT = "check --endpoint (publish.endpoint in a config) or HF_ENDPOINT"


@dataclass
class PublishTarget:
    """Where a run publishes, checked by the preflight before training."""

    repo_id: str
    endpoint: str
    token: str | None
    local_storage: Path | None = None
    server: Any = None  # the run's own local Hub server (publish.endpoint: local)


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


@dataclass
class PreflightReport:
    endpoint: str
    user: str
    repo_id: str
    repo_existed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_loopback(endpoint: str) -> bool:
    return urlparse(endpoint).hostname in {"127.0.0.1", "localhost", "::1"}


def resolve_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` stored; never a token from the config."""
    from huggingface_hub import get_token

    return get_token()


def require_token(token: str | None, *, alternative: str | None = None) -> str:
    """The token, or the error that says how to provide one (`alternative`: another way out)."""
    if not token:
        other = f" (or {alternative})" if alternative else ""
        raise UserError(
            f"no Hub token found: export HF_TOKEN=<token> or run `hf auth login`{other}"
        )
    return token


def hub_api(endpoint: str, token: str) -> Any:
    """An HfApi for `endpoint` that names this project in its user agent."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="llm-finetune")


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
def libraries_endpoint(endpoint: str) -> Iterator[None]:
    """Point huggingface_hub's and transformers' defaults at `endpoint` for one call.

    huggingface_hub reads HF_ENDPOINT once, at import (constants.ENDPOINT and the download URL
    template), and transformers keeps one HfApi made at first use; calls such as Unsloth's
    push_to_hub_merged or from_pretrained accept no endpoint. So these three are swapped for
    the duration of the call and restored afterwards (nothing to do for the same endpoint).
    """
    import transformers.utils.hub as tf_hub
    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    if endpoint == constants.ENDPOINT.rstrip("/"):
        yield
        return
    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, tf_hub._hf_api)
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    tf_hub._hf_api = None  # re-created by transformers with the endpoint above
    try:
        yield
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, tf_hub._hf_api = saved


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


def scrub_tokens(text: str) -> str:
    """The text with every token this process may hold replaced: HF_TOKEN (and its old name)
    and the token `hf auth login` stored. For text written where the token is not known, such
    as a bug's traceback."""
    tokens = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(Exception):  # a bug report must come out even if this fails
        tokens.append(resolve_token())
    for token in tokens:
        text = redact(text, token)
    return text


def connection_error(exc: BaseException) -> BaseException | None:
    """The transport failure (refused, unreachable, timed out, dropped) behind `exc`, which
    the client may have wrapped in its own exceptions; None when there is none."""
    import httpx

    transport = httpx.TransportError | ConnectionError | TimeoutError
    return cause_in_chain(exc, lambda e: isinstance(e, transport))


def unreachable(endpoint: str, exc: BaseException) -> UserError:
    """The one-line error for a server that cannot be reached or stopped answering."""
    import httpx

    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError):
        what = f"cannot reach the Hub at {endpoint}"
    else:
        what = f"the connection to the Hub at {endpoint} failed"
    return UserError(
        f"{what}: {type(exc).__name__}: {first_line(exc)[:200]}; {ENDPOINT_HINT} and the network"
    )


def not_an_api(endpoint: str, request: str) -> UserError:
    """The one-line error for an answer that is not a Hub's JSON (an HTML page: a proxy, a
    login portal, a web server that is not a Hub)."""
    return UserError(
        f"the server at {endpoint} did not answer {request} as a Hub does (an HTML page, or not "
        f"JSON): it is not a Hub API, or a proxy is in the way; {ENDPOINT_HINT}"
    )


def explain_http_error(exc: Exception, endpoint: str, repo_id: str) -> UserError:
    """The one-line error, with its fix, for an HTTP error the Hub answered about `repo_id`."""
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
    """Check everything publishing needs before any training: a bad token costs seconds.

    The token's user, its right to write to the namespace, and the repo (created if missing).
    """
    token = require_token(token)
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = hub_api(endpoint, token)
    request = "the token check (whoami)"
    with hub_client_settings(endpoint), client_timeout(RetryPolicy().timeout):
        try:
            whoami = api.whoami()
            if not isinstance(whoami, dict):
                raise not_an_api(endpoint, request)
            check_namespace(whoami, repo_id)
            request = f"the lookup of {repo_id!r}"
            existed = api.repo_exists(repo_id)
            if not existed:
                request = f"the creation of {repo_id!r}"
                api.create_repo(repo_id, private=private, exist_ok=True)
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if request.startswith("the token") and status == 404:
                raise UserError(
                    f"the server at {endpoint} has no Hub API (404 for {request}): {ENDPOINT_HINT}"
                ) from None
            raise explain_http_error(exc, endpoint, repo_id) from None
        except json.JSONDecodeError:
            raise not_an_api(endpoint, request) from None
        except OfflineModeIsEnabled:
            raise UserError(f"HF_HUB_OFFLINE is set: unset it to publish to {endpoint}") from None
        except Exception as exc:
            if (cause := connection_error(exc)) is None:
                raise
            raise unreachable(endpoint, cause) from None
    return PreflightReport(endpoint, whoami.get("name", "?"), repo_id, existed)


def download_card(
    repo_id: str, endpoint: str, token: str | None, revision: str, folder: Path
) -> Path | None:
    """The repo's README.md at `revision`, downloaded into `folder`; None when the repo,
    the revision or the file is not there (a first publish)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = hub_api(endpoint, require_token(token))
    with hub_client_settings(endpoint), client_timeout(RetryPolicy().timeout):
        try:
            return Path(
                api.hf_hub_download(
                    repo_id, "README.md", revision=revision, local_dir=folder, cache_dir=folder
                )
            )
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as exc:
            if (cause := connection_error(exc)) is not None:
                raise unreachable(endpoint, cause) from None
            if getattr(getattr(exc, "response", None), "status_code", None) is not None:
                raise explain_http_error(exc, endpoint, repo_id) from None
            raise
