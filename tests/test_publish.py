"""Publishing against the local Hub-compatible server with the real huggingface_hub client."""

from __future__ import annotations

import pytest

from llm_finetune.card import write_model_card
from llm_finetune.errors import UserError
from llm_finetune.hub import hub_client_settings
from llm_finetune.publish import publish
from tests.conftest import GOOD_TOKEN


def _card(folder, **overrides):
    arguments = dict(
        repo_id="alice/tiny-merged",
        base_model="meta-llama/Llama-3.1-8B",
        datasets=["mlabonne/FineTome-Alpaca-100k", "/data/mine.jsonl"],
        method="sft",
        dtype="bfloat16",
        license="apache-2.0",
        tags=["demo"],
        training_rows=[("learning rate", 3e-4)],
        metric_rows=[("train loss (last logged)", 0.25)],
        usage_prompt="Write the number 47 in words.",
    )
    arguments.update(overrides)
    return write_model_card(folder, **arguments)


def test_publish_lands_every_file_in_one_commit_with_a_parseable_card(
    hub, trained_adapter, tmp_path
):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    from llm_finetune import __version__
    from llm_finetune.merge import merge

    _, base, adapter, _ = trained_adapter
    folder = tmp_path / "merged"
    merge(base, adapter, folder)
    _card(folder)
    report = publish(folder, "alice/tiny-merged", hub.url, GOOD_TOKEN, revision="main")

    assert set(report.files) >= {"README.md", "config.json", "model.safetensors", "tokenizer.json"}
    with hub_client_settings(hub.url):
        api = HfApi(endpoint=hub.url, token=GOOD_TOKEN)
        remote = set(api.list_repo_files("alice/tiny-merged"))
        commits = api.list_repo_commits("alice/tiny-merged")
        readme = hf_hub_download(
            "alice/tiny-merged", "README.md", endpoint=hub.url, cache_dir=tmp_path / "dl"
        )
    assert set(report.files) <= remote
    assert commits[0].commit_id == report.commit
    assert commits[0].title.startswith("Upload merged")
    card = ModelCard.load(readme)
    assert card.data.base_model == "meta-llama/Llama-3.1-8B"
    assert card.data.datasets == ["mlabonne/FineTome-Alpaca-100k"]
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert {"lora", "sft", "merged_16bit", "demo"} <= set(card.data.tags)
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-merged")' in card.text
    assert "| learning rate | 0.0003 |" in card.text
    assert GOOD_TOKEN not in card.content
    assert f"llm-finetune {__version__}, then merged" in card.text
    assert "](https://github.com/)" not in card.text


def test_publish_to_a_branch(hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    report = publish(
        folder, "alice/branchy", hub.url, GOOD_TOKEN, revision="v1", commit_message="first cut"
    )
    assert report.revision == "v1" and report.url.endswith("/alice/branchy/tree/v1")


def test_publish_refuses_a_folder_without_a_model(hub, tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        publish(tmp_path, "alice/empty", hub.url, GOOD_TOKEN)


# -- one verified commit: README, stale files, no-op re-runs, adapters, the manifest


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=GOOD_TOKEN)


def _remote_text(hub, repo_id: str, name: str) -> str:
    import httpx

    return httpx.get(f"{hub.url}/{repo_id}/resolve/main/{name}").text


def _small_model(folder, *, shards: int = 0, readme: str | None = "# ours\n"):
    """config.json plus one model.safetensors, or `shards` shards and their index."""
    import json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    if shards:
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        for i, name in enumerate(names):
            (folder / name).write_bytes(bytes([i]) * 4096)
        index = {"weight_map": {f"w{i}": name for i, name in enumerate(names)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (folder / "model.safetensors").write_bytes(b"\x07" * 4096)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def test_an_existing_readme_is_kept_unless_replace_readme(hub, tmp_path):
    folder = _small_model(tmp_path / "m")
    with hub_client_settings(hub.url):
        _api(hub).create_repo("alice/carded")
        _api(hub).upload_file(
            path_or_fileobj=b"# theirs\n", path_in_repo="README.md", repo_id="alice/carded"
        )
    kept = publish(folder, "alice/carded", hub.url, GOOD_TOKEN)
    assert kept.readme_kept and "README.md" not in kept.files
    assert _remote_text(hub, "alice/carded", "README.md") == "# theirs\n"

    replaced = publish(folder, "alice/carded", hub.url, GOOD_TOKEN, replace_readme=True)
    assert not replaced.readme_kept and "README.md" in replaced.files
    # Only the card changed: the rest was on the branch already, with the same content.
    assert replaced.unchanged == sorted(set(replaced.files) - {"README.md"})
    assert _remote_text(hub, "alice/carded", "README.md") == "# ours\n"
    again = publish(folder, "alice/carded", hub.url, GOOD_TOKEN)  # ours is there now
    assert not again.readme_kept and not again.committed


def test_republishing_replaces_stale_weights_in_the_same_commit(hub, tmp_path):
    """A sharded v2 over a single-file v1: the old model.safetensors would shadow the shards
    (transformers loads it first), so it goes in the same commit; other files stay."""
    publish(_small_model(tmp_path / "v1"), "alice/evolving", hub.url, GOOD_TOKEN)
    with hub_client_settings(hub.url):
        _api(hub).upload_file(
            path_or_fileobj=b"png", path_in_repo="images/plot.png", repo_id="alice/evolving"
        )
        before = len(_api(hub).list_repo_commits("alice/evolving"))
    report = publish(_small_model(tmp_path / "v2", shards=2), "alice/evolving", hub.url, GOOD_TOKEN)
    assert report.deleted == ["model.safetensors"] and report.committed
    with hub_client_settings(hub.url):
        remote = set(_api(hub).list_repo_files("alice/evolving"))
        assert len(_api(hub).list_repo_commits("alice/evolving")) == before + 1
    assert "model.safetensors" not in remote
    assert {"images/plot.png", "model-00002-of-00002.safetensors"} <= remote


def test_republishing_the_same_folder_makes_no_commit(hub, tmp_path):
    folder = _small_model(tmp_path / "m")
    first = publish(folder, "alice/same", hub.url, GOOD_TOKEN)
    second = publish(folder, "alice/same", hub.url, GOOD_TOKEN)
    assert first.committed and not second.committed and second.commit == first.commit
    assert first.unchanged == [] and second.unchanged == second.files


def test_the_manifest_is_checked_and_never_uploaded(hub, tmp_path):
    from llm_finetune.manifest import MANIFEST, write_manifest

    folder = _small_model(tmp_path / "m")
    write_manifest(folder, "merge", "inputs")
    report = publish(folder, "alice/manifested", hub.url, GOOD_TOKEN)
    with hub_client_settings(hub.url):
        remote = _api(hub).list_repo_files("alice/manifested")
    assert MANIFEST not in report.files and MANIFEST not in remote
    (folder / "extra.txt").write_text("added after the merge was verified")
    with pytest.raises(UserError, match="extra.txt"):
        publish(folder, "alice/manifested", hub.url, GOOD_TOKEN)


def test_publish_adapter_to_its_own_repo(hub, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01" * 8192)
    (adapter / "README.md").write_text("# adapter\n")
    report = publish(adapter, "alice/tiny-lora", hub.url, GOOD_TOKEN, kind="adapter")
    assert report.kind == "adapter"
    assert set(report.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert publish(adapter, "alice/tiny-lora", hub.url, GOOD_TOKEN).kind == "adapter"  # detected
    model = _small_model(tmp_path / "m")
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        publish(model, "alice/x", hub.url, GOOD_TOKEN, kind="adapter")
    with pytest.raises(UserError, match="not a model folder"):
        publish(adapter, "alice/x", hub.url, GOOD_TOKEN, kind="model")


def test_the_folder_kind_is_read_from_its_files(tmp_path):
    from llm_finetune.publish import folder_kind

    (tmp_path / "adapter_config.json").write_text("{}")
    assert folder_kind(tmp_path) == "adapter"
    (tmp_path / "config.json").write_text("{}")  # a model folder that also holds an adapter
    assert folder_kind(tmp_path) == "model"
    assert folder_kind(tmp_path / "empty") == "model"  # refused by publish: no config.json
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "m-Q4_K_M.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert folder_kind(gguf) == "gguf"


def test_remote_differences_names_every_mismatch(tmp_path):
    from huggingface_hub.hf_api import RepoFile

    from llm_finetune.publish import local_files, remote_differences

    folder = _small_model(tmp_path / "m", readme=None)
    (folder / "tokenizer.json").write_text("{}")
    files = {f.path: f for f in local_files(folder)}
    weights, config = files["model.safetensors"], files["config.json"]

    def lfs(path, size, sha):
        return RepoFile(
            path=path, size=size, oid="0" * 40, lfs={"size": size, "oid": sha, "pointerSize": 1}
        )

    good = {
        "model.safetensors": lfs("model.safetensors", weights.size, weights.sha256),
        "config.json": RepoFile(path="config.json", size=config.size, oid=config.git_oid()),
        "tokenizer.json": RepoFile(
            path="tokenizer.json", size=2, oid=files["tokenizer.json"].git_oid()
        ),
        "images/plot.png": RepoFile(path="images/plot.png", size=3, oid="1" * 40),
    }
    assert remote_differences(list(files.values()), good) == []
    bad = dict(good)
    bad["model.safetensors"] = lfs("model.safetensors", weights.size, "f" * 64)
    bad["config.json"] = RepoFile(path="config.json", size=config.size, oid="2" * 40)
    del bad["tokenizer.json"]
    bad["model-00001-of-00002.safetensors"] = lfs("model-00001-of-00002.safetensors", 1, "e" * 64)
    problems = remote_differences(list(files.values()), bad)
    assert len(problems) == 4
    assert any("model.safetensors has sha256 ffffffffffff" in p for p in problems)
    assert any("config.json has other content" in p for p in problems)
    assert any("tokenizer.json is missing" in p for p in problems)
    assert any(
        "model-00001-of-00002.safetensors is on the Hub but not in the folder" in p
        for p in problems
    )


def test_a_server_listing_other_content_fails_the_publish(hub, tmp_path, monkeypatch):
    """What the server lists after the commit is compared with the folder; a difference (here
    simulated: a truncated weights file) is an error naming the file and the re-run."""
    from huggingface_hub import HfApi

    original = HfApi.list_repo_tree

    def truncated(self, *args, **kwargs):
        for entry in original(self, *args, **kwargs):
            if entry.path == "model.safetensors":
                entry.size -= 1
            yield entry

    monkeypatch.setattr(HfApi, "list_repo_tree", truncated)
    with pytest.raises(UserError, match="model.safetensors has 4095 bytes, not 4096") as caught:
        publish(_small_model(tmp_path / "m"), "alice/liar", hub.url, GOOD_TOKEN)
    assert "llm-finetune publish --folder" in str(caught.value)


def test_rerun_command_is_exact_and_quoted(tmp_path):
    from llm_finetune.hub import DEFAULT_ENDPOINT
    from llm_finetune.publish import rerun_command

    folder = tmp_path / "my model"
    assert rerun_command(folder, "you/m", DEFAULT_ENDPOINT) == (
        f"llm-finetune publish --folder '{folder.resolve()}' --repo-id you/m"
    )
    assert rerun_command(folder, "you/m", "http://127.0.0.1:9", "v2", private=True).endswith(
        "--repo-id you/m --endpoint http://127.0.0.1:9 --revision v2 --private"
    )
