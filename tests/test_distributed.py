"""Several processes: which engine a launch asks for, the refusals, where each process loads
the base, the wait for the main process; and two real processes with gloo on the CPU."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llm_finetune import distributed
from llm_finetune.backends import choose_backend
from llm_finetune.backends.hf import training_device_map
from llm_finetune.errors import UserError
from llm_finetune.safetensors_stream import read_header
from tests.conftest import GOOD_TOKEN, REPO_ROOT, needs_unsloth

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"
ARGS = ["training.max_steps=10", "publish.enabled=false"]
LAUNCH_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
)


@pytest.fixture
def launch(monkeypatch):
    """Set the environment `accelerate launch` gives a process: launch(world_size, **env)."""

    def set_env(world_size: int = 8, **env: str) -> None:
        for name in LAUNCH_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_env


FSDP = {"ACCELERATE_USE_FSDP": "true"}
ZERO3 = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
}
ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}


def test_the_engine_comes_from_the_launch_environment(launch):
    launch(1)
    assert distributed.requested_engine() == "single"
    assert distributed.check_launch(cuda=True) is None
    launch(1, **FSDP)  # FSDP in one process (CPU offload, or the GPU check) is FSDP too
    assert distributed.requested_engine() == "fsdp"
    assert distributed.check_launch(cuda=True) == "1 process (FSDP)"
    launch(8)
    assert distributed.requested_engine() == "ddp"
    assert distributed.check_launch(cuda=False).startswith("8 processes (DDP)")
    launch(8, **FSDP)
    assert distributed.requested_engine() == "fsdp"
    assert distributed.check_launch(cuda=True).startswith("8 processes (FSDP)")
    launch(8, **ZERO3)
    assert distributed.requested_engine() == "deepspeed"


@pytest.mark.parametrize("env", [FSDP, ZERO3], ids=["fsdp", "zero3"])
def test_sharding_engines_are_refused_without_cuda(launch, env):
    """accelerate would run these configs as plain DDP on CPUs, without saying so."""
    launch(2, **env)
    with pytest.raises(UserError, match=r"needs CUDA GPUs.*configs/accelerate/ddp\.yaml"):
        distributed.check_launch(cuda=False)


def test_zero3_without_a_16bit_gather_on_save_is_refused(launch, tmp_path):
    launch(8, **{**ZERO3, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"})
    with pytest.raises(UserError, match="empty adapter.*zero3_save_16bit_model: true"):
        distributed.check_launch(cuda=True)
    # the same, from a DeepSpeed JSON file named in the accelerate config
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    launch(8, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ds_json))
    with pytest.raises(UserError, match="empty adapter"):
        distributed.check_launch(cuda=True)
    zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    assert "DeepSpeed" in distributed.check_launch(cuda=True)


def test_each_process_loads_the_base_onto_its_own_gpu(launch):
    launch(1)
    assert training_device_map(cuda=False) is None
    assert training_device_map(cuda=True) == {"": 0}
    launch(8, LOCAL_RANK="3")  # DDP: GPU 3 of this node, not cuda:0 for every process
    assert training_device_map(cuda=True) == {"": 3}
    launch(8, LOCAL_RANK="3", **ZERO2)  # ZeRO-2 keeps whole weights in every process
    assert training_device_map(cuda=True) == {"": 3}
    for env in (FSDP, ZERO3):  # these place and shard the weights themselves
        launch(8, LOCAL_RANK="3", **env)
        assert training_device_map(cuda=True) is None


@needs_unsloth
def test_unsloth_runs_across_processes_with_ddp_only(launch, monkeypatch):
    monkeypatch.setattr("llm_finetune.backends._cuda_available", lambda: True)
    launch(4)
    assert choose_backend("unsloth").name == "unsloth"
    assert choose_backend("hf").name == "hf"
    for env, engine in ((FSDP, "fsdp"), (ZERO3, "deepspeed")):
        launch(4, **env)
        with pytest.raises(UserError, match=f"DDP only here, not {engine}.*ddp.yaml"):
            choose_backend("unsloth")
        auto = choose_backend("auto")
        assert auto.name == "hf" and engine in auto.reason


@needs_unsloth
def test_an_unsloth_without_ddp_support_is_refused_for_several_processes(launch, monkeypatch):
    from llm_finetune import backends

    assert backends._unsloth_supports_ddp()  # the pinned release (2026.10) has it
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(backends, "_unsloth_supports_ddp", lambda: False)
    launch(2)
    with pytest.raises(UserError, match="installed unsloth trains on one GPU only"):
        choose_backend("unsloth")
    assert (
        choose_backend("auto").reason == "backend: auto picked hf: the installed unsloth has no DDP"
    )
    launch(1)
    assert choose_backend("unsloth").name == "unsloth"  # one process: fine


def test_processes_that_would_resume_from_different_checkpoints_are_refused(launch, monkeypatch):
    """Nodes with their own output_dir: one sees checkpoint-200, another nothing."""
    launch(3)
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)

    def gather(seen, mine, where=("checkpoint-200", "checkpoint-200", None)):
        seen[:] = where

    monkeypatch.setattr("torch.distributed.all_gather_object", gather)
    message = r"different trainer checkpoints \(process 0: checkpoint-200, .* process 2: none\)"
    with pytest.raises(UserError, match=message + ": put output_dir on storage every node"):
        distributed.check_same_resume_point("/out/checkpoints/checkpoint-200")
    monkeypatch.setattr(
        "torch.distributed.all_gather_object",
        lambda seen, mine: seen.__setitem__(slice(None), [mine] * 3),
    )
    distributed.check_same_resume_point("/out/checkpoints/checkpoint-200")  # all agree


class _Trainer:
    is_fsdp_enabled = False
    is_deepspeed_enabled = False


def test_a_trainer_that_fell_back_to_ddp_is_refused_before_training(launch):
    launch(2)
    distributed.check_trainer_engine(_Trainer())  # asked for DDP, got DDP
    launch(2, **FSDP)
    with pytest.raises(UserError, match="asked for fsdp but the trainer set up ddp"):
        distributed.check_trainer_engine(_Trainer())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def waiting(launch, monkeypatch):
    """Process 1 of 2 waiting in a thread for the main one; the store the launcher would host.
    Yields (stores: the list holding it, the thread, the exit codes the thread got)."""
    from torch.distributed import TCPStore

    port = _free_port()
    stores = [TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)]
    launch(2, RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(distributed.wait_for_main(0.1)))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # nothing announced yet
    yield stores, thread, codes
    stores.clear()


def test_the_other_processes_wait_for_the_main_ones_exit_code(waiting, monkeypatch):
    _, thread, codes = waiting
    distributed.announce_outcome(2, acknowledgement_s=10)  # returns once the other has read it
    thread.join(5)
    assert codes == [2]
    # A re-run that reused the adapter trains nowhere: no process group, nothing to wait for.
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    assert distributed.wait_for_main(0.1) == 0


def test_a_main_process_that_vanished_counts_as_failed(waiting):
    stores, thread, codes = waiting
    stores.clear()  # the store lived in the main process
    thread.join(10)
    assert codes == [1]


def test_a_failing_process_beside_the_main_one_exits_only_after_it(launch):
    """The launcher's SIGTERM (sent once the main process has exited) ends the wait."""
    import signal
    import time

    from llm_finetune.cli import _interrupt

    launch(2, RANK="1", GROUP_RANK="0")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        assert distributed.exit_after_main(2, grace_s=30) == 2
        assert 0.2 < time.monotonic() - started < 10
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    started = time.monotonic()  # no SIGTERM: the main process did not fail, go after the grace
    assert distributed.exit_after_main(2, grace_s=0.2) == 2
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(
    ("env", "exit_code"),
    [
        ({"RANK": "0"}, 2),  # the main process itself
        ({"RANK": "5", "GROUP_RANK": "1"}, 2),  # another node: its own launcher
        ({"RANK": "1", "GROUP_RANK": "0"}, 0),  # success stops nobody
    ],
)
def test_who_exits_without_waiting(launch, env, exit_code):
    launch(8, **env)
    assert distributed.exit_after_main(exit_code, grace_s=600) == exit_code


def _demo_lora_tensors() -> int:
    """lora_A and lora_B of the 7 linear modules in each layer of the demo's base."""
    from llm_finetune.demo import resolve_builtin_model

    config = json.loads((resolve_builtin_model("builtin:tiny-llama") / "config.json").read_text())
    return 2 * 7 * config["num_hidden_layers"]


def _adapter_layout(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    header = read_header(out / "adapter" / "adapter_model.safetensors")
    return {name: (info.dtype, info.shape) for name, info in header.tensors.items()}


def _torchrun(
    out: Path,
    *args: str,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("-m", "llm_finetune.cli"),
):
    """Two processes; torchrun also keeps each one's stdout/stderr under out/../logs."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--log-dir", str(out.parent / "logs"), "--tee", "3"]
    command += ["--master_port", str(_free_port()), *program, "run", str(DEMO)]
    return subprocess.run(
        [*command, f"output_dir={out}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,  # Unsloth writes its unsloth_compiled_cache/ into the working directory
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.slow
def test_two_processes_train_one_complete_adapter_and_merge_once(tmp_path):
    two = _torchrun(tmp_path / "two", *ARGS)
    assert two.returncode == 0, two.stderr[-3000:]  # the waiting process exited 0 too
    one = subprocess.run(
        [sys.executable, "-m", "llm_finetune.cli", "run", str(DEMO)]
        + [f"output_dir={tmp_path / 'one'}", *ARGS],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("==> [preflight]") == 1  # logs come from the main process only
    other = [p for p in (tmp_path / "logs").rglob("*.log") if p.parent.name == "1"]
    assert len(other) == 2 and all(p.read_text().strip() == "" for p in other)  # no bars
    assert two.stdout.count("==> [merge]") == 1
    assert two.stdout.count("    curves: ") == 1  # plotted once, by the main process
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert "2 processes (DDP): training in all" in two.stdout
    layout = _adapter_layout(tmp_path / "two")
    assert layout == _adapter_layout(tmp_path / "one")
    assert len(layout) == _demo_lora_tensors()
    assert all(len(shape) == 2 and min(shape) > 0 for _, shape in layout.values())
    summary = json.loads((tmp_path / "two" / "run-summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["verify"]["passed"]
    assert summary["train"]["engine"] == "ddp" and summary["train"]["processes"] == 2
    assert not (tmp_path / "two" / "checkpoints" / "final-adapter").exists()


@pytest.mark.slow
@needs_unsloth
def test_unsloth_ddp_and_a_failed_publish_end_every_process_with_exit_code_2(tmp_path, hub):
    """Unsloth's DDP on its CPU fallback; the main process merges through Unsloth, verifies,
    then the Hub refuses the commit: every process exits 2, the adapter is kept."""
    hub.inject("status", method="POST", path=r"/commit/main$", status=403, times=None)
    run = _torchrun(
        tmp_path / "out",
        "backend=unsloth",
        "training.max_steps=10",
        "publish.enabled=true",
        "publish.repo_id=alice/ddp-model",
        f"publish.endpoint={hub.url}",
        env={"HF_TOKEN": GOOD_TOKEN},
    )
    assert run.returncode != 0
    # The other process waited for the main one's outcome and then for its exit (it used to
    # exit 0 right after training, and later, exiting first, to get the main one killed).
    exit_codes = _exit_codes(run)
    assert exit_codes == {"0": "2", "1": "2"}, run.stderr[-5000:]
    assert len(_error_lines(run)) == 1  # said once, by the main process
    summary = json.loads((tmp_path / "out" / "run-summary.json").read_text())
    assert summary["backend"]["name"] == "unsloth" and summary["train"]["engine"] == "ddp"
    assert summary["verify"]["passed"] and summary["failed_stage"] == "unsloth_push"
    assert len(_adapter_layout(tmp_path / "out")) == _demo_lora_tensors()
    assert GOOD_TOKEN not in run.stdout + run.stderr


def _exit_codes(run: subprocess.CompletedProcess) -> dict[str, str]:
    """{rank: exit code} of each failed process, from torchrun's report."""
    pattern = r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)"
    return dict(re.findall(pattern, run.stderr))


def _error_lines(run: subprocess.CompletedProcess) -> list[str]:
    """Our one-line errors, less the `[default0]:` that torchrun's --tee puts before them."""
    return re.findall(r"^(?:\[default\d+\]:)?(error: .*)$", run.stderr, flags=re.MULTILINE)


@pytest.mark.slow
def test_the_main_process_reports_an_error_all_processes_meet_though_it_meets_it_last(tmp_path):
    """Every process refuses the config; the main one is 3 s slower to get there. The other
    one must not exit first: torchrun would kill the main one before it says why."""
    late_main = tmp_path / "late_main.py"
    late_main.write_text(
        "import os, sys, time\n"
        "from llm_finetune.cli import main\n"
        "if os.environ['RANK'] == '0':\n"
        "    time.sleep(3)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = _torchrun(tmp_path / "out", "model.load_in_4bit=true", program=(str(late_main),))
    assert _error_lines(run) == [
        "error: model.load_in_4bit needs a CUDA GPU; set it to false on this machine"
    ]
    assert _exit_codes(run) == {"0": "2", "1": "2"}, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run-summary.json").read_text())
    assert summary["failed_stage"] == "preflight"


@pytest.mark.slow
def test_the_shipped_fsdp_config_is_refused_on_cpus_once_and_before_loading(tmp_path):
    """The real `accelerate launch` of configs/accelerate/fsdp.yaml: its environment is what
    the launch check reads; one error line, from the main process."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("FSDP runs on GPUs")
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--config_file", "configs/accelerate/fsdp.yaml"]
    launch += ["--num_processes", "2", "--main_process_port", str(_free_port())]
    run = subprocess.run(
        [*launch, "-m", "llm_finetune.cli", "run", str(DEMO), f"output_dir={tmp_path}", *ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode != 0
    assert _error_lines(run) == [
        "error: FSDP needs CUDA GPUs, and accelerate would quietly run this config as plain DDP "
        "on CPUs: use ACCELERATE_CONFIG=configs/accelerate/ddp.yaml here"
    ]
    assert "[load_model]" not in run.stdout
    assert _exit_codes(run) == {"0": "2", "1": "2"}, run.stderr[-3000:]
