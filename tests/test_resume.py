"""Runs that survive faults: a re-run reuses finished stages of the same config, resumes
training from its last checkpoint after kill -9 or SIGTERM, and refuses to mix configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"
QUICK = ["publish.enabled=false", "overwrite=false", "training.max_steps=10"]


def command(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llm_finetune.cli",
        "run",
        str(DEMO),
        f"output_dir={out}",
        *QUICK,
        *overrides,
    ]


def run(out: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(out, *overrides),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def summary(out: Path) -> dict:
    return json.loads((out / "run-summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "out"
    done = run(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_a_rerun_reuses_the_finished_adapter_merge_and_check(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    merged_before = {p.name: p.read_bytes() for p in (out / "merged").iterdir()}
    # What is watched (trackers, eval interval) is not what was trained: still reused.
    done = run(out, "training.report_to=none", "training.eval_steps=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reusing the finished adapter and merged model" in done.stdout
    stages = summary(out)["stages"]
    assert "train" not in stages and "merge" not in stages and "verify" not in stages
    assert "heldout" not in stages  # base vs merged: measured once, recorded in the manifest
    assert summary(out)["heldout"] == summary(finished)["heldout"]
    assert summary(out)["train_loss_last"] == summary(finished)["train_loss_last"]
    assert {p.name: p.read_bytes() for p in (out / "merged").iterdir()} == merged_before


def test_a_changed_config_is_refused_not_mixed(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    done = run(out, "training.learning_rate=1e-3")
    assert done.returncode == 2
    assert "made from a different config" in done.stderr
    assert summary(out)["failed_stage"] == "preflight"


def test_a_changed_adapter_file_is_refused(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    done = run(out)
    assert done.returncode == 2
    assert "changed since it was written (adapter_model.safetensors)" in done.stderr


def test_kill_during_merge_leaves_no_model_and_a_rerun_completes(finished, tmp_path):
    """What kill -9 during the merge leaves: a hidden partial folder and no merged/."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "merged")
    partial = out / ".merged.partial-killed"
    shutil.copytree(finished / "merged", partial)
    (partial / "model.safetensors").write_bytes(b"half")
    pushing = out / ".unsloth-push" / "tmpabc"  # what a killed Unsloth push leaves
    pushing.mkdir(parents=True)
    (pushing / "model.safetensors").write_bytes(b"\0" * 1000)
    done = run(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reusing the finished adapter of this config" in done.stdout
    assert "merge" in summary(out)["stages"] and "train" not in summary(out)["stages"]
    # Removed in the preflight, before its disk check counts them as used.
    preflight = done.stdout.split("==> [")[1]
    assert preflight.startswith("preflight]")
    assert "removed what a killed run left (.merged.partial-killed, .unsloth-push:" in preflight
    assert not partial.exists() and not (out / ".unsloth-push").exists()
    assert (out / "merged" / "model.safetensors").stat().st_size > 1000


def _wait_for(path_glob: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not list(path_glob.parent.glob(path_glob.name)):
        assert process.poll() is None, "the run ended before reaching the point to interrupt"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, how):
    out = tmp_path / "out"
    args = ("training.max_steps=80", "training.save_steps=10")
    process = subprocess.Popen(
        command(out, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _wait_for(out / "checkpoints" / "checkpoint-20" / "trainer_state.json", process)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert process.returncode == 130
        assert "run the same command again to resume" in stderr
    assert not (out / "adapter").exists()
    done = run(out, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming training from checkpoint-" in done.stdout
    result = summary(out)["train"]
    assert result["steps"] == 80
    assert (out / "adapter" / "llm-finetune-manifest.json").is_file()
