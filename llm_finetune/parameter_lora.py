"""LoRA on parameters rather than modules (peft's `target_parameters`): MoE experts, routers.

transformers 5 holds a MoE layer's experts as 3-D tensors (`mlp.experts.gate_up_proj`: experts
x 2·intermediate x hidden), and peft 0.21 puts LoRA on them through `ParamWrapper`: one lora_A
of experts·r rows and one lora_B of experts·r columns per tensor, wrappers nested when one module
holds two targeted tensors, the rank and alpha doubled for `gate_up_proj`. Most checkpoints
store the experts one by one (`experts.3.gate_proj.weight`, Mixtral's `experts.3.w1.weight`),
which transformers fuses on load with its conversion mapping; gpt-oss stores them fused.

Here the wrappers are rebuilt as peft builds them (the base on the meta device, no weights), so
rank, scale and layout are peft's own; each expert's update is then placed on the tensors the
checkpoint stores by reading that conversion mapping backwards. The merge stays a stream over
stored tensors, each getting an ordinary low-rank update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_finetune.adapter import PARTS, PREFIX, LoraModule, ParameterLora, Wrapper
from llm_finetune.errors import UserError, first_line


def _meta_model(config_folder: Path, holding: set[str]) -> Any:
    """The base on the meta device, built by the Auto class whose modules and parameters
    include `holding`: an adapter on an image-text checkpoint may come from either class, and
    their names differ (`model.language_model.layers` or `model.layers`)."""
    from transformers import AutoConfig

    from llm_finetune.checkpoint_names import auto_classes, meta_model

    try:
        model_config = AutoConfig.from_pretrained(config_folder)
        first, *others = auto_classes(model_config.model_type)
        model = meta_model(model_config, first)
    except Exception as exc:  # noqa: BLE001 - custom code, an unknown type
        raise UserError(
            f"LoRA on fused parameters (target_parameters) is merged by rebuilding the base's "
            f"modules, which failed for {str(config_folder)!r}: {first_line(exc)}"
        ) from None
    if _holds(model, holding):
        return model
    for auto_class in others:
        try:
            other = meta_model(model_config, auto_class)
        except Exception:  # noqa: BLE001, S112 - this class does not take this config
            continue
        if _holds(other, holding):
            return other
    return model


def _holds(model: Any, names: set[str]) -> bool:
    held = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    return names <= held


def wrappers(model: Any) -> dict[str, Wrapper]:
    """peft path of each ParamWrapper in `model` (a peft model) -> what it wraps."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        path = name.removeprefix(PREFIX)
        owner = re.sub(r"(\.base_layer)+$", "", path)
        adapter = next(iter(module.lora_A))
        found[path] = Wrapper(
            parameter=f"{owner}.{module.parameter_name}",
            shape=tuple(module.get_param().shape),
            a_shape=tuple(module.lora_A[adapter].weight.shape),
            b_shape=tuple(module.lora_B[adapter].weight.shape),
            scale=float(module.scaling[adapter]),
            out_first=bool(getattr(module, "_did_swap_in_out_features", False)),
        )
    return found


def adapter_wrappers(adapter_dir: Path, config_folder: Path) -> dict[str, Wrapper]:
    """The wrappers peft makes when it loads the adapter in `adapter_dir` onto this base."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _meta_model(config_folder, _adapted_modules(adapter_dir))
    try:
        settings = LoraConfig.from_pretrained(str(adapter_dir))
        with torch.device("meta"):  # the LoRA weights too: shapes only, no initialisation
            peft_model = get_peft_model(model, settings)
    except Exception as exc:  # noqa: BLE001 - peft's own refusal, in one line
        raise UserError(
            f"{adapter_dir}/adapter_config.json: peft cannot apply it to this base "
            f"({first_line(exc)}); pass the base the adapter was trained on"
        ) from None
    return wrappers(peft_model)


def _adapted_modules(adapter_dir: Path) -> set[str]:
    """The base's modules the adapter's tensors belong to (peft's nesting taken off), read
    from the file's header; none where there is no file to read, which read_adapter reports."""
    from llm_finetune.safetensors_stream import read_header

    weights_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights_file.is_file():
        return set()
    modules = set()
    for key in read_header(weights_file).tensors:
        match = PARTS.match(key.removeprefix(PREFIX))
        if match:
            modules.add(re.sub(r"(\.base_layer)+$", "", match["module"]))
    return modules


# ---------------------------------------------------------------------------------------
# From the in-memory parameter to the tensors the checkpoint stores


@dataclass
class Piece:
    """Where one stored tensor sits inside a fused in-memory parameter."""

    key: str  # the stored tensor
    expert: int | None  # its expert (per-expert storage), None when stored fused
    part: int  # which of the fused sources (gate 0, up 1), in the converter's order
    transposed: bool  # stored as the transpose of the in-memory matrix


def _op_names(converter: Any) -> list[str]:
    return [type(op).__name__ for op in converter.operations]


def _foldable(converter: Any) -> bool:
    """Conversions read backwards here: experts stacked (MergeModulelist), gate and up then
    concatenated (Concatenate), or each expert's matrix transposed (Transpose of dims 1, 2)."""
    ops = _op_names(converter)
    if ops == ["Transpose"]:
        return {converter.operations[0].dim0, converter.operations[0].dim1} == {1, 2}
    return ops in (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


def _refuse_ops(parameter: str, converter: Any) -> UserError:
    return UserError(
        f"LoRA on {parameter}: transformers loads it from the checkpoint with "
        f"{' + '.join(_op_names(converter))}, which the merge cannot fold back; leave it out "
        "of lora.target_modules (train attention only)"
    )


def check_foldable(model: Any, parameters: list[str]) -> None:
    """Before training: each parameter LoRA lands on is loaded by transformers with
    conversions the merge reads backwards (`_foldable`), or with none."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    converters = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
    for parameter in parameters:
        for converter in converters:
            aimed = any(parameter.endswith(t) for t in converter.target_patterns)
            if aimed and not _foldable(converter):
                raise _refuse_ops(parameter, converter)


def _converter_for(converters: list[Any], pattern: str | None) -> Any:
    """The converter whose source `pattern` is (rename_source_key names the pattern only)."""
    return next((c for c in converters if pattern in c.source_patterns), None)


def _expert_number(key: str, pattern: str) -> int | None:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match and match.groups() else None


def pieces(
    model: Any, parameters: dict[str, Wrapper], stored: dict[str, tuple[int, ...]]
) -> dict[str, list[Piece]]:
    """parameter -> the stored tensors it is loaded from, as transformers loads them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    in_memory = model.state_dict()
    found: dict[str, list[Piece]] = {}
    for key, shape in stored.items():
        loaded, pattern = rename_source_key(
            key, renamings, converters, model.base_model_prefix, in_memory
        )
        wrapper = parameters.get(loaded)
        if wrapper is None:
            continue
        converter = _converter_for(converters, pattern)
        if converter is None:  # stored as in memory, perhaps renamed
            piece = Piece(key, None, 0, False)
        elif not _foldable(converter):
            raise _refuse_ops(wrapper.parameter, converter)
        elif _op_names(converter)[0] == "Transpose":  # each expert's matrix, if shapes differ
            piece = Piece(key, None, 0, shape != wrapper.shape)
        else:
            expert = _expert_number(key, pattern)
            if expert is None:
                raise _refuse_ops(wrapper.parameter, converter)
            piece = Piece(key, expert, converter.source_patterns.index(pattern), False)
        found.setdefault(wrapper.parameter, []).append(piece)
    return found


def place(
    loras: dict[str, ParameterLora],
    stored: dict[str, tuple[int, ...]],
    config_folder: Path,
) -> dict[str, list[Any]]:
    """stored tensor -> the LoRA updates it receives, as `LoraModule`s in its own layout
    (`expert` set where the tensor holds all experts): what peft's forward pass adds to the
    in-memory parameter, read back through transformers' conversion."""
    by_parameter = {p.wrapper.parameter: p for p in loras.values()}
    model = _meta_model(config_folder, set(by_parameter))
    found = pieces(model, {n: p.wrapper for n, p in by_parameter.items()}, stored)
    updates: dict[str, list[Any]] = {}
    for name, lora in by_parameter.items():
        wrapper = lora.wrapper
        placed = found.get(name, [])
        if not placed:
            raise UserError(
                f"LoRA on {name}: the checkpoint stores no tensor transformers loads it from; "
                "the adapter was trained on a different base model; pass the base it was trained on"
            )
        experts = wrapper.shape[0] if len(wrapper.shape) == 3 else 1
        if placed[0].expert is None:  # one tensor, all experts (or a 2-D parameter)
            if len(placed) != 1:
                raise UserError(
                    f"LoRA on {name}: the checkpoint stores {len(placed)} tensors transformers "
                    "loads it from, where it loads one; pass the base the adapter was trained on"
                )
            (piece,) = placed
            want = wrapper.shape if not piece.transposed else (experts, *wrapper.shape[:0:-1])
            _check_stored(name, piece.key, stored[piece.key], want)
            for expert in range(experts):
                left, right = lora.factors(expert)
                if piece.transposed:
                    left, right = right.T, left.T
                module = LoraModule(
                    name,
                    lora_a=right,
                    lora_b=left,
                    scale=wrapper.scale,
                    expert=expert if len(wrapper.shape) == 3 else None,
                )
                updates.setdefault(piece.key, []).append(module)
            continue
        parts = sorted({p.part for p in placed})
        by_expert: dict[int, list[Piece]] = {}
        for piece in placed:
            by_expert.setdefault(piece.expert, []).append(piece)
        if sorted(by_expert) != list(range(experts)) or any(
            sorted(p.part for p in ps) != parts for ps in by_expert.values()
        ):
            raise UserError(
                f"LoRA on {name}: the checkpoint stores {len(placed)} tensors for its "
                f"{experts} experts, not one per expert and part; the adapter was trained on a "
                "different base model; pass the base it was trained on"
            )
        for expert, expert_pieces in sorted(by_expert.items()):
            left, right = lora.factors(expert)
            start = 0
            for piece in sorted(expert_pieces, key=lambda p: p.part):
                rows = stored[piece.key][0] if stored[piece.key] else 0
                _check_stored(name, piece.key, stored[piece.key], (rows, wrapper.shape[2]))
                module = LoraModule(
                    name,
                    lora_a=right,
                    lora_b=left[start : start + rows],
                    scale=wrapper.scale,
                )
                updates.setdefault(piece.key, []).append(module)
                start += rows
            if start != wrapper.shape[1]:
                raise UserError(
                    f"LoRA on {name}: expert {expert}'s stored parts have {start} rows, the "
                    f"fused parameter {wrapper.shape[1]}; pass the base the adapter was trained on"
                )
    return updates


def _check_stored(name: str, key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(want):
        raise UserError(
            f"LoRA on {name}: the stored {key} has shape {list(shape)}, not {list(want)}; the "
            "adapter was trained on a different base model; pass the base it was trained on"
        )
