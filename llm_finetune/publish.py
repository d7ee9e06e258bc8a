"""Publishing: preflight before training, a model card, one commit with the whole model.

The token comes from `HF_TOKEN` or huggingface_hub's login cache (or, for the embedded local
server, from memory) and is passed to the client only: it is never printed, logged, written
to a file or put into an error message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llm_finetune.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"
WRITE_ROLES = {"admin", "write", "contributor"}


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
    commit: str
    url: str
    files: list[str]

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
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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


def publish_folder(
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    private: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
) -> PublishReport:
    """Upload the whole folder in one commit, then check the server lists every file."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{str(folder)!r} is not a model folder (no config.json): nothing to publish"
        )
    if not token:
        raise UserError("no Hub token found: export HF_TOKEN=<token> or run `hf auth login`")
    from huggingface_hub.errors import HfHubHTTPError

    local_files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    api = _api(endpoint, token)
    with hub_client_settings(endpoint):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or f"Upload {folder.name} with llm-finetune",
            )
            remote_files = set(api.list_repo_files(repo_id, revision=commit.oid))
        except HfHubHTTPError as exc:
            raise _explain_http_error(exc, endpoint, repo_id) from None
        except OSError as exc:
            raise UserError(f"upload to {endpoint} failed: {exc}; re-run the publish") from None
    missing = [f for f in local_files if f not in remote_files]
    if missing:
        raise UserError(
            f"the Hub at {endpoint} does not list {missing} after the upload; re-run it"
        )
    return PublishReport(
        repo_id=repo_id,
        endpoint=endpoint,
        revision=revision,
        commit=commit.oid,
        url=f"{endpoint}/{repo_id}/tree/{revision}",
        files=local_files,
    )
