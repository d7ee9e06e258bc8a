"""The `hf` backend: transformers + peft, on the CPU or any GPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.backends.base import set_padding, target_modules_error
from llm_finetune.distributed import local_rank, shards_weights

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config
    from llm_finetune.hub import PublishTarget


def training_dtype(requested: str) -> Any:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model or adapter folder (or Hub id), padded as for training."""
    from transformers import AutoTokenizer

    return set_padding(
        AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    )


# The towers of image-text checkpoints (Gemma 3 4B+, Gemma 3n, Mistral 3, Qwen3.5, LLaVA):
# training on text never runs them, so LoRA there would add weights that stay untrained.
# LLaMA-Factory freezes the vision tower by default and Unsloth's finetune_vision_layers too.
NON_TEXT_TOWERS = (
    r"(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector|audio_tower"
    r"|embed_vision|embed_audio)(\..*)?"
)


def lora_config(config: Config, model: Any) -> Any:
    """The run's LoRA settings as peft takes them, for `model`: its language model only."""
    from peft import LoraConfig

    towers = any(re.fullmatch(NON_TEXT_TOWERS, name) for name, _ in model.named_modules())

    settings = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        use_rslora=config.lora.use_rslora,
        bias=config.lora.bias,
        exclude_modules=NON_TEXT_TOWERS if towers else None,  # peft warns on no match
        task_type="CAUSAL_LM",
    )
    _moe_targets(settings, model, config.lora.target_modules)
    return settings


# A MoE layer's router, a parameter (`mlp.gate.weight`: Mixtral, Qwen-MoE; gpt-oss's
# `mlp.router.weight`) or a Linear module (PhiMoE's `mlp.router`).
ROUTER = r"(.*\.)?(gate|router)"
# The experts' fused tensors each MLP name reaches, as Unsloth's get_moe_target_parameters
# maps them.
EXPERT_TENSORS = {
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def _moe_targets(settings: Any, model: Any, configured: list[str] | str) -> None:
    """What LoRA lands on in a transformers-5 MoE, settled here (get_peft_model then finds
    nothing left to rewrite), as Unsloth settles it:
    - peft's rewrite of MLP names onto the experts' fused tensors (Mixtral, Qwen-MoE, ...);
    - the same for families peft has no rewrite for, whose experts are stored fused (gpt-oss),
      so that gate_proj/up_proj/down_proj train the experts there too;
    - `all-linear` leaves the routers out (peft's rewrite adds them): LoRA there moves tokens
      between experts while nothing here trains the load balance. A router named in
      target_modules is still trained."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    convert_peft_config_for_transformers(settings, model, conversions=None)
    parameters = set(settings.target_parameters or [])
    if configured == "all-linear":
        parameters = {p for p in parameters if not re.fullmatch(rf"{ROUTER}\.weight", p)}
    names = EXPERT_TENSORS if configured == "all-linear" else set(configured) & set(EXPERT_TENSORS)
    fused = {
        name.rsplit(".", 1)[-1]
        for name, tensor in model.named_parameters()
        if tensor.dim() == 3 and ".experts." in name
    }
    reached = {p.rsplit(".", 1)[-1] for p in parameters}
    for name in names:
        tensor = next((t for t in EXPERT_TENSORS[name] if t in fused), None)
        if tensor is not None and tensor not in reached:
            parameters.add(f"experts.{tensor}")
    settings.target_parameters = sorted(parameters) or None
    routers = fused and any(re.fullmatch(ROUTER, name) for name, _ in model.named_modules())
    if configured == "all-linear" and routers:
        towers = settings.exclude_modules
        settings.exclude_modules = ROUTER if towers is None else f"({towers})|({ROUTER})"


def training_device_map(cuda: bool) -> dict[str, int] | None:
    """Where each process loads the base: its own GPU (LOCAL_RANK, not cuda:0 for all);
    nowhere in particular under FSDP / ZeRO-3, which shard and place it themselves (ZeRO-3
    refuses a device_map); the CPU without CUDA."""
    if not cuda or shards_weights():
        return None
    return {"": local_rank()}


class HFBackend:
    """transformers + peft load and train; the streaming merge (`llm_finetune.merge`) saves."""

    name = "hf"
    verifies_in_fresh_process = False
    samples_after_training = False

    def prepare(self, config: Config) -> None:
        """Nothing to import first, nothing this backend refuses."""

    def load_for_training(self, config: Config, base: BaseModel) -> tuple[Any, Any]:
        import torch
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import set_seed

        from llm_finetune.checkpoint_names import load_pretrained

        tokenizer = load_tokenizer(base.path, base.revision, config.model.trust_remote_code)
        dtype = training_dtype(config.model.dtype)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "revision": base.revision,
            "trust_remote_code": config.model.trust_remote_code,
        }
        if config.model.attn_implementation:
            kwargs["attn_implementation"] = config.model.attn_implementation
        if config.model.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
                # a float storage type lets FSDP / ZeRO-3 shard the 4-bit weights (peft's recipe)
                bnb_4bit_quant_storage=dtype,
            )
        device_map = training_device_map(torch.cuda.is_available())
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = load_pretrained(base.path, **kwargs)
        if config.model.load_in_4bit and not shards_weights():
            # FSDP / ZeRO-3 need one dtype per shard: no fp32 upcast of the norms there
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=config.training.gradient_checkpointing
            )
        # The LoRA init draws random numbers: seed it (Unsloth's random_state) so every process
        # and every re-run starts from the same adapter.
        set_seed(config.training.seed)
        try:
            model = get_peft_model(model, lora_config(config, model))
        except ValueError as exc:
            raise target_modules_error(exc) from None
        return model, tokenizer

    def sample(self, model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
        raise NotImplementedError("the hf backend takes no sample after training")

    def save_merged(
        self,
        model: Any,
        tokenizer: Any,
        base: BaseModel,
        adapter_dir: Path,
        output_dir: Path,
        config: Config,
    ) -> dict[str, Any]:
        """The adapter on disk merged into the base's original 16-bit shards, one at a time
        (the model in memory is not used: it may be 4-bit or sharded)."""
        from llm_finetune.merge import merge

        report = merge(
            base.path,
            adapter_dir,
            output_dir,
            dtype=config.merge.dtype,
            overwrite=config.overwrite,
            revision=base.revision,
            progress=print,
        )
        return report.as_dict()

    def pushes_merged(self, config: Config) -> bool:
        return False

    def push_merged(
        self,
        model: Any,
        tokenizer: Any,
        target: PublishTarget,
        config: Config,
        commit_message: str,
        staging: Path,
        merge_facts: dict[str, Any],
    ) -> dict[str, Any]:
        raise NotImplementedError("the hf backend publishes the merged folder, not the model")

    def merged_copies(self, config: Config) -> int:
        return 1

    def memory_beside_verification(self, config: Config, parameters: int) -> int:
        return 0  # the trained model is freed before verification
