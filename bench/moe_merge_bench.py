"""MoE merge benchmark: LoRA on a Qwen3-MoE's experts vs a dense merge of the same bytes.

    .venv/bin/python bench/moe_merge_bench.py            # ~1 GB: 4 layers x 32 experts, bf16
    .venv/bin/python bench/moe_merge_bench.py --layers 2 # quicker

The MoE checkpoint stores its experts one by one (`mlp.experts.N.gate_proj.weight`), one shard
per layer, and the adapter is what peft 0.21 saves for the default target list: LoRA on
attention and on the fused expert tensors (target_parameters, rank 2r for gate_up_proj). The
dense checkpoint is a Llama whose MLP is as large as all the experts together, with LoRA on
the same modules. Each merge runs in its own process (`merge_bench.contender`); the table gives
the MoE merge's time against the dense one (goal <= 1.2) and its peak RSS above the imports
against its largest shard plus the adapter (goal <= 1.5: about one shard in memory).

Both children import peft and transformers before the clock starts, as in a run, where training
has loaded them: the MoE merge needs them to rebuild peft's wrappers on the meta device, and a
`llm-finetune merge` on its own pays about 5 s (2 cores) importing them, once, whatever the size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from merge_bench import bench_parser, build_checkpoint, contender, write_checkpoint

GOALS = {"time_vs_dense": 1.2, "rss_vs_shard_and_adapter": 1.5}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_moe_checkpoint(folder: Path, layers: int, hidden: int, expert: int, experts: int, r: int):
    """A bf16 Qwen3-MoE checkpoint (one shard per layer) and peft's adapter layout for it."""
    import torch
    from transformers import Qwen3MoeConfig

    if (folder / "done").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    heads = hidden // 128
    Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=hidden,
        moe_intermediate_size=expert,
        intermediate_size=expert,
        num_experts=experts,
        num_experts_per_tok=2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=128,
        tie_word_embeddings=False,
    ).save_pretrained(base)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(32000, hidden)}]
    lora: dict[str, torch.Tensor] = {}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shard = {f"{prefix}mlp.gate.weight": rand(experts, hidden)}
        for name in ATTENTION:
            shard[f"{prefix}self_attn.{name}.weight"] = rand(hidden, hidden)
            key = f"base_model.model.{prefix}self_attn.{name}"
            lora[f"{key}.lora_A.weight"] = rand(r, hidden, dtype=torch.float32)
            lora[f"{key}.lora_B.weight"] = rand(hidden, r, dtype=torch.float32)
        for norm in ("q_norm", "k_norm"):
            shard[f"{prefix}self_attn.{norm}.weight"] = torch.ones(128, dtype=torch.bfloat16)
        for n in range(experts):
            shard[f"{prefix}mlp.experts.{n}.gate_proj.weight"] = rand(expert, hidden)
            shard[f"{prefix}mlp.experts.{n}.up_proj.weight"] = rand(expert, hidden)
            shard[f"{prefix}mlp.experts.{n}.down_proj.weight"] = rand(hidden, expert)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shard[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shards.append(shard)
        key = f"base_model.model.{prefix}mlp.experts"  # gate_up_proj wrapped first, inside
        lora[f"{key}.base_layer.lora_A.weight"] = rand(2 * r * experts, hidden, dtype=torch.float32)
        lora[f"{key}.base_layer.lora_B.weight"] = rand(
            2 * expert, 2 * r * experts, dtype=torch.float32
        )
        lora[f"{key}.lora_A.weight"] = rand(r * experts, expert, dtype=torch.float32)
        lora[f"{key}.lora_B.weight"] = rand(hidden, r * experts, dtype=torch.float32)
    shards.append(
        {
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": rand(32000, hidden),
        }
    )
    pattern = r".*\.gate_up_proj"
    peft_layout = {
        "target_modules": ATTENTION,
        "target_parameters": ["gate_up_proj", "down_proj"],
        "rank_pattern": {pattern: 2 * r},
        "alpha_pattern": {pattern: 4 * r},
    }
    write_checkpoint(folder, shards, lora, r, peft_layout)


def main() -> None:
    parser = bench_parser(__doc__, layers=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert", type=int, default=768, help="each expert's intermediate size")
    args = parser.parse_args()
    work = Path(args.work)
    moe = work / f"qwen3moe-{args.layers}x{args.hidden}-{args.experts}x{args.expert}-r{args.rank}"
    dense = work / f"llama-{args.layers}x{args.hidden}-i{args.experts * args.expert}-r{args.rank}"
    folders = {"dense": dense, "moe": moe}
    if args.contender:
        import peft  # noqa: F401 - loaded before the clock, as in a run (training loaded it)

        name, folder = args.contender.split(":")
        base, adapter = Path(folder) / "base", Path(folder) / "adapter"
        print(json.dumps(contender(name, base, adapter, work / "out")))
        return
    build_moe_checkpoint(moe, args.layers, args.hidden, args.expert, args.experts, args.rank)
    build_checkpoint(dense, args.layers, args.hidden, args.experts * args.expert, 32000, args.rank)
    sizes = {
        k: sum(p.stat().st_size for p in (f / "base").glob("*.safetensors"))
        for k, f in folders.items()
    }
    print(
        f"MoE base {sizes['moe'] / 1e9:.2f} GB ({args.layers} layers x {args.experts} experts), "
        f"dense base {sizes['dense'] / 1e9:.2f} GB, LoRA r={args.rank}"
    )
    runs: dict[str, list[dict]] = {"dense": [], "moe": []}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits both alike
        for name, measured in runs.items():
            shutil.rmtree(work / "out", ignore_errors=True)
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--contender",
                    f"llm-finetune:{folders[name]}",
                    *sys.argv[1:],
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    shutil.rmtree(work / "out", ignore_errors=True)
    results = {name: min(measured, key=lambda r: r["seconds"]) for name, measured in runs.items()}
    shard = max(p.stat().st_size for p in (moe / "base").glob("*.safetensors"))
    adapter = (moe / "adapter" / "adapter_model.safetensors").stat().st_size
    ratios = {
        "time_vs_dense": results["moe"]["seconds"] / results["dense"]["seconds"],
        "rss_vs_shard_and_adapter": results["moe"]["grown_mb"] * 2**20 / (shard + adapter),
    }
    print(f"\n{'merge':<34}{'seconds':>9}{'peak RSS MB':>13}{'above imports MB':>18}")
    for name, label in (
        ("dense", "dense Llama, same bytes"),
        ("moe", "Qwen3-MoE, LoRA on experts"),
    ):
        r = results[name]
        print(f"{label:<34}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['grown_mb']:>18.0f}")
    print(f"largest MoE shard {shard / 2**20:.0f} MB, adapter {adapter / 2**20:.0f} MB\n")
    for key, value in ratios.items():
        verdict = "meets" if value <= GOALS[key] else "MISSES"
        print(f"{key:<26}{value:6.2f}  (goal <= {GOALS[key]}: {verdict})")
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "moe_merge.json").write_text(
        json.dumps(
            {"base_bytes": sizes, "results": results, "ratios": ratios, "runs": runs}, indent=2
        )
    )


if __name__ == "__main__":
    main()
