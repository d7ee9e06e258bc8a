"""Verification benchmark: the whole-model check vs the bounded (block by block) check.

    make bench          # the ~1 GB synthetic Llama of merge_bench.py and one of twice its layers
    .venv/bin/python bench/verify_bench.py --layers 2 --repeat 1   # a quick, smaller run

For each model: a bf16 merge of an r=32 adapter is made once (cached), then `verify` runs it
against base+adapter on the config's default prompt and `verify.max_new_tokens` (32), once
whole and once bounded with `verify.max_memory` at its least (one block streaming, nothing
resident). Each run is its own process, which reports the check's wall time and its peak
RSS (VmHWM); the runs are interleaved and the best time of `--repeat` is kept, since the
machine is shared. The table prints bounded/whole ratios against the goals, and whether the
two checks agree: the same max |Δlogit| (within 1e-6) and the same greedy tokens (the
tokenizer has one token per id, so the sample text spells them out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import bench_parser, build_checkpoint, peak_rss_kb

GOALS = {"rss_vs_whole": 0.25, "time_vs_whole": 2.0}
MODES = ("whole", "bounded")


def write_tokenizer(folder: Path, vocab: int, prompt: str) -> None:
    """A word-level tokenizer with one token per model id (the prompt's words first), so a
    decoded generation names every token the model chose."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(["</s>", *prompt.split()]))
    table = {word: i for i, word in enumerate(words)}
    table.update({f"t{i}": i for i in range(len(words), vocab)})
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(folder)


def prepare(work: Path, layers: int, args: argparse.Namespace) -> Path:
    """Base, adapter and merged model of a synthetic Llama with `layers` layers (cached)."""
    from llm_finetune.config import DEFAULT_VERIFY_PROMPT
    from llm_finetune.merge import merge

    folder = work / f"llama-{layers}x{args.hidden}-r{args.rank}"
    build_checkpoint(folder, layers, args.hidden, args.intermediate, args.vocab, args.rank)
    if not (folder / "merged").is_dir():
        write_tokenizer(folder / "base", args.vocab, DEFAULT_VERIFY_PROMPT)
        merge(str(folder / "base"), folder / "adapter", folder / "merged", dtype="bfloat16")
    return folder


def contender(mode: str, folder: Path, max_new_tokens: int) -> dict:
    """Runs in its own process: one check, its seconds, peak RSS and figures."""
    import accelerate  # noqa: F401  (what the check imports, before the baseline is taken)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from llm_finetune.config import DEFAULT_VERIFY_PROMPT
    from llm_finetune.verify import verify
    from llm_finetune.verify_memory import bounded_memory_needed, check_layout

    base, adapter, merged = folder / "base", folder / "adapter", folder / "merged"
    cap = None
    if mode == "bounded":  # the least it accepts: nothing resident, one block streaming
        cap = f"{bounded_memory_needed(check_layout(base, adapter, merged))}B"
    baseline = peak_rss_kb()
    start = time.perf_counter()
    report = verify(
        str(base), adapter, merged, [DEFAULT_VERIFY_PROMPT], max_new_tokens, max_memory=cap
    )
    seconds = time.perf_counter() - start
    assert report.mode == mode, (report.mode, mode)
    rss = peak_rss_kb()
    return {
        "seconds": seconds,
        "peak_rss_mb": rss / 1024,
        "grown_mb": (rss - baseline) / 1024,
        "max_memory": cap,
        "report": report.as_dict(),
    }


def main() -> None:
    parser = bench_parser(__doc__, layers=[8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        print(json.dumps(contender(args.contender, Path(args.folder), args.max_new_tokens)))
        return
    work = Path(args.work) / "verify"
    summary = {}
    for layers in args.layers:
        folder = prepare(work, layers, args)
        size = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors"))
        print(f"\nbase: {size / 1e9:.2f} GB in bf16, {layers} layers; adapter r={args.rank}")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeat):  # interleaved, so drift in the machine hits both alike
            for mode, measured in runs.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--contender", mode, "--folder", str(folder)]
                    + ["--max-new-tokens", str(args.max_new_tokens)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    sys.exit(f"{mode} check failed:\n{done.stderr[-3000:]}")
                measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
        best = {mode: min(measured, key=lambda r: r["seconds"]) for mode, measured in runs.items()}
        summary[f"{layers} layers"] = report_model(size, best, runs)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "verify.json").write_text(json.dumps(summary, indent=2))


def report_model(size: int, best: dict[str, dict], runs: dict[str, list[dict]]) -> dict:
    whole, bounded = best["whole"], best["bounded"]
    print(f"{'check':<34}{'seconds':>9}{'peak RSS MB':>13}{'above imports MB':>18}")
    for mode in MODES:
        r = best[mode]
        label = f"{mode} ({r['max_memory']})" if r["max_memory"] else mode
        print(f"{label:<34}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['grown_mb']:>18.0f}")
    ratios = {
        "rss_vs_whole": bounded["peak_rss_mb"] / whole["peak_rss_mb"],
        "time_vs_whole": bounded["seconds"] / whole["seconds"],
    }
    for key, value in ratios.items():
        verdict = "meets" if value <= GOALS[key] else "MISSES"
        print(f"{key:<14}{value:6.2f}  (goal <= {GOALS[key]}: {verdict})")
    grown = bounded["grown_mb"] / whole["grown_mb"]
    print(f"{'rss_vs_whole above the imports':<30} {grown:.2f}")
    a, b = whole["report"], bounded["report"]
    same = {
        "max_abs_logit_diff": abs(a["max_abs_logit_diff"] - b["max_abs_logit_diff"]) <= 1e-6,
        "greedy tokens": a["sample_generation"] == b["sample_generation"]
        and a["generations_agree"] == b["generations_agree"],
        "adapter effect": abs(
            a["adapter_effect_max_abs_logit_diff"] - b["adapter_effect_max_abs_logit_diff"]
        )
        <= 1e-6,
    }
    print(
        f"results agree: {same} (max |Δlogit| {a['max_abs_logit_diff']:.6g} whole, "
        f"{b['max_abs_logit_diff']:.6g} bounded; passed {a['passed']}/{b['passed']})"
    )
    return {"base_bytes": size, "best": best, "ratios": ratios, "agree": same, "runs": runs}


if __name__ == "__main__":
    main()
