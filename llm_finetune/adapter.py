"""A LoRA adapter folder as peft saves it, read and checked against its own config the way
peft loads it (rank, targeted modules, DoRA magnitudes, biases): an adapter peft would refuse,
or load only in part, is refused here rather than merged at a wrong scale."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError, abbreviated
from llm_finetune.fsutil import read_json_object

PREFIX = "base_model.model."
HEAD = "lm_head.weight"


@dataclass
class LoraModule:
    """One adapted module: what to add to (or scale) its base weight."""

    module: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str = "linear"  # "linear" or "embedding"
    lora_a: Any = None
    lora_b: Any = None
    scale: float = 1.0
    magnitude: Any = None  # DoRA
    bias: Any = None  # lora_bias: added to the base bias, times scale
    base_copy: Any = None  # peft's saved copy of an adapted embedding's base weight
    expert: int | None = None  # the expert it updates, in a tensor that stores all experts


@dataclass(frozen=True)
class Wrapper:
    """One peft ParamWrapper (LoRA on a parameter, target_parameters), as peft builds it for
    the base: `parameter_lora.adapter_wrappers`."""

    parameter: str  # the parameter's in-memory name, e.g. model.layers.0.mlp.experts.down_proj
    shape: tuple[int, ...]  # in memory: (experts, d1, d2), or (out, in) for a 2-D parameter
    a_shape: tuple[int, ...]  # lora_A: (experts·r, in)
    b_shape: tuple[int, ...]  # lora_B: (out, experts·r)
    scale: float  # alpha/r with peft's rank and alpha patterns (alpha/√r for rsLoRA)
    out_first: bool  # each expert's matrix is (out, in) (peft swapped in/out), else (in, out)


@dataclass
class ParameterLora:
    """The trained factors of one wrapper."""

    wrapper: Wrapper
    lora_a: Any
    lora_b: Any

    def factors(self, expert: int) -> tuple[Any, Any]:
        """(left, right): the update of `expert`'s matrix, in memory, is scale · left @ right."""
        shape = self.wrapper.shape
        if len(shape) == 2:
            return self.lora_b, self.lora_a
        experts = shape[0]
        a = self.lora_a.reshape(experts, -1, self.lora_a.shape[-1])[expert]  # (r, in)
        b = self.lora_b.reshape(self.lora_b.shape[0], -1, experts)[:, :, expert]  # (out, r)
        return (b, a) if self.wrapper.out_first else (a.T, b.T)


@dataclass
class Adapter:
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # base weight key -> LoRA module
    replacements: dict[str, Any]  # base tensor key -> full tensor (modules_to_save)
    parameters: dict[str, ParameterLora] = field(default_factory=dict)  # target_parameters


ADAPTER_FIX = (
    "copy adapter_config.json and adapter_model.safetensors again, together, from the folder "
    "that save_pretrained wrote"
)
# LoRA variants whose merge is not W + s·B@A (DoRA is merged here) and options that change which
# weights exist: refused rather than merged as plain LoRA.
UNSUPPORTED = (
    "trainable_token_indices",
    "modules_to_tie",
    "layer_replication",
    "alora_invocation_tokens",
    "use_bdlora",
    "use_qalora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite number that arithmetic in float keeps finite (JSON allows NaN and huge ints)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value) and abs(value) < 1 << 63


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, with every field the merge uses checked as peft would use it: a
    wrong type would fail deep inside peft or, worse, change the scale of the merge."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not (config_file.is_file() or config_file.is_symlink()):
        raise UserError(
            f"{str(adapter_dir)!r} is not a LoRA adapter folder (no adapter_config.json); "
            "pass the folder that `save_pretrained` of a peft model wrote"
        )
    config = read_json_object(config_file, ADAPTER_FIX)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(
            f"{config_file}: adapter type {abbreviated(peft_type)} is not LoRA; only LoRA merges"
        )
    for unsupported in UNSUPPORTED:
        if config.get(unsupported):
            raise UserError(f"{config_file} sets {unsupported}, which this merge does not support")
    if config.get("init_lora_weights") == "mica":
        raise UserError(
            f"{config_file} sets init_lora_weights mica, which this merge does not support"
        )
    _check_config_fields(config, config_file)
    return config


def _check_config_fields(config: dict[str, Any], config_file: Path) -> None:
    def refuse(key: str, expected: str) -> UserError:
        return UserError(
            f"{config_file}: {key} is {abbreviated(config.get(key))}, expected {expected}; "
            + ADAPTER_FIX
        )

    for key in ("r", "lora_alpha"):  # peft has defaults, but the scale alpha/r would be a guess
        if key not in config:
            raise UserError(
                f"{config_file} has no {key}, which sets the merge's scale; {ADAPTER_FIX}"
            )
    if not _is_int(config["r"]) or config["r"] < 1:
        raise refuse("r", "a positive integer")
    if not _is_number(config["lora_alpha"]):
        raise refuse("lora_alpha", "a number")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(key) not in (None, True, False):
            raise refuse(key, "true or false")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise refuse("bias", '"none", "all" or "lora_only"')
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str) and not _compiles(value):
            raise refuse(key, "a regular expression that compiles")
        if not (value is None or isinstance(value, str) or _is_names(value)):
            raise refuse(key, "a list of module names or a regular expression")
    if not (config.get("target_parameters") is None or _is_names(config["target_parameters"])):
        raise refuse("target_parameters", "a list of parameter names")
    # Each pattern must compile inside the expression peft builds from it.
    saved = config.get("modules_to_save")
    if saved is not None and not (
        _is_names(saved) and all(_compiles(rf"(^|.*\.){m}($|\..*)") for m in saved)
    ):
        raise refuse("modules_to_save", "a list of module names")
    layers, layers_pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if not (
        layers is None
        or _is_int(layers)
        or (isinstance(layers, list) and all(map(_is_int, layers)))
    ):
        raise refuse("layers_to_transform", "a layer number or a list of them")
    names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if layers_pattern is not None and not (
        _is_names(names) and all(_compiles(rf"(?:^|.*?\.){n}\.(?P<idx>\d+)\.") for n in names)
    ):
        raise refuse("layers_pattern", "a name or a list of names")
    if isinstance(config.get("target_modules"), str) and (layers, layers_pattern) != (None, None):
        raise refuse("target_modules", "a list when layers_to_transform or layers_pattern is set")
    if layers_pattern and layers is None:
        raise refuse("layers_to_transform", "a value when layers_pattern is set")
    for key, valid in (
        ("rank_pattern", lambda v: _is_int(v) and v >= 1),
        ("alpha_pattern", _is_number),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
            _compiles(rf"(.*\.)?({k})$") and valid(v) for k, v in patterns.items()
        ):
            raise refuse(
                key,
                "a map from module name patterns to "
                + ("ranks" if key == "rank_pattern" else "numbers"),
            )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that is a suffix of the module path, else `default`
    (peft.utils.other.get_pattern_key, as rank_pattern and alpha_pattern use it)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _rank(config: dict[str, Any], module: str) -> int:
    return _pattern_value(config.get("rank_pattern") or {}, module, config["r"])


def _scale(config: dict[str, Any], module: str) -> float:
    """alpha/r (alpha/√r for rsLoRA), each from the module's pattern entry when it has one."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    rank = _rank(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def targeted(config: dict[str, Any], module: str) -> bool:
    """Whether peft puts LoRA on `module`, a module path of the base model
    (peft.tuners.tuners_utils.check_target_module_exists): LoRA weights of any other module
    are ignored by peft, so a merge that used them would not be what peft computes."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, module):
            return False
    elif exclude and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    if config.get("ensure_weight_tying") and f"{module}.weight" == HEAD:
        return True  # peft adapts the head tied to an adapted embedding (not in target_modules)
    targets = config.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return True  # peft fills these in from the architecture when the adapter is made
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _saved_whole(config: dict[str, Any], name: str) -> bool:
    """Whether peft saves base tensor `name` whole: a module of modules_to_save (or inside
    one; peft.utils.other._set_trainable matches by suffix), or a bias trained with bias=all."""
    parts = name.split(".")
    ancestors = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
    saved = config.get("modules_to_save") or []
    if any(a.endswith(m) for a in ancestors for m in saved):
        return True
    return name.endswith(".bias") and config.get("bias") == "all"


PARTS = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
    r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?|"
    r"base_layer\.weight|base_layer\.bias)$"
)


def read_adapter(adapter_dir: Path, wrappers: dict[str, Wrapper] | None = None) -> Adapter:
    """Group the adapter's tensors by module, the way peft saved them, and check them against
    the config as peft's loading would: a tensor peft would ignore or refuse is refused.
    LoRA on parameters (target_parameters) is read against `wrappers`, peft path -> the
    ParamWrapper peft builds there on the base."""
    from llm_finetune.safetensors_stream import read_all

    config = read_adapter_config(adapter_dir)
    config_file = Path(adapter_dir) / "adapter_config.json"
    weights_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not (weights_file.is_file() or weights_file.is_symlink()):
        raise UserError(
            f"{str(adapter_dir)!r} has no adapter_model.safetensors (weights must be safetensors; "
            "re-save the adapter with save_pretrained(..., safe_serialization=True))"
        )
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, Any] = {}
    for key, tensor in read_all(weights_file).items():
        if not key.startswith(PREFIX):
            raise UserError(
                f"{weights_file}: tensor {abbreviated(key)} is not named as peft saves adapters "
                f"({PREFIX}...), so peft would ignore it; {ADAPTER_FIX}"
            )
        name = key.removeprefix(PREFIX)
        match = PARTS.match(name)
        if match is None:
            if not _saved_whole(config, name):
                raise UserError(
                    f"{weights_file}: {name} is a whole tensor that neither modules_to_save nor "
                    f"bias in {config_file.name} accounts for, so peft would ignore it; "
                    + ADAPTER_FIX
                )
            replacements[name] = tensor
            continue
        module, part = match["module"], match["part"]
        entry = modules.setdefault(module, LoraModule(module))
        kind = "embedding" if part.startswith("lora_embedding") else "linear"
        if part in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
            if kind != entry.kind and (entry.lora_a is not None or entry.lora_b is not None):
                raise UserError(
                    f"{weights_file}: {module} has both Linear and Embedding LoRA weights; "
                    + ADAPTER_FIX
                )
            entry.kind = kind
        if part in ("lora_A.weight", "lora_embedding_A"):
            entry.lora_a = tensor
        elif part in ("lora_B.weight", "lora_embedding_B"):
            entry.lora_b = tensor
        elif part == "lora_B.bias":
            entry.bias = tensor
        elif part == "base_layer.weight":
            entry.base_copy = tensor
        elif part == "base_layer.bias":  # the layer's own bias, trained with bias=all/lora_only
            if config.get("bias", "none") == "none":
                raise UserError(
                    f"{weights_file}: {name} is a trained bias but {config_file.name} has "
                    f"bias none, so peft would ignore it; {ADAPTER_FIX}"
                )
            replacements[f"{module}.bias"] = tensor
        else:
            entry.magnitude = tensor
    if not modules:
        raise UserError(
            f"{weights_file} holds no LoRA weights (lora_A/lora_B): merging it would copy the "
            f"base unchanged; {ADAPTER_FIX}"
        )
    parameters = _parameter_loras(modules, config, adapter_dir, wrappers, weights_file)
    for entry in modules.values():
        _check_module(entry, config, config_file, weights_file)
        entry.scale = _scale(config, entry.module)
    return Adapter(config, {f"{m}.weight": e for m, e in modules.items()}, replacements, parameters)


def _parameter_loras(
    modules: dict[str, LoraModule],
    config: dict[str, Any],
    adapter_dir: Path,
    wrappers: dict[str, Wrapper] | None,
    weights_file: Path,
) -> dict[str, ParameterLora]:
    """Take the modules that are peft ParamWrappers out of `modules`, as parameter LoRA checked
    against the wrapper peft builds for each (rank, experts, layout)."""
    if not config.get("target_parameters"):
        return {}
    if wrappers is None:
        raise UserError(
            f"{adapter_dir}: the adapter sets target_parameters; pass the base model too"
        )
    parameters = {}
    for path, wrapper in wrappers.items():
        entry = modules.pop(path, None)
        if entry is None or entry.lora_a is None or entry.lora_b is None:
            raise UserError(
                f"{weights_file}: no lora_A/lora_B for {path}, which peft puts LoRA on for "
                f"{wrapper.parameter} (target_parameters); {ADAPTER_FIX}"
            )
        shapes = (tuple(entry.lora_a.shape), tuple(entry.lora_b.shape))
        if shapes != (wrapper.a_shape, wrapper.b_shape):
            raise UserError(
                f"{weights_file}: {path} has LoRA weights of shapes {list(shapes[0])} and "
                f"{list(shapes[1])}, where peft makes {list(wrapper.a_shape)} and "
                f"{list(wrapper.b_shape)} for {wrapper.parameter} of this base (rank, "
                "rank_pattern, experts); pass the base the adapter was trained on"
            )
        if entry.kind != "linear" or any(
            t is not None for t in (entry.magnitude, entry.bias, entry.base_copy)
        ):
            raise UserError(
                f"{weights_file}: {path} has more than lora_A/lora_B, which peft's LoRA on "
                f"parameters does not have; {ADAPTER_FIX}"
            )
        parameters[wrapper.parameter] = ParameterLora(wrapper, entry.lora_a, entry.lora_b)
    return parameters


def _check_module(
    entry: LoraModule, config: dict[str, Any], config_file: Path, weights_file: Path
) -> None:
    """One module's tensors against each other and against what the config claims for it."""
    module = entry.module

    def refuse(what: str) -> UserError:
        return UserError(f"{weights_file}: {module} {what}; {ADAPTER_FIX}")

    if entry.lora_a is None or entry.lora_b is None:
        missing = "lora_A" if entry.lora_a is None else "lora_B"
        raise refuse(f"has no {missing} weight, only half of a LoRA pair")
    a, b = entry.lora_a, entry.lora_b
    if a.dim() != 2 or b.dim() != 2:
        raise refuse(
            f"has LoRA weights of shapes {list(a.shape)} and {list(b.shape)}; only Linear and "
            "Embedding LoRA (2-D weights) merge"
        )
    if a.shape[0] != b.shape[1]:
        raise refuse(f"has lora_A of rank {a.shape[0]} but lora_B of rank {b.shape[1]}")
    rank = _rank(config, module)
    if a.shape[0] != rank:
        source = "rank_pattern" if rank != config["r"] else "r"
        raise UserError(
            f"{config_file}: {source} says rank {rank} for {module}, but its weights in "
            f"{weights_file.name} have rank {a.shape[0]}: peft refuses this adapter, and a merge "
            f"would use the wrong scale; {ADAPTER_FIX}"
        )
    if not targeted(config, module):
        raise UserError(
            f"{config_file}: target_modules (with exclude_modules, layers_to_transform, "
            f"modules_to_save) does not cover {module}, which has LoRA weights in "
            f"{weights_file.name}; peft would ignore them; {ADAPTER_FIX}"
        )
    if entry.magnitude is not None and entry.kind == "embedding":
        raise UserError(f"adapter module {module}: DoRA on embeddings is not supported")
    if bool(config.get("use_dora")) != (entry.magnitude is not None):
        raise UserError(
            f"{config_file}: use_dora is {bool(config.get('use_dora'))} but {module} "
            f"{'has' if entry.magnitude is not None else 'has no'} lora_magnitude_vector in "
            f"{weights_file.name}; {ADAPTER_FIX}"
        )
    if entry.bias is not None and not config.get("lora_bias"):
        raise UserError(
            f"{config_file}: lora_bias is not true but {module} has a lora_B.bias in "
            f"{weights_file.name}, which peft would ignore; {ADAPTER_FIX}"
        )
    for part, tensor in (("lora_magnitude_vector", entry.magnitude), ("lora_B.bias", entry.bias)):
        if tensor is not None and tuple(tensor.shape) != (b.shape[0],):
            raise refuse(f"has a {part} of shape {list(tensor.shape)}, not [{b.shape[0]}]")
