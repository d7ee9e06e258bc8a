"""The `hf` backend: transformers + peft, on the CPU or any GPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.distributed import local_rank, shards_weights
from llm_finetune.errors import UserError

if TYPE_CHECKING:
    from llm_finetune.config import Config, ModelConfig


def training_dtype(requested: str) -> Any:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(base_path: str, model_config: ModelConfig) -> Any:
    """The base tokenizer, with a PAD token (EOS, as the handbook does) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base_path,
        revision=model_config.revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def lora_config(config: Config) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        use_rslora=config.lora.use_rslora,
        bias=config.lora.bias,
        task_type="CAUSAL_LM",
    )


def training_device_map(cuda: bool) -> dict[str, int] | None:
    """Where each process loads the base: its own GPU (LOCAL_RANK, not cuda:0 for all);
    nowhere in particular under FSDP / ZeRO-3, which shard and place it themselves (ZeRO-3
    refuses a device_map); the CPU without CUDA."""
    if not cuda or shards_weights():
        return None
    return {"": local_rank()}


class HFBackend:
    name = "hf"

    def load_for_training(self, config: Config, base_path: str) -> tuple[Any, Any]:
        import torch
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, set_seed

        tokenizer = load_tokenizer(base_path, config.model)
        dtype = training_dtype(config.model.dtype)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "revision": config.model.revision,
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
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        if config.model.load_in_4bit and not shards_weights():
            # FSDP / ZeRO-3 need one dtype per shard: no fp32 upcast of the norms there
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=config.training.gradient_checkpointing
            )
        # The LoRA init draws random numbers: seed it (Unsloth's random_state) so every process
        # and every re-run starts from the same adapter.
        set_seed(config.training.seed)
        try:
            model = get_peft_model(model, lora_config(config))
        except ValueError as exc:  # e.g. target modules not found in the model
            raise UserError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None
        return model, tokenizer

    def save_merged(
        self,
        model: Any,
        tokenizer: Any,
        base_path: str,
        adapter_dir: Path,
        output_dir: Path,
        config: Config,
    ) -> dict[str, Any]:
        from llm_finetune.merge import merge

        report = merge(
            base_path,
            adapter_dir,
            output_dir,
            dtype=config.merge.dtype,
            overwrite=config.overwrite,
            revision=config.model.revision,
            progress=print,
        )
        return report.as_dict()
