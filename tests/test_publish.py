"""Publishing against the local Hub-compatible server with the real huggingface_hub client."""

from __future__ import annotations

import pytest

from llm_finetune.errors import UserError
from llm_finetune.publish import (
    hub_client_settings,
    preflight,
    publish_folder,
    write_model_card,
)
from tests.conftest import GOOD_TOKEN, READ_TOKEN


def test_preflight_rejects_a_bad_token_without_showing_it(hub):
    bad = "hf_this_token_is_wrong_123456"
    with pytest.raises(UserError, match="401") as caught:
        preflight("alice/model", hub.url, bad, private=False)
    assert bad not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_preflight_needs_a_token(hub):
    with pytest.raises(UserError, match="no Hub token"):
        preflight("alice/model", hub.url, None, private=False)


def test_preflight_checks_the_namespace(hub):
    with pytest.raises(UserError, match="not a member of 'someone-else'"):
        preflight("someone-else/model", hub.url, GOOD_TOKEN, private=False)
    with pytest.raises(UserError, match="read-only"):
        preflight("bob/model", hub.url, READ_TOKEN, private=False)


def test_preflight_creates_the_repo_or_finds_it(hub):
    first = preflight("team/model", hub.url, GOOD_TOKEN, private=True)
    assert (first.user, first.repo_existed) == ("alice", False)
    assert preflight("team/model", hub.url, GOOD_TOKEN, private=True).repo_existed


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

    from llm_finetune.merge import merge

    _, base, adapter, _ = trained_adapter
    folder = tmp_path / "merged"
    merge(base, adapter, folder)
    _card(folder)
    report = publish_folder(folder, "alice/tiny-merged", hub.url, GOOD_TOKEN, revision="main")

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


def test_publish_to_a_branch(hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    report = publish_folder(
        folder, "alice/branchy", hub.url, GOOD_TOKEN, revision="v1", commit_message="first cut"
    )
    assert report.revision == "v1" and report.url.endswith("/alice/branchy/tree/v1")


def test_publish_refuses_a_folder_without_a_model(hub, tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        publish_folder(tmp_path, "alice/empty", hub.url, GOOD_TOKEN)
