"""The base model of a run: where it is, at which commit, and how big its weights are.

A Hub base is resolved to its commit sha once, in the preflight, and every later stage
(tokenizer, training, merge, verification, reuse fingerprints, model card) loads that commit:
a repo that gets a new commit during a run cannot change what is merged or what the merge is
checked against.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError, first_line
from llm_finetune.fsutil import looks_like_local_path

if TYPE_CHECKING:
    from llm_finetune.config import ModelConfig

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class BaseModel:
    name: str  # as configured: a Hub id, a folder, or builtin:<name>
    path: str  # what the loaders get: a local folder, or the Hub id
    revision: str | None = None  # the Hub commit sha every stage loads; None for a folder

    @property
    def on_hub(self) -> bool:
        return self.revision is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_base(model: ModelConfig) -> BaseModel:
    """A local folder, a builtin model (built on first use), or a Hub id pinned to the commit
    `model.revision` (a branch, tag or sha; default main) points at now."""
    name = model.name
    if name.startswith("builtin:"):
        from llm_finetune.demo import resolve_builtin_model

        return BaseModel(name, str(resolve_builtin_model(name)))
    if looks_like_local_path(name):  # a folder, never looked up on the Hub
        from llm_finetune.inputs import check_model_folder

        check_model_folder(name, "model.name")
        return BaseModel(name, str(Path(name).expanduser()))
    sha = _pin_commit(name, model.revision)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=sha, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # e.g. an architecture this transformers does not know
        raise UserError(f"model.name {name!r}: cannot load its config: {first_line(exc)}") from None
    return BaseModel(name, name, sha)


def _pin_commit(name: str, revision: str | None) -> str:
    """The commit sha of `revision` of Hub repo `name`: its config.json is downloaded (or found
    in the cache when offline) into the snapshot folder named after that commit."""
    if revision and COMMIT_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import hf_hub_download

    try:
        config_file = Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as exc:  # gated, missing, offline and not cached: the reason, in one line
        raise UserError(f"model.name {name!r}: cannot load its config: {first_line(exc)}") from None
    sha = config_file.parent.name
    if not COMMIT_SHA.fullmatch(sha):
        raise UserError(
            f"model.name {name!r}: the Hub cache holds no commit for revision {revision!r}; "
            "set model.revision to a commit sha"
        )
    return sha


@dataclass(frozen=True)
class BaseWeights:
    """What the disk check counts (verification plans from the tensors' shapes instead)."""

    size: int  # bytes of the safetensors files
    to_download: int = 0  # bytes of them not in the Hub cache yet (a Hub id)


def base_weights(base: BaseModel) -> BaseWeights | None:
    """Size of the base's safetensors weights: on disk, or as the Hub lists them (None when
    unknown: offline, no access)."""
    if not base.on_hub:
        return BaseWeights(sum(p.stat().st_size for p in Path(base.path).glob("*.safetensors")))
    from huggingface_hub import HfApi, try_to_load_from_cache

    try:
        info = HfApi().model_info(base.path, revision=base.revision, files_metadata=True)
    except Exception:  # offline or no access: the merge checks again before writing
        return None
    shards = [s for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    size = sum(s.size or 0 for s in shards)
    to_download = sum(
        s.size or 0
        for s in shards
        if not isinstance(try_to_load_from_cache(base.path, s.rfilename, revision=info.sha), str)
    )
    return BaseWeights(size, to_download)
