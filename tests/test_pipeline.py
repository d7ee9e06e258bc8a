"""The real CLI end to end: the embedded demo, and failures that must cost no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GOOD_TOKEN, REPO_ROOT

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_finetune.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_demo_runs_end_to_end_offline(tmp_path):
    """The README's main command, on its default config, with HF_HUB_OFFLINE=1 set."""
    out = tmp_path / "out"
    done = cli("run", str(DEMO), f"output_dir={out}", cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert list(summary["stages"]) == [
        "preflight",
        "load_model",
        "data",
        "train",
        "merge",
        "verify",
        "heldout",
        "evaluate",
        "gate",
        "export",
        "model_card",
        "publish",
        "load_back",
        "load_back_gguf",
    ]
    assert summary["train_loss_last"] < 0.2 * summary["train_loss_first"]
    # Watched: TensorBoard's log, eval while training, the curves, base vs merged.
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    evals = [e["step"] for e in summary["train"]["history"] if "eval_loss" in e]
    assert evals == [50, 100, 150, 200]
    assert summary["eval_loss_best"] <= summary["eval_loss_last"] + 1e-6  # best is rounded
    assert summary["eval_loss_last"] < 0.5
    heldout = summary["heldout"]
    assert heldout["rows"] == 40 and not heldout["worse"]
    assert heldout["merged"]["loss"] < 0.2 * heldout["base"]["loss"]
    assert heldout["merged"]["loss"] == pytest.approx(summary["eval_loss_last"], rel=0.05)
    assert "held-out loss / perplexity (40 rows): base" in done.stdout
    # The demo's fine-tune works: its answers to the held-out prompts are right, the base's
    # are not; the gate checked both measurements before anything was published.
    evaluation = summary["evaluation"]
    assert (evaluation["metric"], evaluation["rows"]) == ("exact_match", 40)
    assert evaluation["base"]["score"] == 0.0 and evaluation["merged"]["score"] >= 0.95
    assert all(s["merged"] == s["expected"] for s in evaluation["samples"])
    assert summary["gate"]["passed"] and len(summary["gate"]["checks"]) == 2
    assert "exact match (40 held-out rows): base 0.0% -> merged" in done.stdout
    card = (out / "merged" / "README.md").read_text()
    assert "](training-curves.png)" in card and "## Before and after" in card
    # What LoRA landed on, worked out in the preflight: in the summary and the card.
    assert summary["lora_targets"]["touched"] == {
        "attention": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "MLP": ["down_proj", "gate_proj", "up_proj"],
    }
    assert "| LoRA lands on | 14 modules: attention k_proj, o_proj, q_proj, v_proj; MLP" in card
    assert (out / "merged" / "training-curves.png").read_bytes() == (
        out / "training-curves.png"
    ).read_bytes()
    listed = cli("runs", str(tmp_path), cwd=tmp_path)
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[1].split()[:5] == [
        "tiny-demo",
        "out",
        "succeeded",
        "-",
        "200",
    ]
    assert summary["verify_max_abs_logit_diff"] <= summary["verify"]["tolerance"]
    published = summary["published"]
    assert published["repo_id"] == "demo/tiny-llama-number-words"
    assert published["endpoint"].startswith("http://127.0.0.1:")
    assert len(published["commit"]) == 40
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "training-curves.png",
    } <= set(published["files"])
    assert summary["load_back"]["generation"].strip() == "forty-seven"
    # Every format the demo asks for was written, checked and passed; the GGUF files went to
    # their own repo, from which one was downloaded and run again in llama.cpp.
    exports = {row["format"]: row for row in summary["exports"]}
    assert list(exports) == ["merged_16bit", "lora", "q8_0", "q4_k_m"]
    assert all(row["passed"] for row in exports.values()), exports
    assert "Q4_K" in " ".join(exports["q4_k_m"]["notes"])  # K-quants really applied
    gguf = summary["published_exports"]["gguf"]
    assert gguf["repo_id"] == "demo/tiny-llama-number-words-GGUF"
    assert {"tiny-demo-Q8_0.gguf", "tiny-demo-Q4_K_M.gguf", "Modelfile", "template"} <= set(
        gguf["files"]
    )
    assert summary["load_back_gguf"]["file"] == "tiny-demo-Q4_K_M.gguf"
    assert summary["load_back_gguf"]["generation"].strip() == "forty-seven"
    # Each format's own greedy answers to the check rows: the GGUF files answer as the
    # 16-bit model does.
    for row in exports.values():
        measured = row["measured"]
        assert measured["answers_right"] >= measured["answers_expected"] - 1 == 31, row
    assert "GGUF Q4_K_M" in done.stdout and "KL vs 16-bit" in done.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "stage" in done.stdout and "total" in done.stdout
    # The generated in-memory token of the local server is written nowhere.
    assert "hf_local_" not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert b"hf_local_" not in path.read_bytes(), path


def test_bad_token_fails_in_preflight_before_training(hub, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "run",
        str(DEMO),
        f"output_dir={out}",
        f"publish.endpoint={hub.url}",
        "publish.repo_id=alice/demo",
        cwd=tmp_path,
        HF_TOKEN="hf_wrong_token_987654321",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    assert errors[0].startswith("error: the Hub token was rejected")
    assert "hf_wrong_token_987654321" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "preflight")
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_good_token_publishes_model_and_adapter_to_a_remote_endpoint(hub, tmp_path):
    """The same path with a valid token: trains (briefly), publishes both repos."""
    out = tmp_path / "out"
    done = cli(
        "run",
        str(DEMO),
        f"output_dir={out}",
        f"publish.endpoint={hub.url}",
        "publish.repo_id=alice/demo",
        "publish.adapter_repo_id=team/demo-adapter",
        "training.max_steps=5",
        "publish.load_back=false",
        cwd=tmp_path,
        HF_TOKEN=GOOD_TOKEN,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["published"]["repo_id"] == "alice/demo"
    assert summary["published"]["endpoint"] == hub.url
    assert "llm-finetune-manifest.json" not in summary["published"]["files"]
    adapter = summary["published_adapter"]
    assert adapter["repo_id"] == "team/demo-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter["files"])
    assert GOOD_TOKEN not in done.stdout + done.stderr
    assert GOOD_TOKEN not in (out / "run-summary.json").read_text()
    # The curves and the before/after table are published (hashes checked on the server)
    # with the card that shows them.
    assert {"README.md", "training-curves.png"} <= set(summary["published"]["files"])
    card = (out / "merged" / "README.md").read_text()
    assert "![Train and eval loss against step, and the learning rate](training-curves.png)" in card
    assert "| held-out loss |" in card and summary["heldout"]["rows"] == 40


def test_existing_outputs_are_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    done = cli("run", str(DEMO), f"output_dir={out}", "overwrite=false", cwd=tmp_path)
    assert done.returncode == 2
    assert "already exists without a llm-finetune-manifest.json" in done.stderr
    assert "overwrite: true" in done.stderr
    assert list((out / "adapter").iterdir()) == []


def test_train_command_stops_after_the_adapter(tmp_path):
    out = tmp_path / "out"
    done = cli(
        "train",
        str(DEMO),
        f"output_dir={out}",
        "training.max_steps=5",
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "merged").exists()
    assert json.loads((out / "run-summary.json").read_text())["status"] == "trained"


def test_too_little_disk_fails_in_preflight(tmp_path, monkeypatch):
    """Checked before training: the numbers are in the message and nothing is trained. The
    need is the 16-bit merge (the base's size again) and the exports the demo asks for."""
    import shutil as shutil_module

    from llm_finetune.config import load_config
    from llm_finetune.demo import resolve_builtin_model
    from llm_finetune.errors import UserError
    from llm_finetune.exports.stage import export_disk_need
    from llm_finetune.pipeline import run

    monkeypatch.setattr(
        shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10, 10, 1000)
    )
    out = tmp_path / "out"
    config = load_config(DEMO, [f"output_dir={out}", "publish.enabled=false"])
    base = resolve_builtin_model(config.model.name)
    merged = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert config.export.formats  # else the message would name only the merged model
    need = merged + export_disk_need(tuple(config.export.formats), merged)
    pattern = (
        rf"not enough disk for the merged model and the exports .* it needs {need / 1e9:.2f} GB"
    )
    with pytest.raises(UserError, match=pattern + r", 0\.00 GB are free"):
        run(config)
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "preflight")
    assert not (out / "adapter").exists()


def test_too_little_memory_to_verify_fails_in_preflight(tmp_path, monkeypatch, capsys):
    """Verification holds the models in float32, whole or one layer at a time: the preflight
    says which, and a machine (or a verify.max_memory) that cannot hold even one layer is
    refused before training, in one line with the numbers, rather than hours later."""
    from llm_finetune import verify_memory
    from llm_finetune.config import load_config
    from llm_finetune.demo import resolve_builtin_model
    from llm_finetune.errors import UserError
    from llm_finetune.pipeline import run

    out = tmp_path / "out"
    monkeypatch.setattr(verify_memory, "available_memory", lambda: ([], 1_000_000))
    config = load_config(DEMO, [f"output_dir={out}", "publish.enabled=false"])
    pattern = r"verification needs at least \d+.\d MB \(one layer .* 0 GB of free RAM: .*"
    with pytest.raises(UserError, match=pattern + "verify.enabled: false"):
        run(config)
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "preflight")
    assert not (out / "adapter").exists()
    # Without verification there is nothing to hold: the same machine may train and merge.
    config = load_config(
        DEMO, [f"output_dir={out}", "publish.enabled=false", "verify.enabled=false"]
    )
    monkeypatch.setattr("llm_finetune.pipeline.train_stage", _stop_after_preflight)
    with pytest.raises(_PreflightPassed):
        run(config)
    # More than a layer, less than the whole model: one layer at a time.
    config = load_config(DEMO, [f"output_dir={out}", "publish.enabled=false"])
    shapes = verify_memory.folder_shapes(resolve_builtin_model(config.model.name))
    lora = verify_memory.lora_parameters(shapes, config.lora.r, config.lora.target_modules)
    layout = verify_memory.layout_of(shapes, lora)
    between = (
        verify_memory.bounded_memory_needed(layout) + verify_memory.memory_needed(layout)
    ) // 2
    monkeypatch.setattr(verify_memory, "available_memory", lambda: ([], between))
    with pytest.raises(_PreflightPassed):
        run(config)
    assert "verification will hold bounded, one layer at a time" in capsys.readouterr().out
    # A cap under one layer: refused, whatever the machine has.
    monkeypatch.setattr(verify_memory, "available_memory", lambda: ([], 10**12))
    config = load_config(DEMO, [f"output_dir={out}", "verify.max_memory=1MB"])
    one_layer = r"verify.max_memory 1MB is smaller than one layer of the model \(\d+.\d MB: "
    with pytest.raises(UserError, match=one_layer + ".*: raise it to at least that"):
        run(config)
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "preflight")


class _PreflightPassed(Exception):
    pass


def _stop_after_preflight(*args, **kwargs):
    raise _PreflightPassed


def test_the_base_weights_of_a_folder_are_its_safetensors_files(tiny_base):
    from llm_finetune.base_model import BaseModel, BaseWeights, base_weights

    weights = base_weights(BaseModel(tiny_base, tiny_base))
    assert weights == BaseWeights((Path(tiny_base) / "model.safetensors").stat().st_size, 0)


def test_a_hub_base_not_in_the_cache_counts_its_download_in_the_disk_check(
    hub, tiny_base, tmp_path, monkeypatch
):
    """A box whose disk holds the merged model but not also the base's download would fail
    after training: refused before, with the numbers; once cached, the download is not counted."""
    import shutil as shutil_module

    from huggingface_hub import constants, hf_hub_download

    from llm_finetune import fsutil, preflight
    from llm_finetune.base_model import BaseModel, BaseWeights, base_weights
    from llm_finetune.errors import UserError
    from llm_finetune.hub import hub_client_settings
    from llm_finetune.publish import publish

    def weights_on_the_hub() -> BaseWeights | None:
        with monkeypatch.context() as hub_default, hub_client_settings(hub.url):
            hub_default.setattr(constants, "ENDPOINT", hub.url)  # HfApi()'s default endpoint
            return base_weights(BaseModel("alice/base", "alice/base", commit))

    commit = publish(Path(tiny_base), "alice/base", hub.url, GOOD_TOKEN).commit
    (tmp_path / "hub-cache").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    size = (Path(tiny_base) / "model.safetensors").stat().st_size
    weights = weights_on_the_hub()
    assert (weights.size, weights.to_download) == (size, size)
    out = tmp_path / "out"
    message = preflight.check_disk(weights, out, "bfloat16")
    assert message.startswith("disk: the merged model and the base's download: about")

    free = {"out": int(size * 1.5), "cache": int(size * 1.5)}  # one model fits, not two
    monkeypatch.setattr(
        shutil_module,
        "disk_usage",
        lambda path: shutil_module._ntuple_diskusage(0, 0, free[_disk(path, tmp_path)]),
    )
    with pytest.raises(UserError, match="not enough disk for the merged model and the base's"):
        preflight.check_disk(weights, out, "bfloat16")
    monkeypatch.setattr(fsutil, "same_disk", lambda a, b: False)  # a cache on its own disk
    preflight.check_disk(weights, out, "bfloat16")
    free["cache"] = size // 2
    with pytest.raises(UserError, match="not enough disk for the base's download into the Hub"):
        preflight.check_disk(weights, out, "bfloat16")

    with hub_client_settings(hub.url):
        hf_hub_download("alice/base", "model.safetensors", endpoint=hub.url)
    cached = weights_on_the_hub()
    assert (cached.size, cached.to_download) == (size, 0)
    assert preflight.check_disk(cached, out, "bfloat16").startswith("disk: the merged model: about")


def _disk(path: str, tmp_path: Path) -> str:
    return "cache" if str(path).startswith(str(tmp_path / "hub-cache")) else "out"


def test_a_failed_sample_after_training_is_a_warning_not_a_lost_run(tmp_path):
    """The look at the trained model must not stop a run whose adapter is saved: verification
    judges the merged model."""
    from types import SimpleNamespace

    from llm_finetune import pipeline
    from tests.conftest import tiny_config

    def sample(*args):
        raise RuntimeError("CUDA error: device-side assert triggered\nmore")

    clock = pipeline.StageClock()
    backend = SimpleNamespace(sample=sample)
    sampled = pipeline.sample_stage(tiny_config(tmp_path), clock, backend, None, None)
    assert sampled["error"] == "CUDA error: device-side assert triggered"
    assert "sample" in clock.seconds
