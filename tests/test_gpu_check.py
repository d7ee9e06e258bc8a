"""scripts/gpu_check.py's CPU dry run: the GPU check must not break where CI cannot see it.

A GPU machine is lent rarely and briefly; a renamed summary key or config override found
there would waste the loan. This runs the same flow on the CPU (--tiny) and reads its report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_its_flow_on_the_cpu_and_reports_each_backend(tmp_path):
    report_to = tmp_path / "out"
    report_to.mkdir()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py"), "--tiny"]
        + ["--work", str(tmp_path / "work"), "--report-to", str(report_to)]
        + ["--backends", "hf,hf-moe,unsloth-4bit,hf-fsdp", "--budget", "600"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 4-bit needs CUDA
    assert sorted(p.name for p in report_to.iterdir()) == [
        "gpu-check.json",
        "hf-fsdp.log",
        "hf-moe.log",
        "hf.log",
        "unsloth-4bit.log",
    ]
    report = json.loads((report_to / "gpu-check.json").read_text())
    hf = report["hf"]
    assert hf["ok"] and hf["engine"] == "single" and not hf["load_in_4bit"]
    assert hf["tokens_per_second"] > 0 and hf["tokens_seen"] > 0
    assert hf["merge_code_path"] == "llm-finetune streaming merge"
    assert hf["verify_max_abs_logit_diff"] <= hf["verify_tolerance"]
    assert hf["generations_agree"] == "1/1" and hf["published_files"] > 0
    assert isinstance(hf["load_back"], str)
    moe = report["hf-moe"]
    assert moe["ok"] and moe["lora_on"]["experts"] == ["down_proj", "gate_up_proj"]
    assert moe["verify_max_abs_logit_diff"] <= moe["verify_tolerance"]
    assert moe["verify_routing_agreement"] >= 0.75 and hf["verify_routing_agreement"] is None
    # The variants reach the pipeline with their overrides: 4-bit is refused without CUDA,
    # FSDP (accelerate launch) too, each with our one-line error.
    assert report["unsloth-4bit"] == {
        "backend": "unsloth-4bit",
        "ok": False,
        "error": "error: model.load_in_4bit needs a CUDA GPU; set it to false on this machine",
    }
    assert not report["hf-fsdp"]["ok"]
    assert report["hf-fsdp"]["error"].startswith("error: ") and "FSDP" in report["hf-fsdp"]["error"]
