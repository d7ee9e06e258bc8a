"""How the merge check holds a model: whole in float32, or bounded (streamed block by block).

Whole: the model in float32 on the GPUs, then RAM; the faster way, when it fits. Bounded:
accelerate's big-model machinery. The model is built on the meta device and its weights stay
in the checkpoint's own safetensors files; accelerate's offload hooks read one block (a
decoder layer, or a module outside the layers) at a time, upcast into float32 buffers the
next block reuses, and drop it after its forward pass; as many blocks as the budget allows
stay resident. peft runs the adapter on it as on any model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llm_finetune.verify_memory import MemoryPlan, free_memory


def load_whole(path: str, adapter: Path | None, **kwargs: Any) -> tuple[Any, Any]:
    """(model, input device): in float32 on the CPU, or spread over every visible GPU and then
    CPU RAM, so a model bigger than one GPU verifies on the node that trained it."""
    import torch

    from llm_finetune.checkpoint_names import load_pretrained

    if torch.cuda.is_available():
        free_memory()  # what training left in torch's cache counts as used when placing
        kwargs["device_map"] = "auto"
    model = load_pretrained(path, dtype=torch.float32, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), model.device


def load_bounded(
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
    from transformers import AutoConfig

    from llm_finetune.checkpoint_names import model_class
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
        model = model_class(config.model_type).from_config(
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

    from llm_finetune.checkpoint_names import load_pretrained

    model = load_pretrained(
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
def holding(mode: str, merged: Path) -> Iterator[Path | None]:
    """What holding the models in `mode` needs around the check; nothing for whole.

    Bounded: a folder for the weights transformers converts at loading (a checkpoint not
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
