"""What LoRA will land on, worked out before training: the model built from its config.json
on the meta device (no weights read), peft applied as training applies it, its own rewrites
included, and what it touched grouped by kind.

peft 0.21 turns `gate_proj/up_proj/down_proj` on a transformers-5 MoE (Qwen3-MoE, Mixtral,
OLMoE, ...) into LoRA on the fused 3D expert tensors (`target_parameters`), and the default
list misses fused projections (Phi-3's `qkv_proj`, `gate_up_proj`): both used to show only
after training, at the merge or never.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError, first_line

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config

KINDS = ("attention", "MLP", "experts", "router", "embeddings", "head", "other")
MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc"}


def kind_of(path: str) -> str:
    """The part of a transformer block a module or parameter path belongs to."""
    parts = path.lower().split(".")
    last = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if last in ("lm_head", "embed_out"):
        return "head"
    if last in ("embed_tokens", "wte", "word_embeddings", "embed_in"):
        return "embeddings"
    if last in ("gate", "router") or "router" in last or last.endswith("expert_gate"):
        return "router"
    if any(part.startswith("experts") for part in parts):
        return "experts"
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(part in ("mlp", "feed_forward", "ffn", "block_sparse_moe") for part in parts):
        return "MLP"
    return "other"


def _by_kind(paths: set[str]) -> dict[str, list[str]]:
    """kind -> the sorted last names of `paths` (`q_proj`, ...): one entry per layer type."""
    grouped: dict[str, set[str]] = {}
    for path in paths:
        name = path.removesuffix(".weight").rsplit(".", 1)[-1]
        grouped.setdefault(kind_of(path), set()).add(name)
    return {kind: sorted(grouped[kind]) for kind in KINDS if kind in grouped}


def lands_on(targets: dict[str, Any]) -> str:
    """`LoraTargets.as_dict()` in a line: how many modules, which layers of each kind."""
    kinds = "; ".join(f"{kind} {', '.join(names)}" for kind, names in targets["touched"].items())
    return f"{targets['modules']} modules: {kinds}"


@dataclass
class LoraTargets:
    model_type: str
    modules: int  # how many modules get a LoRA adapter
    touched: dict[str, list[str]]  # kind -> layer names with LoRA
    parameters: list[str]  # tensors peft put LoRA on whole (its target_parameters)
    missed: dict[str, list[str]]  # kind -> linear layers no target reached
    unmatched: list[str]  # configured names this model does not have
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"LoRA on this {self.model_type}: {lands_on(self.as_dict())}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_lora_targets(config: Config, base: BaseModel) -> LoraTargets:
    """Apply the run's LoRA config to the base built on the meta device; refuse, in one line,
    a target list that matches nothing and LoRA on tensors transformers converts in a way the
    merge cannot read backwards, before any weight is loaded."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    from llm_finetune.backends.base import target_modules_error
    from llm_finetune.backends.hf import NON_TEXT_TOWERS, lora_config
    from llm_finetune.checkpoint_names import meta_model
    from llm_finetune.parameter_lora import check_foldable, wrappers

    remote = config.model.trust_remote_code
    model_config = AutoConfig.from_pretrained(
        base.path, revision=base.revision, trust_remote_code=remote
    )
    model = meta_model(model_config, trust_remote_code=remote)
    modules = dict(model.named_modules())  # before peft wraps any of them
    linear = {  # of the language model: training on text leaves the towers as they are
        name
        for name, module in modules.items()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not re.fullmatch(NON_TEXT_TOWERS, name)
    }
    try:
        peft_model = get_peft_model(model, lora_config(config, model))
    except ValueError as exc:  # nothing matched, say: the same words training would say
        raise target_modules_error(exc) from None
    prefix = "base_model.model."
    parameters = sorted(w.parameter for w in wrappers(peft_model).values())
    touched = {
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)
    } | set(parameters)
    configured = config.lora.target_modules
    rewritten = "experts" in _by_kind(set(parameters))  # peft moved the MLP names there
    targets = LoraTargets(
        model_type=model_config.model_type,
        modules=len(touched),
        touched=_by_kind(touched),
        parameters=parameters,
        missed=_by_kind({p for p in linear - touched if kind_of(p) in ("attention", "MLP")}),
        unmatched=[]
        if configured == "all-linear"
        else sorted(
            t
            for t in configured
            if not any(p == t or p.endswith(f".{t}") for p in modules)
            and not (t in MLP_NAMES and rewritten)
        ),
    )
    check_foldable(model, parameters)  # before training: the merge can put it back
    targets.warnings = _warnings(targets, configured, model)
    return targets


def _warnings(targets: LoraTargets, configured: list[str] | str, model: Any) -> list[str]:
    """What the user most likely did not mean: names the family does not have while its
    attention or MLP layers go untrained, MLP layers peft's MoE rewrite leaves out, and
    experts no target reaches."""
    warnings = []
    if targets.unmatched and targets.missed:
        missed = ", ".join(n for names in targets.missed.values() for n in names)
        warnings.append(
            f"lora.target_modules names {', '.join(targets.unmatched)}, which this "
            f"{targets.model_type} does not have, and its {missed} get no LoRA: add them to "
            "lora.target_modules, or use all-linear"
        )
    aims_at_mlp = configured == "all-linear" or bool(MLP_NAMES.intersection(configured))
    if aims_at_mlp and "experts" in targets.touched and "MLP" in targets.missed:
        warnings.append(
            f"peft moves the MLP names of this {targets.model_type} onto its experts' fused "
            f"tensors, so its dense MLP layers and shared experts "
            f"({', '.join(targets.missed['MLP'])}) get no LoRA and keep their base weights"
        )
    experts = any(kind_of(name) == "experts" for name, _ in model.named_parameters())
    if aims_at_mlp and experts and "experts" not in targets.touched:
        warnings.append(
            f"the experts of this {targets.model_type} are fused tensors, which "
            "lora.target_modules does not reach: only attention and the dense layers are trained"
        )
    return warnings


def check_lora_targets(config: Config, base: BaseModel) -> tuple[LoraTargets | None, list[str]]:
    """`plan_lora_targets` for the preflight: its refusals stand; a model that cannot be built
    here (custom code without trust_remote_code, say) is left for training to report."""
    try:
        targets = plan_lora_targets(config, base)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plan is advice; training loads the model
        return None, [f"LoRA targets not worked out before training ({first_line(exc)})"]
    return targets, [targets.describe()] + [f"warning: {w}" for w in targets.warnings]
