"""GPU check: the unsloth and hf backends end to end on one GPU, side by side.

    bash scripts/gpu_check.sh                 # on the GPU machine (installs carried wheels)
    .venv/bin/python scripts/gpu_check.py --tiny   # a dry run of the same flow on the CPU

Builds a ~0.5B Llama from a config with random weights (no download), writes a synthetic
dataset of long Alpaca rows, then runs `llm-finetune run` once per backend, each in its own
process (Unsloth must be imported first in its process): a few dozen SFT steps, the
merged_16bit save (Unsloth's GPU path, unsloth/save.py, on the GPU), verification against
base+adapter, publishing to a local Hub-compatible server and loading it back; then, as
correctness checks of a few steps, the unsloth backend on a Qwen3-MoE (LoRA on every expert,
merged and verified), trained in 4-bit (QLoRA: the merge must read the original 16-bit base),
and the hf backend under FSDP (configs/accelerate/fsdp.yaml, one process). All of it stops
within --budget seconds, so one device call holds it. Prints tokens/s of each backend and their
ratio (goal: unsloth >= 1.8x hf), peak GPU memory, merge time and the verification figures;
writes them to gpu-check.json in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.8
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build_base(folder: Path, tiny: bool) -> str:
    """A bf16 Llama with random weights and the demo tokenizer (its vocabulary fits the data)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llm_finetune.demo import build_tokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = build_tokenizer()
    size = (
        dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4)
        if tiny
        else dict(
            hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12
        )
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=max(1, size["num_attention_heads"] // 3),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **size,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"base: {params / 1e6:.0f} M parameters in {folder}", flush=True)
    return str(folder)


def build_moe_base(folder: Path, tiny: bool) -> str:
    """A bf16 Qwen3-MoE with random weights and the demo tokenizer: LoRA on its experts goes
    through peft's target_parameters, and Unsloth's MoE path, which only a GPU runs."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from llm_finetune.demo import build_tokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = build_tokenizer()
    size = (
        dict(hidden_size=64, moe_intermediate_size=48, num_hidden_layers=2, num_experts=4)
        if tiny
        else dict(hidden_size=1024, moe_intermediate_size=384, num_hidden_layers=8, num_experts=32)
    )
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=size["hidden_size"] // 8,
        num_experts_per_tok=4,
        intermediate_size=4 * size["hidden_size"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_dataset(path: Path, rows: int, words: int) -> str:
    """Alpaca rows whose answers are `words` number words long: long sequences, as in SFT."""
    with path.open("w") as f:
        for i in range(rows):
            answer = " ".join(ONES[(i * 7 + k * 3) % 10] for k in range(words))
            f.write(json.dumps({"instruction": f"Count in words from seed {i}.", "output": answer}))
            f.write("\n")
    return str(path)


def write_config(path: Path, base: str, data: str, args: argparse.Namespace) -> None:
    config = {
        "run_name": "gpu-check",
        "overwrite": True,
        "model": {"name": base, "max_seq_length": args.seq, "dtype": "auto"},
        "lora": {"r": 16, "alpha": 32},
        "data": {"datasets": [{"path": data}], "format": "alpaca", "test_size": 0.05},
        "training": {
            "learning_rate": 2e-4,
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "logging_steps": 5,
            "save_steps": 10_000,
            "gradient_checkpointing": True,
        },
        "merge": {"dtype": "bfloat16"},
        "verify": {"prompts": ["Count in words from seed 3."], "max_new_tokens": 8},
        # A check of the save path on random data: the gate's verdict is recorded in the
        # report (gate_passed), not enforced; the evaluation is timed at the model's size.
        "evaluate": {"gate": False, "max_rows": 16},
        "publish": {"enabled": True, "endpoint": "local", "repo_id": "check/gpu-check"},
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


def run_backend(
    name: str, config: Path, work: Path, timeout_s: float, moe_base: str | None = None
) -> dict:
    """`llm-finetune run` with backend `name` ("unsloth", "hf"), or a variant of it checked
    for correctness in a few steps: "<backend>-4bit" trains in 4-bit (model.load_in_4bit);
    "<backend>-moe" trains `moe_base` (LoRA on attention and every expert); "<backend>-fsdp"
    runs under `accelerate launch` with configs/accelerate/fsdp.yaml in one process (FSDP's
    wrapping, CPU-efficient loading and full-state-dict gather of the adapter, on the GPU)."""
    backend, _, variant = name.partition("-")
    out = work / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    launcher = [sys.executable, "-m", "llm_finetune.cli"]
    overrides = [f"backend={backend}", f"output_dir={out}"]
    if variant:  # a correctness check, not a speed one: a few steps are enough
        overrides.append("training.max_steps=10")
    if variant == "4bit":
        overrides.append("model.load_in_4bit=true")
    elif variant == "moe":
        overrides.append(f"model.name={moe_base}")
    elif variant:
        accelerate_config = ROOT / "configs" / "accelerate" / f"{variant}.yaml"
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        launcher += [str(accelerate_config), "--num_processes", "1", "--main_process_port"]
        launcher += ["29531", "-m", "llm_finetune.cli"]
    start = time.perf_counter()
    with subprocess.Popen(
        [*launcher, "run", str(config), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=work,
        start_new_session=True,  # its own process group: a stop reaches accelerate's workers
    ) as done:
        try:  # a hang must not eat the other backends' share of the lease
            stdout, stderr = done.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)
            stdout, stderr = done.communicate()
            stderr += f"\nerror: timed out after {timeout_s:.0f} s"
    (work / f"{name}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    if done.returncode != 0:
        lines = stderr.strip().splitlines()
        said = [line for line in lines if line.startswith("error: ")]  # our one-line errors
        return {"backend": name, "ok": False, "error": "\n".join(said or lines[-15:])}
    summary = json.loads((out / "run-summary.json").read_text())
    train, verify = summary["train"], summary.get("verify", {})
    published = summary.get("published", {})
    evaluation = summary.get("evaluation")
    return {
        "backend": name,
        "ok": True,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "chosen": summary["backend"]["reason"],
        "engine": train.get("engine"),
        "tokens_per_second": train.get("tokens_per_second"),
        "tokens_seen": train.get("tokens_seen"),
        "train_runtime": train.get("train_runtime"),
        "peak_gpu_memory_gb": train.get("peak_gpu_memory_gb"),
        "loss": [train.get("train_loss_first"), train.get("train_loss_last")],
        "merge_seconds": summary["stages"].get("merge"),
        "merge_code_path": summary["merge"].get("code_path", "llm-finetune streaming merge"),
        "load_in_4bit": summary["config"]["model"]["load_in_4bit"],
        "merged_from": summary["merge"].get("merged_from"),
        "lora_on": summary.get("lora_targets", {}).get("touched"),
        "verify_max_abs_logit_diff": verify.get("max_abs_logit_diff"),
        "verify_routing_agreement": verify.get("routing_agreement"),  # a MoE's
        "verify_tolerance": verify.get("tolerance"),
        "generations_agree": f"{verify.get('generations_agree')}/{verify.get('prompts')}",
        "published_files": len(published.get("files", [])),
        # Unsloth's own push (unsloth backend): its commits, newest first, under our message.
        "unsloth_push_commits": [
            c["title"] for c in summary.get("unsloth_push", {}).get("commits", [])
        ],
        # What our last commit changed after Unsloth's push: only README.md if Unsloth uploaded
        # the bytes that were verified.
        "changed_by_final_commit": sorted(
            set(published.get("files", [])) - set(published.get("unchanged", []))
        ),
        "sample_after_training": summary.get("sample_after_training"),  # unsloth backend
        "load_back": summary.get("load_back", {}).get("generation"),
        # The evaluation stage and the gate on publishing, timed at the model's real size.
        "evaluation": evaluation
        and {
            "metric": evaluation["metric"],
            "rows": evaluation["rows"],
            "seconds": evaluation["seconds"],
            "base": evaluation["base"]["score"],
            "merged": evaluation["merged"]["score"],
        },
        "gate_passed": summary.get("gate", {}).get("passed"),
        "stages": summary["stages"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small CPU dry run of the flow")
    parser.add_argument("--work", default="/tmp/llm-finetune-gpu-check")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument(
        "--backends", default=None, help="default: unsloth,hf,unsloth-moe,unsloth-4bit,hf-fsdp"
    )
    parser.add_argument(
        "--timeout", type=float, default=170, help="seconds per backend before it is stopped"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=520,
        help="seconds for the whole check (one device call); backends past it are not run",
    )
    parser.add_argument(
        "--report-to", default=os.environ.get("OUT"), help="also copy the report and logs here"
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    args.backends = args.backends or (
        "unsloth,hf" if args.tiny else "unsloth,hf,unsloth-moe,unsloth-4bit,hf-fsdp"
    )
    args.steps = args.steps or (6 if args.tiny else 40)
    args.batch = args.batch or (4 if args.tiny else 8)
    args.seq = args.seq or (128 if args.tiny else 1024)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    base = build_base(work / ("base-tiny" if args.tiny else "base-0.5b"), args.tiny)
    words = 20 if args.tiny else 300
    data = write_dataset(work / "data.jsonl", rows=args.batch * args.steps, words=words)
    config = work / "config.yaml"
    write_config(config, base, data, args)
    moe_base = None
    if any(b.endswith("-moe") for b in args.backends.split(",")):
        moe_base = build_moe_base(work / ("moe-tiny" if args.tiny else "moe-base"), args.tiny)
    results = {}
    for backend in args.backends.split(","):
        print(f"==> {backend}", flush=True)
        left = deadline - time.monotonic()
        if left < 30:
            results[backend] = {"backend": backend, "ok": False, "error": "not run: --budget spent"}
        else:
            timeout = min(args.timeout, left)
            results[backend] = run_backend(backend, config, work, timeout, moe_base)
        print(json.dumps(results[backend], indent=2), flush=True)
        report(results, work, backend, args.report_to)  # after each: a lease may end early
    speeds = [results.get(b, {}).get("tokens_per_second") for b in ("unsloth", "hf")]
    if all(speeds):
        ratio = speeds[0] / speeds[1]
        verdict = "meets" if ratio >= GOAL else "MISSES"
        print(f"\nunsloth/hf tokens per second: {ratio:.2f} (goal >= {GOAL}: {verdict})")
        results["ratio_unsloth_over_hf"] = ratio
        report(results, work, None, args.report_to)
    return 0 if all(r.get("ok") for r in results.values() if isinstance(r, dict)) else 1


def report(results: dict, work: Path, backend: str | None, report_to: str | None) -> None:
    """gpu-check.json in the work folder; with the backend's log, also in `report_to` (the
    device tool's $OUT, which returns a few small files, not the models)."""
    (work / "gpu-check.json").write_text(json.dumps(results, indent=2))
    if report_to:
        names = ["gpu-check.json"] + ([f"{backend}.log"] if backend else [])
        for name in names:
            if (work / name).is_file():
                shutil.copy(work / name, Path(report_to) / name)


if __name__ == "__main__":
    sys.exit(main())
