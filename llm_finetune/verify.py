"""Prove the merged model is what was trained: merged vs base+adapter (peft) on fixed prompts.

Both sides run in float32 (the merged weights upcast exactly as stored), one model in memory
at a time, so the difference measured is the merge and its final rounding, not bf16 compute
noise. The tolerance scales with the stored dtype's precision and the logits' magnitude. It
also measures base vs base+adapter, so an adapter that changes nothing (an untrained or
wrongly loaded one) is reported instead of passing silently.

base+adapter generates greedily from each prompt; then each model runs once over prompt and
continuation: the logits on the prompt are compared, and the merged model agrees on a
generation when its greedy choice at every step is the token base+adapter chose (the text it
would generate itself). One pass per model, not one per generated token.

Each model is held in one of two ways, chosen from the memory there is
(`verify_memory.plan_memory`), by `verify_loading`:
- whole: the model in float32 on the GPUs, then RAM; the faster way, when it fits;
- bounded: one block (a decoder layer, or a module outside the layers) at a time, read from
  the checkpoint's safetensors files by accelerate's offload hooks. Peak memory: the largest
  block, the adapter and what stays resident.
Both ways run the same code on the same prompts, so they report the same figures.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.verify_loading import holding, load_bounded, load_whole
from llm_finetune.verify_memory import available_ram, check_layout, free_memory, plan_memory

# Allowed max |Δlogit| per unit of logit scale, by the merged weights' dtype.
RELATIVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}


class VerificationFailed(UserError):
    """The merged model does not reproduce base+adapter within tolerance."""


@dataclass
class VerifyReport:
    dtype: str
    prompts: int
    max_abs_logit_diff: float
    logit_scale: float
    tolerance: float
    passed: bool
    generations_agree: int
    adapter_effect_max_abs_logit_diff: float
    eos_consistent: bool
    sample_generation: str
    mode: str = "whole"  # how the models were held: "whole" or "bounded" (block by block)
    # MoE: the share of (layer, token) expert choices the merged model makes as base+adapter
    # does (None for a dense model), and the prompt tokens left out of max_abs_logit_diff
    # because some layer sent them to other experts (16-bit rounding flips near-ties).
    routing_agreement: float | None = None
    rerouted_tokens: int = 0
    # What the check cost: measured, so not part of the result two runs agree on.
    seconds: float | None = field(default=None, compare=False)
    peak_ram_bytes: int | None = field(default=None, compare=False)  # the process's peak RSS
    peak_gpu_bytes: int | None = field(default=None, compare=False)  # torch's, all GPUs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MODES = {"whole": "the whole model at a time", "bounded": "one layer at a time"}


def peak_memory_text(report: dict[str, Any]) -> str | None:
    """'0.84 GB RAM, 3.10 GB GPU' from a report's figures (None where not measured)."""
    ram, gpu = report.get("peak_ram_bytes"), report.get("peak_gpu_bytes")
    parts = [f"{ram / 1e9:.2f} GB RAM"] if ram is not None else []
    parts += [f"{gpu / 1e9:.2f} GB GPU"] if gpu else []
    return ", ".join(parts) or None


def check_cost(report: dict[str, Any]) -> str:
    """How the check ran: its mode, peak memory and time, in one line."""
    peak = peak_memory_text(report) or "not measured here"
    seconds = report.get("seconds")
    took = f", {seconds:.1f} s" if seconds is not None else ""
    return f"mode: {report['mode']} ({MODES[report['mode']]}), peak memory {peak}{took}"


def tolerance_for(dtype: str, logit_scale: float) -> float:
    return RELATIVE_TOLERANCE[dtype] * max(1.0, logit_scale)


@contextlib.contextmanager
def _measured(report: dict[str, Any]) -> Iterator[None]:
    """Time and peak memory of what runs inside: the process's peak RSS (VmHWM, reset
    first where Linux allows) and the peak of torch's allocations on the GPUs."""
    import torch

    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False  # the peak would include what ran before: not reported
    gpus = range(torch.cuda.device_count())
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    start = time.perf_counter()
    yield
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["peak_ram_bytes"] = _peak_rss() if reset else None
    report["peak_gpu_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in gpus)


def _peak_rss() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(kib) * 1024 if kib else None


# ---------------------------------------------------------------------------------------
# The check


def _stored_dtype(merged: Path) -> str:
    config = json.loads((Path(merged) / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return dtype if dtype in RELATIVE_TOLERANCE else "float32"


def eos_consistent(merged: Path, tokenizer: Any) -> bool:
    """The tokenizer's EOS must be one that generation stops on, or the model never stops."""
    generation_file = Path(merged) / "generation_config.json"
    if not generation_file.is_file() or tokenizer.eos_token_id is None:
        return False
    eos = json.loads(generation_file.read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return tokenizer.eos_token_id in ids


def _greedy(model: Any, device: Any, ids: Any, max_new_tokens: int, pad_id: int | None) -> Any:
    """The prompt followed by its greedy continuation."""
    import torch

    ids = ids.to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return out[:1].cpu()


def _logits(model: Any, device: Any, ids: Any) -> Any:
    return model(input_ids=ids.to(device)).logits[0].float().cpu()


# A merge that breaks a router or its inputs sends most tokens elsewhere; rounding to 16 bits
# flips only near-ties (1 of 130 choices on a tiny bf16 Gemma 4 with 4 experts, where that one
# token's logits moved 0.16 against a tolerance of 0.03).
ROUTING_AGREEMENT_NEEDED = 0.75


@contextlib.contextmanager
def expert_choices(model: Any) -> Iterator[list[Any]]:
    """Record, per MoE layer as it runs, which experts each token goes to (sorted indices,
    tokens x k): transformers 5's experts modules take the routing as their second argument
    (top_k_index, gpt-oss's router_indices). Models that route otherwise record nothing."""
    import torch

    choices: list[Any] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = (
            args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        )
        if isinstance(index, torch.Tensor) and not index.is_floating_point():
            choices.append(index.reshape(-1, index.shape[-1]).sort(dim=-1).values.cpu())

    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in experts]
    try:
        yield choices
    finally:
        for handle in handles:
            handle.remove()


def _routed_logits(model: Any, device: Any, sequences: list[Any]) -> tuple[list[Any], list[Any]]:
    """Each sequence's logits and its expert choices, layer by layer."""
    logits, routes = [], []
    with expert_choices(model) as choices:
        for sequence in sequences:
            logits.append(_logits(model, device, sequence))
            routes.append(list(choices))
            choices.clear()
    return logits, routes


def _rerouted(reference: list[Any], merged: list[Any], length: int) -> tuple[Any, int, int]:
    """The first `length` tokens some layer routes differently (a bool mask), how many
    (layer, token) choices differ, and how many were compared."""
    import torch

    rerouted = torch.zeros(length, dtype=torch.bool)
    differ = total = 0
    for a, b in zip(reference, merged, strict=True):
        changed = (a[:length] != b[:length]).any(dim=-1)
        rerouted |= changed
        differ, total = differ + int(changed.sum()), total + length
    return rerouted, differ, total


def verify(
    base: str,
    adapter: Path,
    merged: Path,
    prompts: list[str],
    max_new_tokens: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_memory: str | None = None,
) -> VerifyReport:
    """Compare the merged folder with base+adapter. Raises VerificationFailed beyond tolerance.
    `max_memory` ("24GB") caps what the check may hold; below what the whole model needs it
    runs block by block."""
    if not prompts:
        raise UserError("verify needs at least one prompt")
    if not (Path(merged) / "config.json").is_file():
        raise UserError(f"{str(merged)!r} is not a model folder (no config.json)")
    import torch
    from transformers import AutoTokenizer

    from llm_finetune.merge import resolve_base_folder
    from llm_finetune.progress import progress_bar

    tokenizer = AutoTokenizer.from_pretrained(merged)
    encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    free_memory()
    gpus = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    ram = available_ram()  # None where unknown: not a limit, as before the bounded mode
    base_folder = resolve_base_folder(base, revision)
    layout = check_layout(base_folder, adapter, Path(merged))
    plan = plan_memory(layout, gpus, ram if ram is not None else 2**62, max_memory)
    costs: dict[str, Any] = {}
    with _measured(costs), holding(plan.mode, Path(merged)) as offload:

        def load(path: str, adapter: Path | None) -> tuple[Any, Any]:
            if offload is None:
                return load_whole(path, adapter, trust_remote_code=trust_remote_code)
            return load_bounded(path, adapter, plan, offload, trust_remote_code)

        # each prompt: generated by base+adapter, then run through it, the base and the merged
        bar = progress_bar(4 * len(encoded), "verify", "pass")
        reference, device = load(str(base_folder), adapter)
        with torch.inference_mode():
            sequences = [_greedy(reference, device, i, max_new_tokens, pad_id) for i in encoded]
            bar.update(len(encoded))
            ref_logits, ref_routes = _routed_logits(reference, device, sequences)
            bar.update(len(encoded))
            with reference.disable_adapter():
                base_logits = [_logits(reference, device, s) for s in sequences]
            bar.update(len(encoded))
        del reference  # one model in memory at a time
        free_memory()
        merged_model, device = load(str(merged), None)
        with torch.inference_mode():
            merged_logits, merged_routes = _routed_logits(merged_model, device, sequences)
        bar.update(len(encoded))
        bar.close()
        del merged_model
        free_memory()

    lengths = [ids.shape[1] for ids in encoded]
    prompt_logits = [
        (ref[:n], mine[:n]) for ref, mine, n in zip(ref_logits, merged_logits, lengths, strict=True)
    ]
    routed = [
        _rerouted(theirs, mine, n)
        for theirs, mine, n in zip(ref_routes, merged_routes, lengths, strict=True)
    ]
    kept = [~rerouted for rerouted, _, _ in routed]
    if not any(k.any() for k in kept):  # nothing routed alike: compare every token
        kept = [torch.ones_like(k) for k in kept]
    diff = max(
        float((a - b)[k].abs().max()) if k.any() else 0.0
        for (a, b), k in zip(prompt_logits, kept, strict=True)
    )
    choices = sum(total for _, _, total in routed)
    agreement = 1 - sum(differ for _, differ, _ in routed) / choices if choices else None
    effect = max(
        float((ref[:n] - b[:n]).abs().max())
        for ref, b, n in zip(ref_logits, base_logits, lengths, strict=True)
    )
    scale = max(float(a.abs().max()) for a, _ in prompt_logits)
    merged_generations = [
        _merged_choices(s, logits, n)
        for s, logits, n in zip(sequences, merged_logits, lengths, strict=True)
    ]
    agree = sum(
        mine == s[0, n:].tolist()
        for mine, s, n in zip(merged_generations, sequences, lengths, strict=True)
    )
    dtype = _stored_dtype(merged)
    tolerance = tolerance_for(dtype, scale)
    report = VerifyReport(
        dtype=dtype,
        prompts=len(prompts),
        max_abs_logit_diff=diff,
        logit_scale=scale,
        tolerance=tolerance,
        passed=diff <= tolerance and (agreement is None or agreement >= ROUTING_AGREEMENT_NEEDED),
        generations_agree=agree,
        adapter_effect_max_abs_logit_diff=effect,
        eos_consistent=eos_consistent(merged, tokenizer),
        sample_generation=tokenizer.decode(merged_generations[0], skip_special_tokens=True),
        mode=plan.mode,
        routing_agreement=agreement,
        rerouted_tokens=sum(int(rerouted.sum()) for rerouted, _, _ in routed),
        **costs,
    )
    if not report.passed:
        differs = (
            f"max |Δlogit| {diff:.3g} > tolerance {tolerance:.3g} for {dtype}"
            if diff > tolerance
            else f"it sends {1 - agreement:.0%} of the tokens' expert choices elsewhere"
        )
        raise VerificationFailed(
            f"merged model differs from base+adapter: {differs}; the adapter is kept, re-run "
            "the merge (llm-finetune merge) from the original 16-bit base"
        )
    return report


def _merged_choices(sequence: Any, logits: Any, prompt_length: int) -> list[int]:
    """The merged model's greedy tokens along base+adapter's continuation, up to and
    including the first one that differs (where its own generation would part)."""
    continuation = sequence[0, prompt_length:].tolist()
    choices = logits[prompt_length - 1 : -1].argmax(dim=-1).tolist()
    for i, (mine, theirs) in enumerate(zip(choices, continuation, strict=True)):
        if mine != theirs:
            return choices[: i + 1]
    return choices


def verify_in_fresh_process(
    base: str,
    adapter: Path,
    merged: Path,
    prompts: list[str],
    max_new_tokens: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_memory: str | None = None,
) -> VerifyReport:
    """`verify` in a child process: stock transformers and peft, as a user loads the model.

    For a process that imported Unsloth, which on GPUs patches transformers' Llama classes
    and peft's forward for every model loaded after it, not only its own.
    """
    free_memory()  # the child places its models on what this process leaves free
    request = [
        base,
        str(adapter),
        str(merged),
        prompts,
        max_new_tokens,
        revision,
        trust_remote_code,
        max_memory,
    ]
    child = subprocess.run(
        [sys.executable, "-m", "llm_finetune.verify", json.dumps(request)],
        capture_output=True,
        text=True,
    )
    lines = child.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if child.returncode in (0, 2) and lines else None
    if answer is None:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the verification process failed ({child.returncode}): {last}")
    if "error" in answer:
        failure = VerificationFailed if answer["failed"] else UserError
        raise failure(answer["error"])
    return VerifyReport(**answer)


def _main(request: str) -> int:
    """The child of `verify_in_fresh_process`: one JSON line on stdout, the report or the error."""
    base, adapter, merged, prompts, max_new_tokens, revision, trust, cap = json.loads(request)
    try:
        report = verify(
            base, Path(adapter), Path(merged), prompts, max_new_tokens, revision, trust, cap
        )
    except UserError as exc:
        print(json.dumps({"error": str(exc), "failed": isinstance(exc, VerificationFailed)}))
        return 2
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
