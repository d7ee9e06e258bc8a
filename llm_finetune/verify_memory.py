"""What the merge check needs in memory, and which way it holds the models: whole or bounded.

From the checkpoints' safetensors headers alone (nothing is loaded): the parameters of each
model and of its largest block, the bytes each way needs, and the plan `verify` runs and the
preflight announces before training.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from llm_finetune.config import memory_size
from llm_finetune.errors import UserError

# Bytes a parameter of the largest block needs while the bounded check streams it: float32
# (4), its 16-bit stored copy mapped while it is converted (2), activations and slack (1).
BLOCK_BYTES = 7
# The check's own code and objects (tokenizer, model skeletons, generation), beyond a Python
# process with torch, transformers and peft imported.
CHECK_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightsLayout:
    parameters: int
    largest_block: int  # parameters of the biggest piece the bounded check loads at once
    adapter: int = 0  # parameters of the adapter checked with it (float32 throughout)


Shapes = list[tuple[str, Sequence[int]]]  # (tensor name, shape) of a checkpoint


def block_of(tensor_name: str) -> str:
    """The piece a tensor is loaded with in the bounded check: its numbered layer
    (`model.layers.7.mlp.up_proj.weight` -> `model.layers.7`), else its own module."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def layout_of(shapes: Shapes, adapter: int = 0) -> WeightsLayout:
    blocks: dict[str, int] = {}
    for name, shape in shapes:
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + prod(shape)
    return WeightsLayout(sum(blocks.values()), max(blocks.values(), default=0), adapter)


def lora_parameters(shapes: Shapes, r: int, target_modules: list[str] | str) -> int:
    """LoRA's size before it is trained: r·(in+out) for each matrix of a targeted module
    ("all-linear": each matrix in the numbered layers)."""
    total = 0
    for name, shape in shapes:
        module = name.removesuffix(".weight")
        if len(shape) != 2 or module == name:
            continue
        if target_modules == "all-linear":
            targeted = block_of(name) != module
        else:
            targeted = module.rpartition(".")[2] in target_modules
        total += r * (shape[0] + shape[1]) if targeted else 0
    return total


def folder_shapes(folder: Path) -> Shapes:
    """From the safetensors headers of a model folder (the data is not read)."""
    from llm_finetune.merge import base_shards
    from llm_finetune.safetensors_stream import read_header

    return [
        (name, info.shape)
        for shard in base_shards(Path(folder))
        for name, info in read_header(shard).tensors.items()
    ]


def base_shapes(path: str, revision: str | None) -> Shapes | None:
    """The tensors of a local folder, or of a Hub repo as the Hub lists its shards' headers
    (None when unknown: offline, no access)."""
    if revision is None:
        return folder_shapes(Path(path))
    from huggingface_hub import HfApi

    try:
        files = HfApi().get_safetensors_metadata(path, revision=revision).files_metadata
    except Exception:  # offline or no access: verification plans again when it runs
        return None
    return [(name, info.shape) for meta in files.values() for name, info in meta.tensors.items()]


def adapter_parameters(adapter: Path) -> int:
    """From its safetensors header; 0 without one (peft says what is wrong when it loads)."""
    from llm_finetune.safetensors_stream import read_header

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return 0
    return sum(prod(info.shape) for info in read_header(weights).tensors.values())


def check_layout(base_folder: Path, adapter: Path, merged: Path) -> WeightsLayout:
    """What a check of `merged` against base+adapter holds: the larger of the two models
    (a merge may untie the embeddings), and the adapter."""
    layouts = [layout_of(folder_shapes(base_folder)), layout_of(folder_shapes(merged))]
    return WeightsLayout(
        max(x.parameters for x in layouts),
        max(x.largest_block for x in layouts),
        adapter_parameters(adapter),
    )


def memory_needed(layout: WeightsLayout) -> int:
    """Bytes to verify a model whole: one float32 copy at a time (4 bytes a parameter) with
    10% for activations and the placement's headroom, and the adapter."""
    return int(4 * layout.parameters * 1.1) + 4 * layout.adapter + CHECK_BYTES


def bounded_memory_needed(layout: WeightsLayout) -> int:
    """Bytes to verify a model block by block: its largest block in flight, and the adapter."""
    return BLOCK_BYTES * layout.largest_block + 4 * layout.adapter + CHECK_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "whole" or "bounded"
    needed: int  # bytes the mode needs at least
    budget: int  # bytes the check may hold: GPUs and RAM, capped by verify.max_memory
    max_memory: dict[int | str, int] | None = None  # bounded: accelerate's budget per device
    arena: int = 0  # bounded: bytes of the float32 buffer the streamed blocks are read into

    def describe(self) -> str:
        if self.mode == "whole":
            return f"the whole model at a time (about {size(self.needed)} of {size(self.budget)})"
        return (
            f"bounded, one layer at a time (at least {size(self.needed)}; "
            f"{size(self.budget)} allowed, the whole model needs more)"
        )


def plan_memory(
    layout: WeightsLayout,
    gpus: Sequence[int],
    ram: int,
    max_memory: str | None = None,
    beside: int = 0,
) -> MemoryPlan:
    """The whole model when it fits in `gpus` (bytes each) and `ram` less what the backend
    keeps `beside` (and under `max_memory`), else bounded over the same devices; refused
    when not even one block fits."""
    floor = bounded_memory_needed(layout)
    have = sum(gpus) + ram - beside
    cap = memory_size(max_memory) if max_memory else None
    if cap is not None and cap < floor:
        raise UserError(
            f"verify.max_memory {max_memory} is smaller than one layer of the model "
            f"({size(floor)}: the largest block in float32 as the check streams it, "
            "and the adapter): raise it to at least that, or remove it to use the memory the "
            "machine has"
        )
    budget = have if cap is None else min(cap, have)
    whole = memory_needed(layout)
    if whole <= budget:
        return MemoryPlan("whole", whole, budget)
    if floor > budget:
        raise UserError(
            f"verification needs at least {size(floor)} (one layer of the model at a time in "
            f"float32; {layout.parameters / 1e6:,.0f} M parameters) and this machine has "
            f"{describe_memory(gpus, ram)}: use a bigger machine, or set verify.enabled: false "
            "and run llm-finetune verify elsewhere"
        )
    arena = 4 * layout.largest_block  # accelerate keeps that much free for it
    left = budget - (floor - arena)
    devices: dict[int | str, int] = dict(enumerate(gpus))
    devices["cpu"] = max(0, ram - beside)
    per_device: dict[int | str, int] = {}
    for device, free in devices.items():
        per_device[device] = max(0, min(free, left))
        left -= per_device[device]
    return MemoryPlan("bounded", floor, budget, per_device, arena)


def size(nbytes: int) -> str:
    """'3.84 GB', or '69.3 MB' below a GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def describe_memory(gpus: Sequence[int], ram: int) -> str:
    """What the check can place models on, as the preflight and its errors say it."""
    return f"{sum(gpus) / 1e9:.0f} GB of GPU memory and {ram / 1e9:.0f} GB of free RAM"


def available_memory() -> tuple[list[int], int | None]:
    """(bytes of each visible GPU, bytes of RAM available now or None where unknown): what
    the check can place a model on. GPUs count whole: training frees them before the check."""
    import torch

    gpus = [
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    ]
    return gpus, available_ram()


def available_ram() -> int | None:
    """Bytes of RAM the kernel says are available now (MemAvailable), None where unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kib = next(
        (line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None
    )
    return int(kib) * 1024 if kib else None


def free_memory() -> None:
    """Collect garbage and hand torch's cached GPU memory back (for others to place on)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
