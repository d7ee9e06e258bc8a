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

Each model is held in one of two ways, chosen from the memory there is (`plan_memory`):
- whole: the model in float32 on the GPUs, then RAM; the faster way, when it fits;
- bounded: accelerate's big-model machinery. The model is built on the meta device and its
  weights stay in the checkpoint's own safetensors files; accelerate's offload hooks read one
  block (a decoder layer, or a module outside the layers) at a time, upcast into float32
  buffers the next block reuses, and drop it after its forward pass; as many blocks as the
  budget allows stay resident. peft runs the adapter on it as on any model. Peak memory:
  the largest block, the adapter and what stays resident.
Both ways run the same code on the same prompts, so they report the same figures.
"""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from llm_finetune.config import memory_size
from llm_finetune.errors import UserError

# Allowed max |Δlogit| per unit of logit scale, by the merged weights' dtype.
RELATIVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}

# Bytes a parameter of the largest block needs while the bounded check streams it: float32
# (4), its 16-bit stored copy mapped while it is converted (2), activations and slack (1).
BLOCK_BYTES = 7
# The check's own code and objects (tokenizer, model skeletons, generation), beyond a Python
# process with torch, transformers and peft imported.
CHECK_BYTES = 64 << 20


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


# ---------------------------------------------------------------------------------------
# Memory: what each way needs, and which one runs


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
    return gpus, _available_ram()


def _available_ram() -> int | None:
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


# ---------------------------------------------------------------------------------------
# Holding a model: whole, or block by block


def _load_whole(path: str, adapter: Path | None, **kwargs: Any) -> tuple[Any, Any]:
    """(model, input device): in float32 on the CPU, or spread over every visible GPU and then
    CPU RAM, so a model bigger than one GPU verifies on the node that trained it."""
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        free_memory()  # what training left in torch's cache counts as used when placing
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), model.device


def _load_bounded(
    path: str,
    adapter: Path | None,
    plan: MemoryPlan,
    offload: Path,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, input device), its weights read block by block from the checkpoint's files by
    accelerate's offload hooks; the blocks that fit `plan.max_memory` stay resident.

    peft's own loading onto an offloaded model (`PeftModel.from_pretrained` on a dispatched
    model) rewrites every offloaded shard with the adapter's weights in it: a second copy of
    the base on disk. Here peft loads the adapter onto a model whose offloaded weights are
    zero-byte stand-ins of the right shape, and accelerate is then told where every base
    weight lies in the original files, under the name it has in the peft model.
    """
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.hooks import AlignDevicesHook, attach_align_device_hook_on_blocks
    from accelerate.utils import set_module_tensor_to_device

    model, stored = _meta_model(path, offload, trust_remote_code)
    blocks = set(model._no_split_modules or ())
    skip_keys = getattr(model, "_skip_keys_device_placement", None)
    if adapter is not None:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = PeftModel.from_pretrained(model, str(adapter), low_cpu_mem_usage=True)
        # A LoRA layer reads its base layer's weight outside the base layer's forward (DoRA)
        # and holds parameters no forward is called on (embedding LoRA): loaded as one piece.
        blocks |= {type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer)}
    index = {}
    for name, module, key, tensor in _named_tensors(model):
        if id(tensor) in stored:
            index[name] = stored[id(tensor)][1]
            meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            _set(module, key, _wrapped(module, key, meta))
    device_map = infer_auto_device_map(
        model, max_memory=plan.max_memory, no_split_module_classes=sorted(blocks)
    )
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    weights = _StreamedWeights(index, torch.device(main), plan.arena + (1 << 20))
    for name in list(index):
        device = _device_of(device_map, name)
        if device != "disk":  # resident: loaded once
            set_module_tensor_to_device(model, name, device, value=weights.load(name))
            del index[name]
    weights.in_memory = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    # What accelerate's dispatch_model does, with `weights` as the map the hooks read from.
    offloaded = ("disk",) if main == "cpu" else ("cpu", "disk")
    execution = {k: main if d in offloaded else d for k, d in device_map.items()}
    attach_align_device_hook_on_blocks(
        model,
        execution_device={"": main} | execution,
        offload={k: d in offloaded for k, d in device_map.items()},
        weights_map=weights,
        skip_keys=skip_keys,
        preload_module_classes=sorted(blocks),
    )
    for module in model.modules():  # torch runs these around accelerate's load and drop
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, AlignDevicesHook) and hook.offload:
            module.register_forward_pre_hook(weights.enter)
            module.register_forward_hook(weights.leave)
    return model.eval(), torch.device(main)


class _StreamedWeights(Mapping):
    """The weights accelerate's offload hooks read: each tensor of `index` from its
    safetensors file, upcast into one float32 arena of `capacity` bytes on `device`; the
    tensors of `in_memory` (the adapter's, resident ones) as they are.

    The arena is a stack: a streamed module's weights are pushed when accelerate loads them,
    and popped once it has run and accelerate has dropped them (`enter`/`leave`, run by
    torch's hooks around accelerate's), so the next block reuses the same memory: fresh
    memory for every block would cost more than the upcast itself (page faults). A module
    streamed inside another keeps the outer one's weights below its own."""

    def __init__(self, index: dict[str, dict[str, str]], device: Any, capacity: int) -> None:
        self.index, self.device, self.capacity = index, device, capacity
        self.in_memory: dict[str, Any] = {}
        self.arena: Any = None  # made on first use; its pages count only once written
        self.top = 0
        self.marks: list[int] = []

    def enter(self, *_: Any) -> None:
        self.marks.append(self.top)

    def leave(self, *_: Any) -> None:
        self.top = self.marks.pop()

    def load(self, name: str) -> Any:
        """A tensor of its own, for a weight that stays resident."""
        stored, dtype = self._read(name)
        return stored.to(dtype)

    def _read(self, name: str) -> tuple[Any, Any]:
        """(the stored tensor, mapped from its file, not read yet; the dtype to hold it in)."""
        import torch

        entry = self.index[name]
        return _read_stored(entry), getattr(torch, entry.get("dtype", "float32"))

    def __getitem__(self, name: str) -> Any:
        import torch

        if name in self.in_memory:
            return self.in_memory[name]
        stored, dtype = self._read(name)
        start = -(-self.top // 64) * 64  # aligned for any dtype
        end = start + stored.numel() * dtype.itemsize
        if end > self.capacity:  # a piece bigger than planned: correct, in memory of its own
            return stored.to(device=self.device, dtype=dtype)
        if self.arena is None:
            self.arena = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self.top = end
        return self.arena[start:end].view(dtype).view(stored.shape).copy_(stored)

    def __iter__(self) -> Iterator[str]:
        return iter([*self.in_memory, *self.index])

    def __len__(self) -> int:
        return len(self.in_memory) + len(self.index)


def _read_stored(entry: dict[str, str]) -> Any:
    """A tensor as an offload index entry locates it: mapped from its file, not read yet."""
    from safetensors import safe_open

    with safe_open(entry["safetensors_file"], framework="pt") as f:
        return f.get_tensor(entry["weight_name"])


def _meta_model(path: str, offload: Path, trust: bool) -> tuple[Any, dict[int, Any]]:
    """The model with every checkpoint weight replaced by a zero-byte stand-in (expanded
    zeros: its shape and dtype, no memory), and {id(stand-in): (stand-in, where its bytes
    are: accelerate's offload index entry)}.

    Built from the config when the checkpoint's tensors have the model's names and shapes
    (reading nothing); otherwise, e.g. experts stored one by one and fused at loading,
    transformers loads it with every weight offloaded to disk (converted ones are written
    to `offload`) and its index is taken from accelerate's hooks, as peft does.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_finetune.merge import base_shards
    from llm_finetune.safetensors_stream import read_header

    folder = Path(path)
    on_disk = {
        name: (shard, info.shape)
        for shard in base_shards(folder)
        for name, info in read_header(shard).tensors.items()
    }
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust
        )
    names: dict[int, list[str]] = {}
    for name, _, _, tensor in _named_tensors(model):
        names.setdefault(id(tensor), []).append(name)
    where: dict[int, dict[str, str]] = {}
    for _, module, key, tensor in list(_named_tensors(model)):
        found = [n for n in names[id(tensor)] if n in on_disk]
        if not found or tuple(on_disk[found[0]][1]) != tuple(tensor.shape):
            return _meta_model_by_transformers(str(folder), offload, trust)
        dtype = str(tensor.dtype).removeprefix("torch.")
        entry = {"safetensors_file": str(on_disk[found[0]][0]), "weight_name": found[0]}
        if key in module._buffers:  # not streamed by the hooks: read now (buffers are small)
            _set(module, key, _read_stored(entry).to(tensor.dtype))
        else:
            where[id(tensor)] = entry | {"dtype": dtype}
    return model, _stand_ins(model, where)


def _meta_model_by_transformers(
    folder: str, offload: Path, trust_remote_code: bool
) -> tuple[Any, dict[int, Any]]:
    import torch
    from accelerate.hooks import remove_hook_from_submodules
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map={"": "disk"},
        offload_folder=str(offload),
        trust_remote_code=trust_remote_code,
    )
    hooks = [m._hf_hook for m in model.modules() if getattr(m, "_hf_hook", None) is not None]
    index = next(h.weights_map.dataset.index for h in hooks if h.offload)
    remove_hook_from_submodules(model)
    del model.hf_device_map  # no longer dispatched; peft must not dispatch it again
    where = {
        id(tensor): index[name]
        for name, _, _, tensor in _named_tensors(model)
        if tensor.device.type == "meta"
    }
    return model, _stand_ins(model, where)


def _stand_ins(model: Any, where: dict[int, dict[str, str]]) -> dict[int, Any]:
    """Replace each tensor in `where` (by id) with a stand-in shared by all its names."""
    import torch

    made: dict[int, Any] = {}
    for _, module, key, tensor in list(_named_tensors(model)):
        if id(tensor) in where:
            if id(tensor) not in made:
                zeros = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
                made[id(tensor)] = (_wrapped(module, key, zeros), where[id(tensor)])
            _set(module, key, made[id(tensor)][0])
    return {id(stand_in): (stand_in, entry) for stand_in, entry in made.values()}


def _named_tensors(model: Any) -> Iterator[tuple[str, Any, str, Any]]:
    """(full name, module, key, tensor) of every parameter and persistent buffer, once per
    name: tied weights appear under each of their names."""
    for prefix, module in list(model.named_modules(remove_duplicate=False)):
        skip = module._non_persistent_buffers_set
        persistent = [(k, b) for k, b in module._buffers.items() if k not in skip]
        for key, tensor in [*module._parameters.items(), *persistent]:
            if tensor is not None:
                yield (f"{prefix}.{key}" if prefix else key), module, key, tensor


def _wrapped(module: Any, key: str, tensor: Any) -> Any:
    """`tensor` as `module.key` holds it: a frozen Parameter, or the buffer itself."""
    import torch

    if key in module._parameters:
        return torch.nn.Parameter(tensor, requires_grad=False)
    return tensor


def _set(module: Any, key: str, tensor: Any) -> None:
    if key in module._parameters:
        module._parameters[key] = tensor
    else:
        module._buffers[key] = tensor


def _device_of(device_map: dict[str, Any], name: str) -> Any:
    owner = max((k for k in device_map if k == "" or name.startswith(k + ".")), key=len)
    return device_map[owner]


@contextlib.contextmanager
def _held(mode: str, merged: Path) -> Iterator[Path | None]:
    """Bounded: a folder for the weights transformers converts at loading (a checkpoint not
    stored as the model names its tensors), beside the merged model on the disk the
    preflight checked; freed blocks go back to the OS at once (glibc would keep them in a
    heap that fragments); and transformers' warning that the inputs are not on the model's
    (meta) device is dropped: they are on the device the hooks compute on."""
    if mode == "whole":
        yield None
        return
    import shutil
    import tempfile

    from llm_finetune.safetensors_stream import freed_memory_returned_to_the_os

    offload = Path(tempfile.mkdtemp(prefix=".verify-offload-", dir=merged.parent))
    try:
        with freed_memory_returned_to_the_os(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input_ids.* being on a device type")
            yield offload
    finally:
        shutil.rmtree(offload, ignore_errors=True)


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
    ram = _available_ram()  # None where unknown: not a limit, as before the bounded mode
    base_folder = resolve_base_folder(base, revision)
    layout = check_layout(base_folder, adapter, Path(merged))
    plan = plan_memory(layout, gpus, ram if ram is not None else 2**62, max_memory)
    costs: dict[str, Any] = {}
    with _measured(costs), _held(plan.mode, Path(merged)) as offload:

        def load(path: str, adapter: Path | None) -> tuple[Any, Any]:
            if offload is None:
                return _load_whole(path, adapter, trust_remote_code=trust_remote_code)
            return _load_bounded(path, adapter, plan, offload, trust_remote_code)

        # each prompt: generated by base+adapter, then run through it, the base and the merged
        bar = progress_bar(4 * len(encoded), "verify", "pass")
        reference, device = load(str(base_folder), adapter)
        with torch.inference_mode():
            sequences = [_greedy(reference, device, i, max_new_tokens, pad_id) for i in encoded]
            bar.update(len(encoded))
            ref_logits = [_logits(reference, device, s) for s in sequences]
            bar.update(len(encoded))
            with reference.disable_adapter():
                base_logits = [_logits(reference, device, s) for s in sequences]
            bar.update(len(encoded))
        del reference  # one model in memory at a time
        free_memory()
        merged_model, device = load(str(merged), None)
        with torch.inference_mode():
            merged_logits = [_logits(merged_model, device, s) for s in sequences]
        bar.update(len(encoded))
        bar.close()
        del merged_model
        free_memory()

    lengths = [ids.shape[1] for ids in encoded]
    prompt_logits = [
        (ref[:n], mine[:n]) for ref, mine, n in zip(ref_logits, merged_logits, lengths, strict=True)
    ]
    diff = max(float((a - b).abs().max()) for a, b in prompt_logits)
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
        passed=diff <= tolerance,
        generations_agree=agree,
        adapter_effect_max_abs_logit_diff=effect,
        eos_consistent=eos_consistent(merged, tokenizer),
        sample_generation=tokenizer.decode(merged_generations[0], skip_special_tokens=True),
        mode=plan.mode,
        **costs,
    )
    if not report.passed:
        raise VerificationFailed(
            f"merged model differs from base+adapter: max |Δlogit| {diff:.3g} > tolerance "
            f"{tolerance:.3g} for {dtype}; the adapter is kept, re-run the merge "
            "(llm-finetune merge) from the original 16-bit base"
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
