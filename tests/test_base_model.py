"""The base model is one thing during a run: a Hub base is pinned to the commit it had at the
preflight, and training, merge, verification and reuse all use that commit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GOOD_TOKEN, tiny_config


@contextlib.contextmanager
def libraries_pointed_at(hub_url: str, cache: Path) -> Iterator[None]:
    """huggingface_hub and transformers in this process talk to `hub_url`, with a private
    cache (HF_ENDPOINT is read once, at import, so the constants are swapped instead)."""
    from huggingface_hub import constants

    from llm_finetune.hub import hub_client_settings, libraries_endpoint

    with pytest.MonkeyPatch.context() as patch, hub_client_settings(hub_url):
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        with libraries_endpoint(hub_url):
            yield


def publish_base(folder: Path, repo_id: str, hub_url: str) -> str:
    """Upload a model folder to the local Hub; the commit sha."""
    from llm_finetune.publish import publish

    return publish(folder, repo_id, hub_url, GOOD_TOKEN).commit


def shifted_copy(base: Path, to: Path) -> Path:
    """The base with every weight moved by 0.5: what a new upstream commit could bring."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, to, ignore=shutil.ignore_patterns("llm-finetune-manifest.json"))
    weights = load_file(to / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, to / "model.safetensors", {"format": "pt"})
    return to


def test_a_hub_base_is_pinned_to_the_commit_its_revision_names_now(hub, tiny_base, tmp_path):
    from llm_finetune.base_model import resolve_base
    from llm_finetune.config import ModelConfig

    first = publish_base(Path(tiny_base), "alice/pin", hub.url)
    second = publish_base(shifted_copy(Path(tiny_base), tmp_path / "b"), "alice/pin", hub.url)
    with libraries_pointed_at(hub.url, tmp_path / "cache"):
        latest = resolve_base(ModelConfig(name="alice/pin"))
        assert (latest.name, latest.path, latest.revision) == ("alice/pin", "alice/pin", second)
        assert resolve_base(ModelConfig(name="alice/pin", revision=first)).revision == first

        from huggingface_hub import constants

        with pytest.MonkeyPatch.context() as patch:  # offline: the commit the cache holds
            patch.setattr(constants, "HF_HUB_OFFLINE", True)
            assert resolve_base(ModelConfig(name="alice/pin")).revision == second


def test_a_folder_base_has_no_revision(tiny_base):
    from llm_finetune.base_model import resolve_base
    from llm_finetune.config import ModelConfig

    base = resolve_base(ModelConfig(name=tiny_base))
    assert (base.path, base.revision, base.on_hub) == (tiny_base, None, False)


def test_a_missing_hub_base_is_one_line(hub, tmp_path):
    from llm_finetune.base_model import resolve_base
    from llm_finetune.config import ModelConfig
    from llm_finetune.errors import UserError

    with (
        libraries_pointed_at(hub.url, tmp_path / "cache"),
        pytest.raises(UserError, match=r"^model.name 'alice/none': cannot load its config: "),
    ):
        resolve_base(ModelConfig(name="alice/none"))


@pytest.mark.slow
def test_a_new_commit_to_the_base_between_training_and_merge_changes_nothing(
    hub, tiny_base, tmp_path, monkeypatch
):
    """The base repo gets a commit right after training: the merge, its check and the
    manifests still use the trained commit, and the merged weights equal a merge into it."""
    from safetensors.torch import load_file

    from llm_finetune import pipeline
    from llm_finetune.manifest import read_manifest
    from llm_finetune.merge import merge

    trained_on = publish_base(Path(tiny_base), "alice/moving", hub.url)
    moved = shifted_copy(Path(tiny_base), tmp_path / "moved")
    train_stage = pipeline.train_stage

    def train_then_move_the_base(*args, **kwargs):
        trained = train_stage(*args, **kwargs)
        publish_base(moved, "alice/moving", hub.url)
        return trained

    monkeypatch.setattr(pipeline, "train_stage", train_then_move_the_base)
    config = tiny_config(
        tmp_path,
        model={"name": "alice/moving", "max_seq_length": 128},
        training={"learning_rate": 5e-3, "max_steps": 10, "per_device_train_batch_size": 16},
    )
    with libraries_pointed_at(hub.url, tmp_path / "cache"):
        summary = pipeline.run(config)
    out = config.output_path
    assert summary["status"] == "succeeded"
    assert summary["base"] == {
        "name": "alice/moving",
        "path": "alice/moving",
        "revision": trained_on,
    }
    assert hub_head(hub.url, "alice/moving", tmp_path) != trained_on
    for folder in ("adapter", "merged"):
        assert read_manifest(out / folder)["base"]["revision"] == trained_on

    expected = merge(tiny_base, out / "adapter", tmp_path / "expected")
    got = load_file(out / "merged" / "model.safetensors")
    want = load_file(Path(expected.output) / "model.safetensors")
    assert got.keys() == want.keys()
    assert all((got[k] == want[k]).all() for k in got)
    assert summary["verify"]["passed"]


def hub_head(hub_url: str, repo_id: str, tmp_path: Path) -> str:
    from huggingface_hub import HfApi

    from llm_finetune.hub import hub_client_settings

    with hub_client_settings(hub_url):
        return HfApi(endpoint=hub_url).model_info(repo_id).sha


def test_a_rerun_after_the_base_moved_names_the_commit_to_pin(tmp_path):
    """A finished adapter of a base that has a new commit since: the re-run says which
    commit finishes it, instead of "a different config"."""
    from llm_finetune.base_model import BaseModel
    from llm_finetune.errors import UserError
    from llm_finetune.manifest import write_manifest
    from llm_finetune.resume import inspect_outputs, train_fingerprint

    config = tiny_config(tmp_path, model={"name": "alice/base", "max_seq_length": 128})
    adapter = config.output_path / "adapter"
    adapter.mkdir(parents=True)
    old, new = (
        BaseModel("alice/base", "alice/base", "a" * 40),
        BaseModel("alice/base", "alice/base", "b" * 40),
    )
    write_manifest(adapter, "adapter", train_fingerprint(config, old), base=old.as_dict())
    assert inspect_outputs(config, "publish", old).adapter is not None
    with pytest.raises(UserError, match=f"at commit {'a' * 40} .* set model.revision: {'a' * 40}"):
        inspect_outputs(config, "publish", new)
