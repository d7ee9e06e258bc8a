"""Merge benchmark: `cp` of the base shards vs our streaming merge vs peft, side by side.

    make bench          # ~1 GB synthetic Llama (bf16, several shards), r=32 on all linear layers
    .venv/bin/python bench/merge_bench.py --layers 2   # a quick, smaller run

Each contender runs in its own process, which reports its own wall time (of the work, not of
interpreter start-up) and peak RSS; the table prints ratios against `cp` (the physical limit
of reading and writing the bytes) and against peft's `merge_and_unload()` + `save_pretrained`.
The checkpoint is built locally from random tensors (no download) and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"time_vs_cp": 1.5, "time_vs_peft": 0.6, "rss_vs_peft": 0.2}


def build_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, r: int):
    """Write a bf16 Llama checkpoint (one shard per two layers) and an r-rank LoRA adapter."""
    import torch
    from transformers import LlamaConfig

    if (folder / "done").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    config.save_pretrained(base)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    lora: dict[str, torch.Tensor] = {}
    for i in range(layers):
        if i % 2 == 0:
            shards.append({})
        prefix = f"model.layers.{i}."
        for name, shape in shapes.items():
            shards[-1][f"{prefix}{name}.weight"] = rand(*shape)
            key = f"base_model.model.{prefix}{name}"
            lora[f"{key}.lora_A.weight"] = rand(r, shape[1]).float()
            lora[f"{key}.lora_B.weight"] = rand(shape[0], r).float()
        shards[-1][f"{prefix}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shards[-1][f"{prefix}post_attention_layernorm.weight"] = torch.ones(
            hidden, dtype=torch.bfloat16
        )
    shards.append(
        {
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": rand(vocab, hidden),
        }
    )
    write_checkpoint(folder, shards, lora, r, {"target_modules": TARGETS})


def write_checkpoint(
    folder: Path, shards: list[dict], lora: dict, r: int, adapter_config: dict
) -> None:
    """The base's shards and index, the adapter's tensors and config (rank r, alpha 2r, and
    `adapter_config`), then the mark that `folder` is complete."""
    from safetensors.torch import save_file

    base, adapter = folder / "base", folder / "adapter"
    weight_map, total = {}, 0
    for n, tensors in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, base / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        **adapter_config,
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    (folder / "done").write_text("ok")


def peak_rss_kb() -> int:
    """This process's peak RSS. Not ru_maxrss: that one survives exec, so a child would report
    the size of the process that forked it."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def contender(name: str, base: Path, adapter: Path, out: Path) -> dict:
    """Runs in its own process: do the work, report seconds and this process's peak RSS."""
    if name != "cp":  # torch is loaded before timing; cp must not inherit its memory via fork
        import torch  # noqa: F401
    baseline = peak_rss_kb()
    start = time.perf_counter()
    if name == "cp":
        out.mkdir(parents=True)
        files = [str(p) for p in base.glob("*.safetensors")]
        subprocess.run(["cp", *files, str(out)], check=True)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    elif name == "llm-finetune":
        from llm_finetune.merge import merge

        merge(str(base), adapter, out, dtype="bfloat16")
        rss = peak_rss_kb()
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
        rss = peak_rss_kb()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": rss / 1024, "grown_mb": (rss - baseline) / 1024}


def bench_parser(description: str, layers: list[int] | int = 8) -> argparse.ArgumentParser:
    """The options every benchmark shares: the synthetic model's shape, where it is cached,
    how many interleaved runs (the best is kept), and the hidden --contender of a child run."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    many = isinstance(layers, list)
    parser.add_argument("--layers", type=int, nargs="+" if many else None, default=layers)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--work", default=os.environ.get("BENCH_DIR", "/tmp/llm-finetune-bench"))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs; best is kept")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    work = Path(args.work)
    folder = work / f"llama-{args.layers}x{args.hidden}-r{args.rank}"
    base, adapter = folder / "base", folder / "adapter"
    if args.contender:
        print(json.dumps(contender(args.contender, base, adapter, work / "out")))
        return
    build_checkpoint(folder, args.layers, args.hidden, args.intermediate, args.vocab, args.rank)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(
        f"base: {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards, "
        f"adapter r={args.rank} on {len(TARGETS)} modules x {args.layers} layers"
    )
    runs: dict[str, list[dict]] = {"cp": [], "llm-finetune": [], "peft": []}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits all alike
        for name, measured in runs.items():
            shutil.rmtree(work / "out", ignore_errors=True)
            done = subprocess.run(
                [sys.executable, __file__, "--contender", name, *sys.argv[1:]],
                capture_output=True,
                text=True,
                check=True,
            )
            measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {name: min(measured, key=lambda r: r["seconds"]) for name, measured in runs.items()}
    shutil.rmtree(work / "out", ignore_errors=True)
    ours, cp, peft = results["llm-finetune"], results["cp"], results["peft"]
    ratios = {
        "time_vs_cp": ours["seconds"] / cp["seconds"],
        "time_vs_peft": ours["seconds"] / peft["seconds"],
        "rss_vs_peft": ours["peak_rss_mb"] / peft["peak_rss_mb"],
    }
    grown_ratio = ours["grown_mb"] / peft["grown_mb"]
    print(f"\n{'contender':<34}{'seconds':>9}{'peak RSS MB':>13}{'above torch MB':>16}")
    labels = {
        "cp": "cp of the base shards",
        "llm-finetune": "llm-finetune merge (streaming)",
        "peft": "peft merge_and_unload + save",
    }
    for name, label in labels.items():
        r = results[name]
        print(f"{label:<34}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['grown_mb']:>16.0f}")
    print()
    for key, value in ratios.items():
        verdict = "meets" if value <= GOALS[key] else "MISSES"
        print(f"{key:<14}{value:6.2f}  (goal <= {GOALS[key]}: {verdict})")
    print(f"{'rss_vs_peft above the torch import':<14} {grown_ratio:.2f}")
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "merge.json").write_text(
        json.dumps(
            {"base_bytes": size, "results": results, "ratios": ratios, "runs": runs}, indent=2
        )
    )


if __name__ == "__main__":
    main()
