"""The GGUF toolchain tried end to end on a model of a few hundred kilobytes, before training:
llama.cpp's converter, its quantizer and its runtime (each in a child process), their logits
compared with transformers'. A toolchain that is missing, built for another CPU, crashes
(ggml's AMX kernels on Sapphire Rapids Xeons) or computes wrong logits is then one line with
the fix, not a rejected export after the GPU hours.

A pass is remembered per (llama.cpp build, CPU, types tried): later runs on the same machine
skip it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.exports import gguf
from llm_finetune.exports.llama_child import LlamaCppChild

FIX = f"run `{gguf.SETUP_COMMAND}` (it builds llama.cpp for any x86-64 CPU, AMX kernels off)"
STAMPS = gguf.CONVERTER_DIR / ".selftest"  # one empty file per pass: its name is the key
ALWAYS_TRIED = ("f32", "q8_0", "q4_k_m")
# ||llama.cpp - transformers|| / ||transformers|| of this model's logits, by type. Measured
# (2 cores, x86-64-v3 build): f32 5e-4, f16 1e-3, bf16 8e-3, q8_0 2e-2, q6_k 8e-2,
# q4_k_m 0.24, q2_k 0.85. A kernel that computes zeros or garbage gives 1 or more.
TOLERANCE = {"f32": 5e-3, "f16": 1e-2, "bf16": 3e-2, "q8_0": 0.08, "q6_k": 0.25}
TOLERANCE_BY_PREFIX = {"q5": 0.4, "q4": 0.6}
LOOSE_TOLERANCE = 1.2  # fewer bits than 4: only NaN, inf and garbage are caught
TEXT = "Write the number 47 in words.\n\n### Response:\nforty-seven"


def selftest_problem(gguf_types: Sequence[str] = ()) -> str | None:
    """None when llama.cpp converts, quantizes to `gguf_types` (and f32, q8_0, q4_k_m) and
    runs a tiny model as transformers does; else one line with what failed and the fix."""
    types = tuple(dict.fromkeys([*ALWAYS_TRIED, *gguf_types]))
    if problem := gguf.toolchain_problem():
        return problem
    stamp = STAMPS / _machine_key(types)
    if stamp.is_file():
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="llm-finetune-selftest-") as work:
            _selftest(Path(work), types)
    except UserError as exc:
        return f"the GGUF toolchain failed its self-test: {exc}: {FIX}"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return None


def _machine_key(types: tuple[str, ...]) -> str:
    """What a pass depends on: the installed libllama files, this CPU, the types tried."""
    package = Path(importlib.metadata.distribution("llama_cpp_python").locate_file("llama_cpp"))
    libraries = sorted(
        (str(f.relative_to(package)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in package.rglob("*.so*")
    )
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    key = repr((libraries, cpu, types, [tolerance(t) for t in types]))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _selftest(work: Path, types: tuple[str, ...]) -> None:
    folder, ids, reference = _tiny_model(work / "model")
    files = {"f32": work / "selftest-F32.gguf"}
    gguf.convert(folder, files["f32"], "f32", pre_tokenizer="qwen2")
    with LlamaCppChild(files["f32"]) as child:
        info = child.call("system_info")
    if "AMX_INT8 = 1" in info or "AMX = 1" in info:
        raise UserError(
            "the installed llama-cpp-python runs ggml's AMX kernels, which crash on Q8_0 and "
            "K-quant files (llama.cpp issue 20824)"
        )
    for gguf_type in types:
        if gguf_type != "f32":  # quantized from the f32 file: one conversion, one torch import
            files[gguf_type] = work / f"selftest-{gguf_type.upper()}.gguf"
            gguf.quantize(files["f32"], files[gguf_type], gguf_type)
    for gguf_type, file in files.items():
        error = _relative_error(file, ids, reference)
        limit = tolerance(gguf_type)
        if not error <= limit:  # NaN fails too
            raise UserError(
                f"llama.cpp's {gguf_type} logits differ from transformers' by {error:.3g} "
                f"(relative; expected at most {limit:g})"
            )


def tolerance(gguf_type: str) -> float:
    """The largest relative logits error a correct llama.cpp gives `gguf_type` here."""
    if gguf_type in TOLERANCE:
        return TOLERANCE[gguf_type]
    return TOLERANCE_BY_PREFIX.get(gguf_type[:2], LOOSE_TOLERANCE)


def _relative_error(file: Path, ids: list[int], reference: Any) -> float:
    import numpy as np

    runner = gguf.LlamaCppRunner(file, n_ctx=len(ids) + 1)
    try:
        logits = runner.logits(ids)
    finally:
        runner.close()
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


def _tiny_model(folder: Path) -> tuple[Path, list[int], Any]:
    """A one-layer Llama with the demo's tokenizer, rows of 256 (K-quant blocks), saved in
    float32; the ids of TEXT and transformers' float32 logits for them."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_finetune.demo import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)  # the weights written directly: no progress bar
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    return folder, ids, reference
