"""Streaming LoRA merge: shard by shard, tensor by tensor, into the ORIGINAL 16-bit base.

W' = W + s·B@A with s = alpha/r (alpha/√r for rsLoRA), computed in float32 from the base's
stored weights and cast once to the target dtype; peft's other layouts too: `fan_in_fan_out`
(transposed), DoRA (rescaled by its magnitude vector), embedding LoRA ((B@A)ᵀ), `lora_bias`,
`modules_to_save` and `bias` (replacing the base tensor), `rank_pattern`/`alpha_pattern`, and
tied embeddings. Peak memory is about the largest tensor plus the adapter, not the model:
tensors without LoRA are copied as raw bytes. The output is written beside its final path
and renamed into place only when complete.

Before a byte is written, the adapter is checked as peft loads it (`llm_finetune.adapter`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_finetune.adapter import HEAD, Adapter, LoraModule, read_adapter, read_adapter_config
from llm_finetune.errors import UserError, first_line
from llm_finetune.fsutil import (
    atomic_dir,
    check_free_disk,
    check_output_folder,
    looks_like_local_path,
    read_json_object,
)
from llm_finetune.tokenizer_files import copy_tokenizer, special_token_id

DTYPES = ("bfloat16", "float16", "float32")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING_SUFFIXES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
BASE_FILES = ["*.safetensors", "*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


@dataclass
class MergeReport:
    output: str
    dtype: str
    base: str
    adapter: str
    lora_modules_found: int
    lora_modules_merged: int
    tensors_replaced: int
    shards: int
    bytes_written: int
    merged_from: str
    untied_embeddings: bool
    eos_fixes: list[str] = field(default_factory=list)
    tokenizer_from_base: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# The arithmetic (float32)


def merged_weight(
    weight: Any, lora: LoraModule, fan_in_fan_out: bool, rows: slice = slice(None)
) -> Any:
    """peft's merge of one module in float32, IN PLACE on `weight` (which the caller owns).

    `weight` holds rows `rows` of the weight as stored, so a large tensor can be merged one
    block of rows at a time. Stored layouts: Linear (out, in): + s·B@A; Conv1D with
    `fan_in_fan_out` (in, out) and Embedding (num, dim): + s·(B@A)ᵀ; DoRA then rescales each
    output to its learned magnitude.
    """
    import torch

    a, b, scale = lora.lora_a.float(), lora.lora_b.float(), lora.scale
    transposed = lora.kind == "embedding" or fan_in_fan_out
    if transposed:
        weight.addmm_(a[:, rows].T, b.T, alpha=scale)
    else:
        weight.addmm_(b[rows], a, alpha=scale)
    if lora.magnitude is not None:  # outputs are rows, or columns when transposed
        magnitude = lora.magnitude.float()
        if transposed:
            weight.mul_((magnitude / torch.linalg.norm(weight, dim=0)).view(1, -1))
        else:
            weight.mul_((magnitude[rows] / torch.linalg.norm(weight, dim=1)).view(-1, 1))
    return weight


# ---------------------------------------------------------------------------------------
# The base checkpoint


def resolve_base_folder(base: str, revision: str | None, patterns: list[str] = BASE_FILES) -> Path:
    """A local folder as is; a Hub id downloaded once (`patterns`: weights, config, tokenizer).
    A name that looks like a path (`./x`, `/x`, `x/`, an existing parent) is never looked up."""
    local = Path(base).expanduser()
    if local.is_dir():
        return local
    if looks_like_local_path(base):
        what = "is not a folder" if local.exists() else "does not exist"
        raise UserError(
            f"base {base!r} {what}; pass the base model's folder, or a Hub id such as "
            "meta-llama/Llama-3.1-8B"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the user needs the reason, in one line
        reason = first_line(exc)
        raise UserError(f"base {base!r}: cannot download it: {reason}") from None


BASE_FIX = "download or copy the base model again"


def base_shards(folder: Path) -> list[Path]:
    """The base's safetensors files; they are checked when their headers are read."""
    index = folder / INDEX_FILE
    if index.is_file() or index.is_symlink():
        weight_map = read_json_object(index, BASE_FIX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
            for name in weight_map.values()
        ):
            raise UserError(
                f"{index}: weight_map is not a map from tensor names to file names in the "
                f"folder; {BASE_FIX}"
            )
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.is_file() or single.is_symlink():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise UserError(
            f"base {str(folder)!r} has only pickle (.bin) weights; convert it to safetensors "
            "(load it and save_pretrained(..., safe_serialization=True)) and merge into that"
        )
    raise UserError(f"base {str(folder)!r} has no model.safetensors or {INDEX_FILE}")


def refuse_quantized_base(config: dict[str, Any], base: str) -> None:
    if not config.get("quantization_config"):
        return
    if is_mxfp4(config):
        raise UserError(
            f"base {base!r} stores its experts in MXFP4, gpt-oss's release format; LoRA is "
            "merged into 16-bit weights: pass a bf16 copy (unsloth/gpt-oss-20b-BF16, or load "
            "it with Mxfp4Config(dequantize=True) and save_pretrained)"
        )
    raise UserError(
        f"base {base!r} is a quantized checkpoint; merging into dequantized weights loses "
        "precision: pass the original 16-bit base model instead"
    )


def is_mxfp4(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"


def _tied(config: dict[str, Any]) -> bool:
    text = config.get("text_config")
    text = text if isinstance(text, dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


# ---------------------------------------------------------------------------------------
# Planning: which base tensor receives what, checked before a byte is written


@dataclass
class Plan:
    headers: dict[str, Any]  # shard file name -> Header
    where: dict[str, str]  # tensor name -> shard file name
    changes: dict[str, list[LoraModule]]  # tensor -> LoRA modules applied to it
    replacements: dict[str, Any]
    bias_updates: dict[str, LoraModule]  # bias tensor -> module whose lora_B.bias adds to it
    untie: bool
    output_bytes: int


def _embedding_key(names: set[str]) -> str | None:
    for name in sorted(names):
        if name.endswith(tuple(f"{s}.weight" for s in EMBEDDING_SUFFIXES)):
            return name
    return None


def plan_merge(
    adapter: Adapter,
    shards: list[Path],
    base_config: dict[str, Any],
    dtype: str,
    fan_in_fan_out: bool,
    config_folder: Path,
) -> Plan:
    from llm_finetune.safetensors_stream import element_size, read_header, safetensors_code

    headers = {p.name: read_header(p) for p in shards}
    where: dict[str, str] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            if where.setdefault(name, shard) != shard:
                raise UserError(
                    f"base tensor {name} is in both {where[name]} and {shard}: the shards come "
                    f"from different downloads; {BASE_FIX}"
                )
    adapter = _on_checkpoint_names(adapter, set(where), config_folder)
    changes: dict[str, list[LoraModule]] = {}
    for key, lora in adapter.modules.items():
        if key in adapter.replacements:
            raise UserError(f"{lora.module} is both LoRA-adapted and replaced; cannot merge")
        changes.setdefault(key, []).append(lora)
    if adapter.parameters:
        from llm_finetune.parameter_lora import place

        shapes = {name: headers[shard].tensors[name].shape for name, shard in where.items()}
        for key, updates in place(adapter.parameters, shapes, config_folder).items():
            if key in adapter.replacements:
                raise UserError(f"{key} is both LoRA-adapted and replaced; cannot merge")
            changes.setdefault(key, []).extend(updates)
    _refuse_non_float_targets(headers, where, [*changes, *adapter.replacements])
    replacements = dict(adapter.replacements)
    embedding = _embedding_key(set(where))
    tied = _tied(base_config) and embedding is not None
    untie = False
    if tied and {embedding, HEAD} & (set(changes) | set(replacements)):
        untie = _resolve_tied(headers, where, embedding, changes, replacements, fan_in_fan_out)
    unmatched = [
        k for k in [*changes, *replacements] if k not in where and not (k == HEAD and untie)
    ]
    if unmatched:
        raise UserError(
            f"{len(unmatched)} adapter tensor(s) match no base tensor, e.g. {unmatched[:3]}: "
            "the adapter was trained on a different base model; pass the base it was trained on"
        )
    bias_updates = {}
    for target, loras in changes.items():
        base_info = headers[where[target]].tensors[target]
        for lora in loras:
            _check_shape(lora, base_info, fan_in_fan_out)
            if lora.bias is not None:
                bias_key = target.removesuffix(".weight") + ".bias"
                if bias_key not in where:
                    raise UserError(f"{lora.module} has a LoRA bias but the base layer has no bias")
                if bias_key in replacements:
                    raise UserError(
                        f"{lora.module}: its bias is both trained whole (bias) and adapted "
                        "(lora_bias); cannot merge"
                    )
                _refuse_non_float_targets(headers, where, [bias_key])
                bias_updates[bias_key] = lora
    for key, tensor in replacements.items():
        if key in where and tuple(tensor.shape) != headers[where[key]].tensors[key].shape:
            shape = headers[where[key]].tensors[key].shape
            raise _vocabulary_error(key, tuple(tensor.shape), shape)
    target_size = element_size(safetensors_code(dtype))
    output_bytes = sum(
        math.prod(i.shape) * target_size if i.dtype in FLOAT_DTYPES else i.nbytes
        for h in headers.values()
        for i in h.tensors.values()
    )
    if untie and HEAD not in where:
        output_bytes += math.prod(replacements[HEAD].shape) * target_size
    return Plan(headers, where, changes, replacements, bias_updates, untie, output_bytes)


def read_adapter_for(adapter: Path, base_folder: Path) -> Adapter:
    """`read_adapter`, its LoRA on parameters (MoE experts) read against the wrappers peft
    builds on this base."""
    wrappers = None
    if read_adapter_config(adapter).get("target_parameters"):
        from llm_finetune.parameter_lora import adapter_wrappers

        wrappers = adapter_wrappers(adapter, base_folder)
    return read_adapter(adapter, wrappers)


def _on_checkpoint_names(adapter: Adapter, stored: set[str], config_folder: Path) -> Adapter:
    """The adapter keyed by the names the checkpoint stores, where transformers loads it under
    others (image-text checkpoints, Qwen3.5 as a causal LM, GPT-NeoX's head)."""
    from llm_finetune.checkpoint_names import checkpoint_names

    names = checkpoint_names([*adapter.modules, *adapter.replacements], stored, str(config_folder))
    if not names:
        return adapter
    return Adapter(
        adapter.config,
        {names.get(k, k): v for k, v in adapter.modules.items()},
        {names.get(k, k): v for k, v in adapter.replacements.items()},
        adapter.parameters,
    )


def _refuse_non_float_targets(
    headers: dict[str, Any], where: dict[str, str], keys: list[str]
) -> None:
    """Base tensors the adapter changes must be floating point: integer or packed weights are
    a quantized checkpoint, which the merge would have to dequantize."""
    for key in keys:
        info = headers[where[key]].tensors[key] if key in where else None
        if info is not None and info.dtype not in FLOAT_DTYPES:
            raise UserError(
                f"{headers[where[key]].path}: {key}, which the adapter changes, is stored as "
                f"{info.dtype}: a quantized checkpoint; pass the original 16-bit base model"
            )


def _resolve_tied(
    headers: dict[str, Any],
    where: dict[str, str],
    embedding: str,
    changes: dict[str, list[LoraModule]],
    replacements: dict[str, Any],
    fan_in_fan_out: bool,
) -> bool:
    """Work out the embedding and the head of a tied model as peft's forward pass sees them.

    peft adapts the input embedding and the output head separately (unless
    `ensure_weight_tying` gave both the same adapter). When the two come out equal the model
    stays tied; otherwise each gets its own weight and the config is untied. Returns whether
    it untied.
    """
    import torch

    from llm_finetune.safetensors_stream import open_for_reading, read_rows

    header = headers[where[embedding]]
    with open_for_reading(header.path) as f:
        shared = read_rows(f, header.tensors[embedding]).float()

    def effective(key: str) -> Any:
        if key in replacements:
            return replacements[key].float()
        weight = shared.clone()
        for lora in changes.pop(key, []):
            _check_shape(lora, header.tensors[embedding], fan_in_fan_out)
            if lora.base_copy is not None:
                weight = lora.base_copy.to(torch.float32, copy=True)
            weight = merged_weight(weight, lora, fan_in_fan_out)
        return weight

    embedding_weight, head_weight = effective(embedding), effective(HEAD)
    replacements[embedding] = embedding_weight
    tied = torch_equal(embedding_weight, head_weight)
    if not tied or HEAD in where:
        replacements[HEAD] = head_weight
    return not tied


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def _vocabulary_error(key: str, adapter_shape: tuple, base_shape: tuple) -> UserError:
    return UserError(
        f"{key}: the adapter has shape {list(adapter_shape)} but the base has {list(base_shape)}: "
        "the adapter was trained after resize_token_embeddings; resize the base the same way "
        "(model.resize_token_embeddings(n); save_pretrained) and merge into that"
    )


def _check_shape(lora: LoraModule, base: Any, fan_in_fan_out: bool) -> None:
    stored = base.shape if lora.expert is None else base.shape[1:]
    if lora.kind == "embedding":
        shape = (lora.lora_a.shape[1], lora.lora_b.shape[0])
    else:
        shape = (lora.lora_b.shape[0], lora.lora_a.shape[1])
        if fan_in_fan_out:
            shape = shape[::-1]
    if lora.base_copy is not None and tuple(lora.base_copy.shape) != base.shape:
        raise _vocabulary_error(f"{lora.module}.weight", tuple(lora.base_copy.shape), base.shape)
    if shape != stored:
        raise UserError(
            f"{lora.module}: LoRA shape {list(shape)} does not fit the base weight "
            f"{list(stored)}; the adapter was trained on a different base model"
        )


# ---------------------------------------------------------------------------------------
# Writing


def _write_shards(
    plan: Plan, staging: Path, dtype: str, fan_in_fan_out: bool, progress: Callable[[str], None]
) -> tuple[int, dict[str, str]]:
    from llm_finetune.progress import progress_bar
    from llm_finetune.safetensors_stream import ShardWriter, open_for_reading, safetensors_code

    target_name = safetensors_code(dtype)
    weight_map: dict[str, str] = {}
    written = 0
    shard_names = list(plan.headers)
    untied_head = plan.untie and HEAD not in plan.where  # one more tensor, in the last shard
    tensors = sum(len(header.tensors) for header in plan.headers.values()) + int(untied_head)
    bar = progress_bar(tensors, "merge", "tensor")
    for number, shard in enumerate(shard_names, 1):
        header = plan.headers[shard]
        names = list(header.tensors)
        if plan.untie and HEAD not in plan.where and number == len(shard_names):
            names.append(HEAD)  # the untied head lands in the last shard
        layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in names:
            info = header.tensors.get(name)
            if info is None or info.dtype in FLOAT_DTYPES:
                shape = tuple(plan.replacements[name].shape) if info is None else info.shape
                layout[name] = (target_name, shape)
            else:
                layout[name] = (info.dtype, info.shape)
        writer = ShardWriter(staging / shard, layout, {"format": "pt"})
        try:
            with open_for_reading(header.path) as source:
                for name in names:
                    info = header.tensors.get(name)
                    changed = name in plan.replacements or name in plan.changes
                    if changed or name in plan.bias_updates or info.dtype != layout[name][0]:
                        blocks = _output_blocks(plan, name, source, info, fan_in_fan_out, dtype)
                        writer.write(name, blocks)
                    else:
                        writer.copy_raw(name, source, info)
                    weight_map[name] = shard
                    bar.update()
        except BaseException:
            writer.abort()
            bar.close()
            raise
        writer.close()
        written += (staging / shard).stat().st_size
        progress(f"    merged shard {number}/{len(shard_names)}: {shard}")
    bar.close()
    return written, weight_map


# Rows are merged in float32 blocks of this size: small enough to stay in a core's L2 cache
# through read -> float32 -> addmm -> cast (2x faster than 16 MiB blocks, measured), large
# enough that per-block Python overhead stays small.
BLOCK_BYTES = 512 << 10


def _output_blocks(
    plan: Plan, name: str, source: Any, info: Any, fan_in_fan_out: bool, dtype: str
) -> Iterator[Any]:
    """The output tensor in blocks of rows: peak memory stays ~BLOCK_BYTES, whatever its size."""
    import torch

    from llm_finetune.safetensors_stream import read_rows

    target = getattr(torch, dtype)
    if name in plan.replacements:
        yield plan.replacements[name].to(target)
        return
    if name in plan.bias_updates:
        lora = plan.bias_updates[name]
        yield (read_rows(source, info).float() + lora.bias.float() * lora.scale).to(target)
        return
    loras = plan.changes.get(name, [])
    base_copy = next((lora.base_copy for lora in loras if lora.base_copy is not None), None)
    total = info.shape[0] if info.shape else 1
    row_elements = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    whole = len(info.shape) < 2 or (fan_in_fan_out and any(x.magnitude is not None for x in loras))
    step = total if whole else max(1, BLOCK_BYTES // (4 * row_elements))
    for start in range(0, total, step):
        rows = slice(start, min(start + step, total))
        if base_copy is not None:
            block = base_copy[rows].to(torch.float32, copy=True)
        else:
            block = read_rows(source, info, rows).float()
        for lora in loras:
            if lora.expert is None:
                block = merged_weight(block, lora, fan_in_fan_out, rows)
            elif rows.start <= lora.expert < rows.stop:  # a block of experts: its own matrix
                merged_weight(block[lora.expert - rows.start], lora, False)
        yield block.to(target)


def align_eos(
    config: dict[str, Any], generation: dict[str, Any], eos_id: int | None, pad_id: int | None
) -> list[str]:
    """Make config, generation_config and tokenizer agree on EOS/PAD; return what changed.

    A model fine-tuned with `text + tokenizer.eos_token` stops only if generation stops on
    that id, so it must be among generation_config's EOS ids.
    """
    fixes: list[str] = []
    if eos_id is None:
        return fixes
    current = generation.get("eos_token_id")
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    if eos_id not in ids:
        generation["eos_token_id"] = eos_id if not ids else [*ids, eos_id]
        fixes.append(f"generation_config.eos_token_id += {eos_id} (the tokenizer's EOS)")
    if config.get("eos_token_id") is None:
        config["eos_token_id"] = eos_id
        fixes.append(f"config.eos_token_id = {eos_id}")
    if pad_id is not None and generation.get("pad_token_id") is None:
        generation["pad_token_id"] = pad_id
        fixes.append(f"generation_config.pad_token_id = {pad_id}")
    return fixes


def align_eos_in_folder(folder: Path, eos_id: int | None, pad_id: int | None) -> list[str]:
    """`align_eos` on a model folder written by someone else (Unsloth's merged save)."""
    config = read_json_object(folder / "config.json", f"re-save the model in {folder}")
    generation = _read_generation(folder, config)
    fixes = align_eos(config, generation, eos_id, pad_id)
    if fixes:
        _write_config_and_generation(folder, config, generation)
    return fixes


def _read_generation(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The folder's generation_config.json, else the special token ids from its config."""
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():
        return read_json_object(generation_file, f"delete it or copy it again into {folder}")
    return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _write_config_and_generation(
    folder: Path, config: dict[str, Any], generation: dict[str, Any]
) -> None:
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merged_configs(
    base_folder: Path, base_config: dict[str, Any], dtype: str, untie: bool, tokenizer: Path | None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The merged model's config and generation config, made in memory to be written once:
    the base's, stored in `dtype`, not quantized, untied when the merge untied the embeddings,
    agreeing with the tokenizer's EOS/PAD; and the EOS/PAD fixes that took."""
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False
    generation = _read_generation(base_folder, config)
    if tokenizer is None:
        fixes = ["no tokenizer in the adapter or the base: the merged folder has none"]
    else:
        eos_id = special_token_id(tokenizer, "eos_token")
        fixes = align_eos(config, generation, eos_id, special_token_id(tokenizer, "pad_token"))
    return config, generation, fixes


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge(
    base: str,
    adapter: Path,
    output: Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    revision: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> MergeReport:
    """Merge `adapter` into `base` (local folder or Hub id) and write a model into `output`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    from llm_finetune.safetensors_stream import freed_memory_returned_to_the_os

    start = time.perf_counter()
    adapter, output = Path(adapter), Path(output)
    check_output_folder(str(output), "output folder")
    with freed_memory_returned_to_the_os():  # process-wide: set back for what runs after
        read_adapter_config(adapter)  # before a Hub base is downloaded
        base_folder = resolve_base_folder(base, revision)
        config_file = base_folder / "config.json"
        if not (config_file.exists() or config_file.is_symlink()):  # a dangling link: below
            raise UserError(
                f"base {base!r} has no config.json; pass the folder that save_pretrained wrote"
            )
        base_config = read_json_object(config_file, BASE_FIX)
        refuse_quantized_base(base_config, base)
        lora = read_adapter_for(adapter, base_folder)
        fan_in_fan_out = bool(lora.config.get("fan_in_fan_out"))
        shards = base_shards(base_folder)
        plan = plan_merge(lora, shards, base_config, dtype, fan_in_fan_out, base_folder)
        check_free_disk(output, plan.output_bytes)
        try:
            with (
                atomic_dir(output, overwrite=overwrite, what="merged model folder") as staging,
                _torch_threads(1),  # cache-sized blocks: one compute thread, the other writes
            ):
                written, weight_map = _write_shards(plan, staging, dtype, fan_in_fan_out, progress)
                if len(plan.headers) > 1:
                    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
                    (staging / INDEX_FILE).write_text(
                        json.dumps(index, indent=2, sort_keys=True) + "\n"
                    )
                tokenizer, from_base = copy_tokenizer(base_folder, adapter, staging)
                config, generation, fixes = _merged_configs(
                    base_folder, base_config, dtype, plan.untie, tokenizer
                )
                _write_config_and_generation(staging, config, generation)
        except OSError as exc:  # atomic_dir has removed what was written
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"the disk filled while writing the merged model {str(output)!r} "
                f"({exc.strerror}); nothing was kept: free space or choose another output folder"
            ) from None
    base_dtype = sorted({i.dtype for h in plan.headers.values() for i in h.tensors.values()})
    merged = len({m.module for updates in plan.changes.values() for m in updates})
    return MergeReport(
        output=str(output),
        dtype=dtype,
        base=str(base),
        adapter=str(adapter),
        lora_modules_found=len(lora.modules) + len(lora.parameters),
        lora_modules_merged=merged,
        tensors_replaced=len(plan.replacements),
        shards=len(plan.headers),
        bytes_written=written,
        merged_from=f"original base weights ({'/'.join(base_dtype)}), in float32, cast to {dtype}",
        untied_embeddings=plan.untie,
        eos_fixes=fixes,
        tokenizer_from_base=from_base,
        seconds=round(time.perf_counter() - start, 3),
    )
