"""Merge a LoRA adapter into the ORIGINAL 16-bit base weights and save a plain model folder.

The arithmetic runs in float32 (the base is loaded in float32 and peft folds
W + scale·B@A there), and the result is cast once to the target dtype, so the merged model
differs from base+adapter only by that final rounding. The folder is written beside the
target and renamed into place when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.fsutil import atomic_dir

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class MergeReport:
    output: str
    dtype: str
    base: str
    adapter: str
    lora_modules_merged: int
    merged_from: str
    eos_fixes: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"{str(adapter_dir)!r} is not a LoRA adapter folder (no adapter_config.json); "
            "pass the folder that `save_pretrained` of a peft model wrote"
        )
    return json.loads(config_file.read_text())


def refuse_quantized_base(base_config: Any, base: str) -> None:
    if getattr(base_config, "quantization_config", None):
        raise UserError(
            f"base {base!r} is a quantized checkpoint; merging into dequantized weights loses "
            "precision: pass the original 16-bit base model instead"
        )


def align_eos(model: Any, tokenizer: Any) -> list[str]:
    """Make config, generation_config and tokenizer agree on EOS/PAD; return what changed.

    A model fine-tuned with `text + tokenizer.eos_token` stops only if generation stops on
    that id, so it must be among generation_config's EOS ids.
    """
    fixes: list[str] = []
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        return fixes
    generation = model.generation_config
    current = generation.eos_token_id
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    if eos_id not in ids:
        generation.eos_token_id = eos_id if not ids else [*ids, eos_id]
        fixes.append(f"generation_config.eos_token_id += {eos_id} (the tokenizer's EOS)")
    if model.config.eos_token_id is None:
        model.config.eos_token_id = eos_id
        fixes.append(f"config.eos_token_id = {eos_id}")
    pad_id = tokenizer.pad_token_id
    if pad_id is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad_id
        fixes.append(f"generation_config.pad_token_id = {pad_id}")
    return fixes


def merge(
    base: str,
    adapter: Path,
    output: Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge `adapter` into `base` and write a standalone model into `output`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    adapter = Path(adapter)
    output = Path(output)
    read_adapter_config(adapter)
    start = time.perf_counter()

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base_config = AutoConfig.from_pretrained(
        base, revision=revision, trust_remote_code=trust_remote_code
    )
    refuse_quantized_base(base_config, base)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    with atomic_dir(output, overwrite=overwrite, what="merged model folder") as staging:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source, revision=None if tokenizer_source == adapter else revision
        )
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, revision=revision, trust_remote_code=trust_remote_code
        )
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        lora_modules = sum(1 for name, _ in peft_model.named_modules() if name.endswith("lora_A"))
        merged = peft_model.merge_and_unload()
        merged = merged.to(getattr(torch, dtype))
        merged.config.dtype = dtype
        fixes = align_eos(merged, tokenizer)
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return MergeReport(
        output=str(output),
        dtype=dtype,
        base=str(base),
        adapter=str(adapter),
        lora_modules_merged=lora_modules,
        merged_from="original 16-bit base weights, upcast to float32 (peft merge_and_unload)",
        eos_fixes=fixes,
        seconds=round(time.perf_counter() - start, 3),
    )
