"""The safetensors exports (fp32, merged_4bit) and the runner that checks them with transformers.

fp32 is our streaming merge done at float32 from the base and the adapter, so it holds the
exact merged weights rather than an upcast of the 16-bit rounding. merged_4bit is the 16-bit
merged model quantized by bitsandbytes (NF4, double quantization, bfloat16 compute) as
transformers loads it, saved so that a plain `from_pretrained(folder)` loads it again.
"""

from __future__ import annotations

import gc
import importlib.metadata
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_finetune.errors import UserError

BITSANDBYTES_MIN = "0.49"  # the first release whose 4-bit layers run on the CPU


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def bitsandbytes_problem() -> str | None:
    """Why merged_4bit cannot be written here, in one line with the command that fixes it;
    None when it can. Reads the installed version only (importing bitsandbytes is slow)."""
    from packaging.version import Version

    version = _installed_version("bitsandbytes")
    fix = (
        f"pip install -U 'bitsandbytes>={BITSANDBYTES_MIN}', "
        "or remove merged_4bit from export.formats"
    )
    if version is None:
        return f"export.formats: merged_4bit needs bitsandbytes, which is not installed: {fix}"
    if Version(version) < Version(BITSANDBYTES_MIN):
        return (
            f"export.formats: merged_4bit needs bitsandbytes >= {BITSANDBYTES_MIN} (it runs on "
            f"the CPU from then on), {version} is installed: {fix}"
        )
    return None


class TransformersRunner:
    """A Runner (see checks.Runner) for a model transformers loads: a model folder (16-bit,
    fp32, or a bitsandbytes 4-bit one), base + adapter through peft with the adapter not
    merged (the `lora` format as users load it), or a model already in memory.

    Weights are held in float32 where they are not quantized (16-bit ones upcast exactly);
    4-bit layers compute in the dtype their folder says. Greedy generation is a plain argmax
    loop, so no generation_config setting (repetition penalty, sampling) changes it; it stops
    at `eos_ids`, by default the model's generation_config EOS ids.
    """

    def __init__(
        self,
        model: str | Path | Any,
        adapter: Path | None = None,
        device: str = "cpu",
        eos_ids: Sequence[int] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        import torch

        if isinstance(model, (str, Path)):
            from llm_finetune.checkpoint_names import load_pretrained

            model = load_pretrained(
                str(model),
                revision=revision,
                dtype=torch.float32,
                device_map={"": device},
                trust_remote_code=trust_remote_code,
            )
            _avoid_bitsandbytes_cpu_packing(model)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.device = self.model.device
        if eos_ids is None:
            eos = self.model.generation_config.eos_token_id
            eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        self.eos_ids = set(eos_ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        import torch

        new: list[int] = []
        inputs, cache = torch.tensor([ids], device=self.device), None
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                new.append(token)
                if token in self.eos_ids:
                    break
                inputs = torch.tensor([[token]], device=self.device)
        return new

    def close(self) -> None:
        from llm_finetune.verify_memory import free_memory

        del self.model
        gc.collect()
        free_memory()


def _avoid_bitsandbytes_cpu_packing(model: Any) -> None:
    """bitsandbytes 0.50's packed CPU kernel (used on CPUs with AVX512-BF16) assumes a layer's
    input size is a multiple of its quantization block and fails on others (a tiny model's
    352): those layers take its generic path, which computes the same product."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False


def write_fp32(
    base_path: str,
    revision: str | None,
    adapter: Path,
    target: Path,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Any:
    """The fp32 export: base + adapter merged at float32 by our streaming merge (atomic, the
    tokenizer and EOS-aligned generation config with it); returns merge's MergeReport."""
    from llm_finetune.merge import merge

    return merge(
        base_path,
        adapter,
        target,
        dtype="float32",
        overwrite=overwrite,
        revision=revision,
        progress=progress,
    )


def write_merged_4bit(
    merged: Path, target: Path, overwrite: bool = False, device: str = "cpu"
) -> None:
    """The merged_4bit export: `merged` quantized by bitsandbytes to NF4 (double quantization,
    bfloat16 compute) on `device`, saved as safetensors with the merged folder's tokenizer
    files and generation_config.json copied byte for byte; written in a folder beside
    `target` and renamed into place when complete."""
    problem = bitsandbytes_problem()
    if problem is not None:
        raise UserError(problem)
    import torch
    from transformers import BitsAndBytesConfig

    from llm_finetune.checkpoint_names import load_pretrained
    from llm_finetune.fsutil import atomic_dir, check_free_disk
    from llm_finetune.tokenizer_files import is_tokenizer_file

    merged, target = Path(merged), Path(target)
    size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    check_free_disk(target, size // 2, "the merged_4bit export")  # 4-bit layers, 16-bit rest
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with atomic_dir(target, overwrite=overwrite, what="merged_4bit export") as staging:
        model = load_pretrained(
            str(merged), quantization_config=nf4, dtype=torch.bfloat16, device_map={"": device}
        )
        model.save_pretrained(staging)
        del model
        for path in merged.iterdir():
            if is_tokenizer_file(path.name):
                shutil.copy2(path, staging / path.name)
        if (merged / "generation_config.json").is_file():
            shutil.copy2(merged / "generation_config.json", staging / "generation_config.json")
