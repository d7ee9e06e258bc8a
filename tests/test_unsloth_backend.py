"""The unsloth backend, run for real on the tiny model where unsloth is installed.

Unsloth must be imported before transformers/peft/trl, and importing it patches them for the
whole process, so the Unsloth calls run in a child process, tests/unsloth_child.py (one, shared
by the tests below): load + LoRA with FastLanguageModel, the project's trl training,
save_pretrained_merged, push_to_hub_merged to a local Hub server started here, and Unsloth's
GPU save and push routes from its source. This process then checks the results with plain
transformers + peft only. `pytest.importorskip("unsloth")` is not used on purpose: it would
import unsloth into this process and patch trl/transformers for every later test.

Without a GPU this exercises Unsloth's CPU fallback (unsloth_zoo/cpu/...); the GPU code path
(unsloth/save.py) needs a CUDA machine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_finetune.errors import UserError
from tests.conftest import GOOD_TOKEN, REPO_ROOT, dpo_pairs, needs_unsloth, tiny_config

REPO_ID = "alice/tiny-unsloth"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # nothing listens: a push that ignores `endpoint` fails here
STEPS = 12


def test_module_imports_nothing_heavy():
    code = (
        "import sys, llm_finetune.backends.unsloth as u; "
        "heavy = ('torch', 'transformers', 'peft', 'trl', 'unsloth'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def test_float32_merge_is_refused_before_training(tmp_path):
    from llm_finetune.backends.unsloth import UnslothBackend

    config = tiny_config(tmp_path, merge={"dtype": "float32"})
    with pytest.raises(UserError, match="merged_16bit"):
        UnslothBackend.check_config(config)
    UnslothBackend.check_config(tiny_config(tmp_path))  # bfloat16: fine


@pytest.fixture(scope="module")
def unsloth_run(tiny_base, tmp_path_factory):
    """Run the Unsloth child once; yield (report, config, base, out dir, hub server)."""
    from llm_finetune.hub_server import HubServer, HubUser

    tmp = tmp_path_factory.mktemp("unsloth")
    # A base whose generation stops on another id than the tokenizer's EOS (like a Llama 3
    # base with an instruct tokenizer): the merged folder must stop on both.
    base = tmp / "base"
    shutil.copytree(tiny_base, base)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**settings, "eos_token_id": 3}))
    config = tiny_config(
        tmp,
        training={
            "learning_rate": 5e-3,
            "max_steps": STEPS,
            "per_device_train_batch_size": 16,
            "logging_steps": 3,
        },
    )
    out = config.output_path
    server = HubServer(tmp / "hub", users={GOOD_TOKEN: HubUser("alice")}).start()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # push_merged lifts it for a loopback endpoint only
        "HF_ENDPOINT": DEAD_ENDPOINT,
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("HF_HUB_DISABLE_XET", None)
    args = {
        "out": str(out),
        "base": str(base),
        "config": config.model_dump(mode="json"),
        "repo_id": REPO_ID,
        "token": GOOD_TOKEN,
        "endpoint": server.url,
    }
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "tests.unsloth_child", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("REPORT ")]
    assert child.returncode == 0 and lines, child.stderr[-4000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    report["child_seconds"] = time.perf_counter() - start
    report["stdout"] = child.stdout
    try:
        yield report, config, str(base), out, server
    finally:
        server.stop()


@needs_unsloth
def test_unsloth_prints_the_cpu_fallback_and_trains(unsloth_run):
    report, _, _, out, _ = unsloth_run
    import torch

    if not torch.cuda.is_available():
        assert "no GPU found, training on CPU" in report["stdout"]
    train = report["train"]
    assert train["steps"] == STEPS
    assert train["train_loss_last"] < train["train_loss_first"] * 0.7, train["losses"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }


@needs_unsloth
def test_save_merged_writes_16bit_model_and_keeps_the_trained_model(unsloth_run):
    report, _, _, out, _ = unsloth_run
    import torch

    facts = report["merge"]
    cpu = not torch.cuda.is_available()
    assert facts["code_path"] == ("unsloth_zoo.cpu.loader" if cpu else "unsloth.save")
    assert facts["stored_dtypes"] == ["bfloat16"], facts
    assert facts["from_original_16bit_base"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(facts["files"])
    assert not any(".partial-" in p.name for p in out.iterdir())  # staging renamed into place
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # Saved after for_inference (left padding), still written as trained; Unsloth alone: left.
    tokenizer_config = json.loads((out / "merged" / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "right"
    assert report["raw_padding_side"] == "left"
    # The in-memory model is still the trained PeftModel: generation is unchanged.
    assert report["model_type_after_save"] == "PeftModelForCausalLM"
    assert report["generation_after_save"] == report["generation_before_save"]
    assert "already exists" in report["second_save"]
    # Unsloth's CPU save already adds the tokenizer's EOS; the backend checks (eos_fixes).
    generation = json.loads((out / "merged" / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [2, 3] and facts["eos_fixes"] == []


@needs_unsloth
def test_unsloths_gpu_merge_verifies_and_gets_the_eos_fix(unsloth_run):
    """Unsloth's GPU merge (unsloth_zoo's merge_and_overwrite_lora, run on the CPU) through
    save_merged: 16-bit from the original base, equal to base+adapter, stopping on both EOS."""
    report, _, base, out, _ = unsloth_run
    from llm_finetune.verify import verify

    facts = report["gpu_merge"]
    assert facts["device"] == "gpu" and facts["code_path"] == "unsloth.save"
    # The model was loaded as a Hub id, which Unsloth's mapper would send to its own copy of
    # the base: the merge looked up the configured base on disk instead, then the id came back.
    assert report["gpu_merge_base_names"] == [base] and facts["base_folder"] == base
    assert report["name_after_save"] == "meta-llama/Llama-3.1-8B"
    assert facts["stored_dtypes"] == ["bfloat16"] and facts["from_original_16bit_base"]
    checked = verify(base, out / "adapter", out / "gpu-merged", ["Convert 21 to words."], 4)
    assert checked.passed and checked.adapter_effect_max_abs_logit_diff > checked.tolerance
    generation = json.loads((out / "gpu-merged" / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert sorted(eos if isinstance(eos, list) else [eos]) == [2, 3], facts["eos_fixes"]
    # The zoo writes model.safetensors 0600; the folder ends readable like any plain write.
    mask = os.umask(0)
    os.umask(mask)
    for path in [out / "gpu-merged", *(out / "gpu-merged").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o444 == 0o444 & ~mask, path


@needs_unsloth
def test_merged_equals_base_plus_adapter_under_plain_peft(unsloth_run):
    _, _, base, out, _ = unsloth_run
    from llm_finetune.verify import verify

    report = verify(
        base,
        out / "adapter",
        out / "merged",
        ["Write the number 47 in words.", "Convert 21 to words."],
        max_new_tokens=8,
    )
    assert report.passed and report.dtype == "bfloat16"
    assert report.max_abs_logit_diff <= report.tolerance
    assert report.adapter_effect_max_abs_logit_diff > 10 * report.tolerance


@needs_unsloth
def test_push_to_hub_merged_commits_model_then_tokenizer(unsloth_run):
    report, _, _, _, server = unsloth_run
    push = report["push"]
    assert push["endpoint"] == server.url
    titles = [c["title"] for c in push["commits"]]  # newest first
    assert titles == ["llm-finetune test push", "llm-finetune test push", "initial commit"]
    assert {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= set(push["files"])
    # endpoint=None uses HF_ENDPOINT as huggingface_hub read it at import: the dead port.
    assert DEAD_ENDPOINT in report["push_default_endpoint"]
    assert not server.unknown_routes


@needs_unsloth
def test_pushed_model_loads_with_plain_transformers(unsloth_run, tmp_path):
    report, _, _, out, server = unsloth_run
    import torch
    from huggingface_hub import hf_hub_download, snapshot_download
    from transformers import AutoModelForCausalLM

    from llm_finetune.hub import hub_client_settings
    from llm_finetune.loadback import load_back

    with hub_client_settings(server.url):
        folder = snapshot_download(REPO_ID, endpoint=server.url, cache_dir=tmp_path / "cache")
        card = Path(
            hf_hub_download(REPO_ID, "README.md", endpoint=server.url, cache_dir=tmp_path / "c")
        ).read_text()
    assert "automatically generated" in card  # transformers' generic card, not ours
    pushed = AutoModelForCausalLM.from_pretrained(folder)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert pushed.dtype == merged.dtype == torch.bfloat16
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        assert torch.equal(pushed(ids).logits, merged(ids).logits)
    # By repo id, in a fresh process with a fresh cache, as any user would.
    loaded = load_back(REPO_ID, "main", server.url, "Write the number 47 in words.")
    assert loaded["dtype"] == "torch.bfloat16" and isinstance(loaded["generation"], str)


@needs_unsloth
def test_push_merged_can_replace_the_generic_card(unsloth_run, tmp_path):
    report, _, _, _, server = unsloth_run
    from huggingface_hub import hf_hub_download

    from llm_finetune.hub import hub_client_settings

    push = report["push_with_card"]
    assert [c["title"] for c in push["commits"]][:3] == [
        "Model card",
        "Upload merged_16bit model",
        "Upload merged_16bit model",
    ]
    with hub_client_settings(server.url):
        card = hf_hub_download(
            REPO_ID + "-card", "README.md", endpoint=server.url, cache_dir=tmp_path
        )
    assert Path(card).read_text().endswith("# our card\n")


def _branch(server, repo_id: str, revision: str) -> tuple[list[str], list[str]]:
    """(commit titles, files) of a branch on the test server."""
    from huggingface_hub import HfApi

    from llm_finetune.hub import hub_client_settings

    api = HfApi(endpoint=server.url, token=GOOD_TOKEN)
    with hub_client_settings(server.url):
        titles = [c.title for c in api.list_repo_commits(repo_id, revision=revision)]
        return titles, sorted(api.list_repo_files(repo_id, revision=revision))


@needs_unsloth
def test_push_merged_commits_to_the_configured_branch_only(unsloth_run):
    report, _, _, _, server = unsloth_run
    titles, files = _branch(server, REPO_ID + "-branch", "dev")
    assert titles[0] == "to a branch" and "model.safetensors" in files
    assert report["push_to_branch"]["files"] == files
    assert not report["staging_left"]  # its temporary copy went beside the outputs, then away
    assert "model.safetensors" not in _branch(server, REPO_ID + "-branch", "main")[1]


@needs_unsloth
def test_unsloths_gpu_push_route_commits_once_to_our_endpoint_and_branch(unsloth_run):
    """Its source run against the local server: no card validated at huggingface.co, one
    commit of the finished folder, on our branch, under our message."""
    report, _, base, _, server = unsloth_run
    # Merged into a folder, then committed; the merge found the configured base on disk, not
    # the Hub id the model was loaded as (Unsloth's mapper would send that to its own copy).
    assert report["gpu_route_merges"] == [[False, base]]
    assert report["name_after_push"] == "meta-llama/Llama-3.1-8B"  # restored
    titles, files = _branch(server, REPO_ID + "-gpu", "dev")
    assert titles[0] == "the gpu route" and len(titles) == 2  # and the repo's first commit
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert "model.safetensors" not in _branch(server, REPO_ID + "-gpu", "main")[1]
    assert report["push_gpu_route"]["files"] == files


@needs_unsloth
def test_the_push_goes_through_unsloths_revision_route_on_gpus():
    """unsloth/save.py cannot be imported without triton (GPU machines only), so its source is
    read: with a revision, the GPU push is one commit of a finished folder under our message.
    Without one it would create the repo with a card validated at huggingface.co whatever the
    endpoint, and upload shard by shard to main. A new Unsloth that changes this fails here."""
    import importlib.util

    spec = importlib.util.find_spec("unsloth")
    source = (Path(spec.submodule_search_locations[0]) / "save.py").read_text()
    route = source[: source.index("return _push_merged_to_hub_revision(dict(locals()))")]
    assert "or revision is not None" in route[-400:]
    revision_route = source[source.index("def _push_merged_to_hub_revision(") :][:6000]
    assert '"push_to_hub": False' in revision_route and "api.create_commit(" in revision_route
    assert 'save_kwargs["commit_message"]' in revision_route
    assert 'revision = save_kwargs["revision"]' in revision_route


@needs_unsloth
def test_unsloth_alone_picks_the_16bit_dtype_from_the_cpu(unsloth_run):
    report = unsloth_run[0]
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU fallback's choice only")
    # Without the backend's override: bf16 only where the CPU computes bf16 natively.
    expected = "bfloat16" if report["cpu_bf16_native"] else "float16"
    assert report["raw_unsloth_dtype"] == expected


@needs_unsloth
@pytest.mark.slow
def test_the_pipeline_with_backend_unsloth_end_to_end(tmp_path):
    """`llm-finetune run ... backend=unsloth`: Unsloth's save_pretrained_merged and
    push_to_hub_merged for real (CPU fallback), then our card and a hash check of every file."""
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_finetune.cli",
            "run",
            str(REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"),
            "backend=unsloth",
            f"output_dir={out}",
            "training.max_steps=40",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # Unsloth writes its unsloth_compiled_cache/ into the working directory
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["backend"]["name"] == "unsloth"
    assert "CPU fallback" in summary["backend"]["reason"]
    assert summary["merge"]["code_path"] == "unsloth_zoo.cpu.loader"
    assert summary["merge"]["stored_dtypes"] == ["bfloat16"]
    assert summary["verify"]["passed"]
    assert "in a fresh process: stock transformers and peft" in done.stdout
    # Unsloth's push copy too, beside the exports the demo config asks for
    assert "disk: 2 copies of the merged model and the exports: about" in done.stdout
    assert not (out / ".unsloth-push").exists()  # that copy's folder, removed
    # for_inference and a generation after training, then the save from the same model.
    sample = summary["sample_after_training"]
    assert sample["prompt"] == "Write the number 47 in words." and sample["generation"].strip()
    assert "sample" in summary["stages"]
    pushed_titles = [c["title"] for c in summary["unsloth_push"]["commits"]]
    assert sum("by Unsloth" in title for title in pushed_titles) >= 1
    published = summary["published"]
    assert "README.md" in published["files"] and not published["readme_kept"]
    # Unsloth pushed the verified folder's bytes but for the tokenizer flags the merge pins
    # (`complete_tokenizer`): our last commit adds those, the card and the curves it shows.
    sent = set(published["files"]) - set(published["unchanged"])
    assert sent == {"README.md", "training-curves.png", "tokenizer_config.json"}
    assert summary["merge"]["tokenizer_from_base"] == ["add_bos_token=true", "add_eos_token=false"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["load_back"]["generation"].strip()


def test_dpo_gets_unsloths_patch_where_it_is_exported():
    from types import SimpleNamespace

    from llm_finetune.backends.unsloth import patch_dpo_trainer

    calls = []
    assert patch_dpo_trainer(SimpleNamespace(PatchDPOTrainer=lambda: calls.append(1)))
    assert calls == [1]
    assert not patch_dpo_trainer(SimpleNamespace())  # the CPU fallback exports none


@needs_unsloth
@pytest.mark.slow
def test_dpo_trains_on_the_unsloth_backend(tiny_base, tmp_path):
    """`llm-finetune train` with method dpo and backend unsloth: trl's DPOTrainer on a model
    from FastLanguageModel (CPU fallback here), the adapter saved, a sample generated."""
    data = dpo_pairs(tmp_path)
    config = tiny_config(
        tmp_path,
        backend="unsloth",
        method="dpo",
        data={"datasets": [{"path": str(data)}], "format": "dpo"},
        training={"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1},
    )
    settings = config.model_dump(mode="json")
    settings["model"]["name"] = str(tiny_base)
    config_file = tmp_path / "dpo.yaml"
    config_file.write_text(json.dumps(settings))  # JSON is YAML
    done = subprocess.run(
        [sys.executable, "-m", "llm_finetune.cli", "train", str(config_file)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((config.output_path / "run-summary.json").read_text())
    assert summary["status"] == "trained" and summary["backend"]["name"] == "unsloth"
    assert summary["train"]["steps"] == 4
    assert "generation" in summary["sample_after_training"]
    assert (config.output_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_gpu_box_without_compiler_or_python_headers_is_refused(monkeypatch, tmp_path):
    """Triton builds Unsloth's kernel launchers with them at the first step: say so first."""
    import sysconfig

    from llm_finetune.backends import unsloth

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(unsloth.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="need a C compiler and none was found"):
        unsloth.check_kernel_toolchain()
    monkeypatch.setattr(unsloth.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    with pytest.raises(UserError, match="need the Python headers .* apt-get install python3"):
        unsloth.check_kernel_toolchain()
    (tmp_path / "Python.h").write_text("")
    unsloth.check_kernel_toolchain()
