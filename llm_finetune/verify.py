"""Prove the merged model is what was trained: merged vs base+adapter (peft) on fixed prompts.

Both sides run in float32 (the merged weights upcast exactly as stored), one model in memory
at a time, so the difference measured is the merge and its final rounding, not bf16 compute
noise. The tolerance scales with the stored dtype's precision and the logits' magnitude. It
also measures base vs base+adapter, so an adapter that changes nothing (an untrained or
wrongly loaded one) is reported instead of passing silently.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tolerance_for(dtype: str, logit_scale: float) -> float:
    return RELATIVE_TOLERANCE[dtype] * max(1.0, logit_scale)


def memory_needed(parameters: int) -> int:
    """Bytes to verify a model: one float32 copy at a time (4 bytes a parameter), plus 10%
    for the adapter, activations and the placement's headroom."""
    return int(4 * parameters * 1.1)


def available_memory() -> tuple[int, int | None]:
    """(bytes of all visible GPUs, bytes of RAM available now or None where unknown): what
    `device_map="auto"` can place a model on."""
    import torch

    gpu = sum(
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    )
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return gpu, None
    kib = next(
        (line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None
    )
    return gpu, int(kib) * 1024 if kib else None


def free_memory() -> None:
    """Collect garbage and hand torch's cached GPU memory back (for others to place on)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_float32(path: str | Path, **kwargs: Any) -> Any:
    """A model in float32: on the CPU, or spread over every visible GPU and then CPU RAM.

    Spreading it is what lets a model far bigger than one GPU verify in float32 on the node
    that trained it (the other processes of a multi-GPU run have freed their GPUs by then).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        free_memory()  # what training left in torch's cache counts as used when placing
        kwargs["device_map"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


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


def _run(model: Any, encoded: list[Any], max_new_tokens: int, pad_id: int | None):
    """Logits on each prompt and the greedy continuation of each."""
    import torch

    logits, generations = [], []
    with torch.inference_mode():
        for ids in encoded:
            ids = ids.to(model.device)
            logits.append(model(input_ids=ids).logits[0].float().cpu())
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            generations.append(out[0, ids.shape[1] :].cpu().tolist())
    return logits, generations


def verify(
    base: str,
    adapter: Path,
    merged: Path,
    prompts: list[str],
    max_new_tokens: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Compare the merged folder with base+adapter. Raises VerificationFailed beyond tolerance."""
    if not prompts:
        raise UserError("verify needs at least one prompt")
    if not (Path(merged) / "config.json").is_file():
        raise UserError(f"{str(merged)!r} is not a model folder (no config.json)")
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    base_model = _load_float32(base, revision=revision, trust_remote_code=trust_remote_code)
    reference = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    ref_logits, ref_generations = _run(reference, encoded, max_new_tokens, pad_id)
    with reference.disable_adapter():
        base_logits, _ = _run(reference, encoded, 1, pad_id)
    del reference, base_model  # one model in memory at a time
    free_memory()

    merged_model = _load_float32(merged, trust_remote_code=trust_remote_code)
    merged_logits, merged_generations = _run(merged_model, encoded, max_new_tokens, pad_id)
    del merged_model
    free_memory()

    diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits, merged_logits, strict=True))
    effect = max(float((a - b).abs().max()) for a, b in zip(ref_logits, base_logits, strict=True))
    scale = max(float(t.abs().max()) for t in ref_logits)
    dtype = _stored_dtype(merged)
    tolerance = tolerance_for(dtype, scale)
    agree = sum(a == b for a, b in zip(ref_generations, merged_generations, strict=True))
    report = VerifyReport(
        dtype=dtype,
        prompts=len(prompts),
        max_abs_logit_diff=diff,
        logit_scale=scale,
        tolerance=tolerance,
        passed=diff <= tolerance,
        generations_agree=agree,
        adapter_effect_max_abs_logit_diff=effect,
        eos_consistent=eos_consistent(merged, tokenizer),
        sample_generation=tokenizer.decode(merged_generations[0], skip_special_tokens=True),
    )
    if not report.passed:
        raise VerificationFailed(
            f"merged model differs from base+adapter: max |Δlogit| {diff:.3g} > tolerance "
            f"{tolerance:.3g} for {dtype}; the adapter is kept, re-run the merge "
            "(llm-finetune merge) from the original 16-bit base"
        )
    return report


def verify_in_fresh_process(
    base: str,
    adapter: Path,
    merged: Path,
    prompts: list[str],
    max_new_tokens: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
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
    base, adapter, merged, prompts, max_new_tokens, revision, trust = json.loads(request)
    try:
        report = verify(base, Path(adapter), Path(merged), prompts, max_new_tokens, revision, trust)
    except UserError as exc:
        print(json.dumps({"error": str(exc), "failed": isinstance(exc, VerificationFailed)}))
        return 2
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
