"""GGUF export benchmark: our export path vs llama.cpp's converter and quantizer run directly.

    make bench          # the ~1 GB synthetic Llama of merge_bench.py, merged in bf16
    .venv/bin/python bench/export_bench.py --layers 2 --repeat 1   # a quick, smaller run

The model is merge_bench's synthetic bf16 Llama (an r=32 adapter merged into it once by our
merge, cached) with the demo's byte-level BPE tokenizer (`llm_finetune.demo.build_tokenizer`;
the converter pads its 436 tokens to the config's 32000 embedding rows with unused [PAD]
tokens). Three steps, each timed for both contenders:

- bf16: ours is `gguf.convert(merged, f, "bf16", "qwen2")` (llama.cpp's converter in a
  subprocess through `llm_finetune.exports.convert_gguf`); theirs is the converter's own
  `main()` run with `--outtype bf16 --outfile f`.
- q4_k_m: ours is `gguf.quantize(f, g, "q4_k_m")`; theirs is a plain
  `llama_cpp.llama_model_quantize` with default params and ftype Q4_K_M, each from its own
  contender's bf16 file. llama_cpp is imported before the clock starts in both.
- q8_0: `convert(..., "q8_0")` against the converter's `--outtype q8_0`.

The converter refuses the demo tokenizer (it identifies a BPE pre-tokenizer by a hash of how it
splits a fixed text and knows none made locally). For the baseline we do what a llama.cpp user
would: the one-line patch `TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"` in a
`python -c` driver that otherwise runs `convert_hf_to_gguf.main()` unchanged (`DRIVER` below).
Ours first lets the converter try its own detection and uses "qwen2" only where it stops.

Each (contender, step) runs in its own fresh process, interleaved (who goes first swaps each
repeat; the page cache's dirty pages are synced before each run), best of `--repeat`. It reports
the step's wall time, its CPU time (user + system, of all its processes: others' load on a
shared machine moves it far less than the wall time) and the peak RSS (VmHWM) of the process
doing the work: the converter's subprocess for conversions, the contender process itself for
quantization. The table prints ours/theirs ratios against the goal (1.1: nothing of ours in
the way) and whether the two GGUF files of each step are byte-identical (if not, which metadata
or tensors differ). Ours adds ~0.2 s per conversion: llama.cpp loads the file's vocabulary once
to check the declared pre-tokenizer name.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import bench_parser, build_checkpoint, peak_rss_kb

GOAL = 1.1
STEPS = ("bf16", "q4_k_m", "q8_0")
CONTENDERS = ("llm-finetune", "llama.cpp")
PRE_TOKENIZER = "qwen2"
# llama.cpp's converter, run as its own script would run it, but for the pre-tokenizer name.
DRIVER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import convert_hf_to_gguf; "
    "from conversion.base import TextModel; "
    f"TextModel.get_vocab_base_pre = lambda self, tokenizer: {PRE_TOKENIZER!r}; "
    "convert_hf_to_gguf.main()"
)


def prepare(work: Path, args: argparse.Namespace) -> Path:
    """The merged bf16 folder of a synthetic Llama with the demo tokenizer (cached)."""
    from llm_finetune.demo import build_tokenizer
    from llm_finetune.merge import merge

    folder = work / f"llama-{args.layers}x{args.hidden}-r{args.rank}"
    build_checkpoint(folder, args.layers, args.hidden, args.intermediate, args.vocab, args.rank)
    merged = folder / "merged"
    if not (merged / "config.json").is_file():
        base = folder / "base"
        build_tokenizer().save_pretrained(base)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]  # what the converter dispatches on
        (base / "config.json").write_text(json.dumps(config, indent=2))
        merge(str(base), folder / "adapter", merged, dtype="bfloat16")
    return merged


def output(out: Path, contender: str, step: str) -> Path:
    return out / contender / f"model-{step}.gguf"


def run_step(contender: str, step: str, merged: Path, out: Path) -> dict:
    """Runs in its own process: one step of one contender; its seconds and peak RSS."""
    from llm_finetune.exports.gguf import CONVERTER_DIR

    target = output(out, contender, step)
    source = output(out, contender, "bf16")
    if step == "q4_k_m":
        import llama_cpp  # the library load is alike for both, and not the work
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    if contender == "llm-finetune" and step == "q4_k_m":
        from llm_finetune.exports import gguf

        gguf.quantize(source, target, step)
    elif contender == "llm-finetune":
        from llm_finetune.exports import gguf

        gguf.convert(merged, target, step, PRE_TOKENIZER)
    elif step == "q4_k_m":
        import ctypes

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
        assert status == 0, f"llama_model_quantize returned {status}"
    else:
        command = [sys.executable, "-c", DRIVER, str(CONVERTER_DIR), str(merged)]
        command += ["--outtype", step, "--outfile", str(target)]
        subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    # The converter's subprocess (forked from a process of ~30 MB) or this one, the larger.
    rss = max(peak_rss_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": rss / 1024,
        "bytes": target.stat().st_size,
    }


def cpu_seconds() -> float:
    """User + system time of this process and its finished children: steadier than wall time
    on a machine others are using, since their work does not count in it."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_of(runs: list[dict]) -> dict:
    """Each figure at its best over the runs (the least wall and CPU time, peak RSS)."""
    return {key: min(r[key] for r in runs) for key in runs[0]}


def difference(ours: Path, theirs: Path) -> str | None:
    """None when the two files are byte-identical; else the metadata keys and tensors that
    differ, as gguf-py reads them."""
    if filecmp.cmp(ours, theirs, shallow=False):
        return None
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    fields = {k: a.fields[k].contents() for k in a.fields if not k.startswith("GGUF.")}
    others = {k: b.fields[k].contents() for k in b.fields if not k.startswith("GGUF.")}
    keys = sorted(k for k in fields.keys() | others.keys() if fields.get(k) != others.get(k))
    tensors_b = {t.name: t for t in b.tensors}
    tensors = [
        t.name
        for t in a.tensors
        if t.name not in tensors_b
        or t.tensor_type != tensors_b[t.name].tensor_type
        or not np.array_equal(t.data, tensors_b[t.name].data)
    ]
    tensors += [name for name in tensors_b if name not in {t.name for t in a.tensors}]
    return f"metadata differs: {keys or 'none'}; tensors differ: {tensors or 'none'}"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--merged", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work) / "export"
    out = work / "out"
    if args.contender:
        print(json.dumps(run_step(args.contender, args.step, Path(args.merged), out)))
        return
    from llm_finetune.exports.gguf import toolchain_problem

    if problem := toolchain_problem():
        sys.exit(problem)
    merged = prepare(work, args)
    size = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    print(f"merged: {size / 1e9:.2f} GB in bf16, {args.layers} layers of {args.hidden}")
    runs: dict[str, dict[str, list[dict]]] = {s: {c: [] for c in CONTENDERS} for s in STEPS}
    for repeat in range(args.repeat):  # interleaved, so drift in the machine hits both alike
        for step in STEPS:
            for contender in CONTENDERS[:: 1 if repeat % 2 == 0 else -1]:  # each goes first
                output(out, contender, step).unlink(missing_ok=True)
                output(out, contender, step).parent.mkdir(parents=True, exist_ok=True)
                os.sync()  # the last run's writes are flushed on its own time, not this one's
                done = subprocess.run(
                    [sys.executable, __file__, "--work", args.work, "--merged", str(merged)]
                    + ["--contender", contender, "--step", step],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    sys.exit(f"{contender} {step} failed:\n{done.stderr[-3000:]}")
                runs[step][contender].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {s: {c: best_of(r) for c, r in by.items()} for s, by in runs.items()}
    summary = {"merged_bytes": size, "goal": GOAL, "steps": {}}
    print(
        f"\n{'step':<8}{'contender':<14}{'seconds':>9}{'CPU seconds':>13}{'peak RSS MB':>13}"
        f"{'output MB':>11}"
    )
    for step in STEPS:
        for contender in CONTENDERS:
            r = best[step][contender]
            print(
                f"{step:<8}{contender:<14}{r['seconds']:>9.2f}{r['cpu_seconds']:>13.2f}"
                f"{r['peak_rss_mb']:>13.0f}{r['bytes'] / 1e6:>11.1f}"
            )
    print()
    for step in STEPS:
        ours, theirs = best[step]["llm-finetune"], best[step]["llama.cpp"]
        ratios = {
            "time": ours["seconds"] / theirs["seconds"],
            "cpu": ours["cpu_seconds"] / theirs["cpu_seconds"],
            "rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        }
        differs = difference(output(out, "llm-finetune", step), output(out, "llama.cpp", step))
        verdict = "meets" if ratios["time"] <= GOAL else "MISSES"
        print(
            f"{step:<8}time {ratios['time']:.2f} (goal <= {GOAL}: {verdict}), "
            f"CPU time {ratios['cpu']:.2f}, peak RSS {ratios['rss']:.2f}; "
            f"files {'identical' if differs is None else differs}"
        )
        summary["steps"][step] = {
            "best": best[step],
            "ratios": ratios,
            "identical": differs is None,
            "difference": differs,
            "runs": runs[step],
        }
    shutil.rmtree(out, ignore_errors=True)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "export.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
