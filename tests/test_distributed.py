"""Two processes with the gloo backend on the CPU: the same config, the same adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_finetune.safetensors_stream import read_header
from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "tiny-demo.yaml"
ARGS = ["training.max_steps=10", "publish.enabled=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter_layout(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    header = read_header(out / "adapter" / "adapter_model.safetensors")
    return {name: (info.dtype, info.shape) for name, info in header.tensors.items()}


@pytest.mark.slow
def test_two_processes_train_one_complete_adapter_and_merge_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "llm_finetune.cli",
            "run",
            str(DEMO),
            f"output_dir={tmp_path / 'two'}",
            *ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_finetune.cli",
            "run",
            str(DEMO),
            f"output_dir={tmp_path / 'one'}",
            *ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("==> [preflight]") == 1  # logs come from the main process only
    assert two.stdout.count("==> [merge]") == 1
    assert "2 processes: training in all" in two.stdout
    layout = _adapter_layout(tmp_path / "two")
    assert layout == _adapter_layout(tmp_path / "one")
    assert len(layout) == 2 * 4 * 7  # lora_A and lora_B of 7 modules in 4 layers
    assert all(len(shape) == 2 and min(shape) > 0 for _, shape in layout.values())
    summary = json.loads((tmp_path / "two" / "run-summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["verify"]["passed"]
    assert not (tmp_path / "two" / "checkpoints" / "final-adapter").exists()
