"""The names transformers gives a checkpoint's tensors in memory, against those its files hold.

transformers 5 loads many checkpoints under other names than their files store: image-text
checkpoints (Gemma 3 4B+, Mistral 3, LLaVA) store `language_model.model.layers.*` and load as
`model.language_model.layers.*`; Qwen3.5 loaded as a causal LM drops `language_model.`. A LoRA
adapter names what it adapted in memory; the merge writes into the files. The mapping used is
transformers' own (`conversion_mapping`), applied to the file's names as `from_pretrained`
applies it, so a family transformers learns to load needs no table here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def model_class(model_type: str) -> Any:
    """The Auto class a checkpoint loads with: the causal-LM class wherever transformers has
    one (Gemma 3's image-text checkpoints included), else the image-text one (Mistral 3)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    ):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def auto_classes(model_type: str) -> list[Any]:
    """The Auto classes an adapter on this checkpoint may have been trained with: the one it
    loads with (`model_class`) first, then the causal-LM and the image-text class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    first = model_class(model_type)
    return list(dict.fromkeys([first, AutoModelForCausalLM, AutoModelForImageTextToText]))


def load_pretrained(path: str, **kwargs: Any) -> Any:
    """`from_pretrained` with the Auto class the checkpoint loads with (`model_class`)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(
        path,
        revision=kwargs.get("revision"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    return model_class(model_config.model_type).from_pretrained(path, **kwargs)


def meta_model(model_config: Any, auto_class: Any = None, trust_remote_code: bool = False) -> Any:
    """The model built from its config on the meta device: its modules, no weights."""
    import torch

    auto_class = auto_class or model_class(model_config.model_type)
    with torch.device("meta"):
        return auto_class.from_config(model_config, trust_remote_code=trust_remote_code)


def loaded_names(model: Any, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """In-memory name -> checkpoint name, for each tensor `from_pretrained` only renames.

    Tensors a converter reshapes on load (per-expert weights fused into one 3D tensor) and
    those the class does not load (a vision tower under a causal-LM class) are left out.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    in_memory = model.state_dict()
    names: dict[str, str] = {}
    for key in checkpoint_keys:
        loaded, converted = rename_source_key(
            key, renamings, converters, model.base_model_prefix, in_memory
        )
        if converted is None and loaded in in_memory:
            names.setdefault(loaded, key)
    return names


def checkpoint_names(
    wanted: list[str], checkpoint_keys: set[str], config_folder: str
) -> dict[str, str]:
    """Map the in-memory names in `wanted` that the checkpoint does not hold as such to the
    names it holds them under, as the Auto class that explains the most of them loads it
    (an adapter may come from the causal-LM or the image-text class). A model that cannot be
    built here (custom code) keeps its names."""
    missing = [name for name in wanted if name not in checkpoint_keys]
    if not missing:  # the common case: nothing to import (transformers alone is ~100 MB)
        return {}
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(config_folder)
    except Exception:  # noqa: BLE001 - custom code, an unknown type: the names stay as they are
        return {}
    best: dict[str, str] = {}
    for auto_class in auto_classes(model_config.model_type):
        try:
            names = loaded_names(meta_model(model_config, auto_class), checkpoint_keys)
        except Exception:  # noqa: BLE001 - this class does not take this config
            continue
        found = {name: names[name] for name in missing if name in names}
        if len(found) > len(best):
            best = found
        if len(best) == len(missing):
            break
    return best
