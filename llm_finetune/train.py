"""LoRA training with trl's SFTTrainer / DPOTrainer, then the adapter is saved, always.

The adapter is written into its own folder (atomically) before anything is merged: merging
is irreversible, and the adapter is the cheapest copy of what the GPU hours bought.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.distributed import (
    check_trainer_engine,
    is_main_process,
    trainer_engine,
    world_size,
)
from llm_finetune.fsutil import atomic_dir
from llm_finetune.runlog import log

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from llm_finetune.config import Config


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss_first: float | None
    train_loss_last: float | None
    eval_loss: float | None
    train_samples: int
    train_tokens: int  # tokens in the training set
    seconds: float
    tokens_seen: int | None = None  # tokens processed by training (all epochs/steps)
    train_runtime: float | None = None  # seconds inside the training loop, as the trainer reports
    tokens_per_second: float | None = None
    peak_gpu_memory_gb: float | None = None
    engine: str = "single"  # single, ddp, fsdp or deepspeed: what the trainer set up
    processes: int = 1
    losses: list[float] = field(default_factory=list)
    eval_loss_best: float | None = None  # the lowest eval loss logged while training
    eval_loss_best_step: int | None = None
    # what was logged, by step: loss, eval_loss, learning_rate (the plots are drawn from it)
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate_prompts(dataset: Dataset, tokenizer: Any, max_prompt_tokens: int) -> Dataset:
    """Keep the last `max_prompt_tokens` tokens of each DPO prompt (the part next to the answer).

    trl 1.x dropped DPOConfig.max_prompt_length; the handbook's key keeps its meaning here.
    """

    def cut(example: dict[str, str]) -> dict[str, str]:
        encoded = tokenizer(
            example["prompt"], add_special_tokens=False, return_offsets_mapping=True
        )
        offsets = encoded["offset_mapping"]
        if len(offsets) <= max_prompt_tokens:
            return example
        start = offsets[-max_prompt_tokens][0]
        return {**example, "prompt": example["prompt"][start:]}

    return dataset.map(cut)


def _precision_flags(dtype_name: str) -> dict[str, bool]:
    import torch

    from llm_finetune.backends.hf import training_dtype

    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": False, "fp16": False}
    dtype = training_dtype(dtype_name)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def training_arguments(config: Config, checkpoints: Path) -> Any:
    """trl's SFTConfig / DPOConfig for this run.

    Built before the model is loaded, as trl's own scripts do: creating them starts the
    process group and selects this process's GPU, which FSDP's CPU-efficient loading and
    ZeRO-3's partitioned loading need at load time.
    """
    from llm_finetune.progress import bars_wanted
    from llm_finetune.tracking import quiet_unrequested_trackers, trackers

    quiet_unrequested_trackers(config)  # before trl's import, which sends the first notice
    t = config.training
    evaluates = config.data.test_size > 0
    common: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "optim": t.optim,
        "weight_decay": t.weight_decay,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps,
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "gradient_checkpointing": t.gradient_checkpointing,
        "eval_strategy": "steps" if evaluates else "no",
        "eval_steps": (t.eval_steps or t.logging_steps) if evaluates else None,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": 2,
        "report_to": trackers(config),
        "run_name": config.run_name,
        "disable_tqdm": not bars_wanted(),
        "dataloader_pin_memory": False,
        "ddp_find_unused_parameters": False,  # LoRA: every adapter weight is used in forward
        **_precision_flags(config.model.dtype),
    }
    if config.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(
            **common,
            beta=t.beta,
            max_length=t.max_length or config.model.max_seq_length,
        )
    from trl import SFTConfig

    return SFTConfig(
        **common,
        max_length=config.model.max_seq_length,
        packing=t.packing,
        dataset_text_field="text",
    )


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _balance_loss_coefficient(model: Any, args: Any) -> float:
    """The weight of the MoE load-balancing loss trl adds (0 for a dense model): trl turns it
    on wherever the config has output_router_logits and a coefficient, whatever the config's
    own output_router_logits says."""
    text_config = _base_model(model).config.get_text_config()
    if not hasattr(text_config, "output_router_logits"):
        return 0.0
    if args.router_aux_loss_coef is not None:
        return args.router_aux_loss_coef
    return getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0


def balance_loss_problem(model: Any) -> str | None:
    """Why this MoE's forward cannot add the load-balancing loss, found from its classes (no
    forward pass): in transformers 5.17 GraniteMoE's decoder records no router logits (its
    loss is the int 0) and Llama 4's causal LM returns no aux_loss; both fail at the first step."""
    import dataclasses
    import typing

    base = _base_model(model)
    if not any(
        "router_logits" in (getattr(m, "_can_record_outputs", None) or {}) for m in base.modules()
    ):
        return f"{type(base).__name__}'s decoder does not record its router logits"
    returned = typing.get_type_hints(type(base).forward).get("return")
    outputs = [t for t in typing.get_args(returned) or (returned,) if dataclasses.is_dataclass(t)]
    if outputs and not any("aux_loss" in {f.name for f in dataclasses.fields(t)} for t in outputs):
        return f"{type(base).__name__} returns no aux_loss"
    return None


# Config keys by which a causal LM scales its logits (or the hidden states before the head)
# that trl's chunked loss does not apply (it applies logit_scale, output_multiplier and
# final_logit_softcapping): Granite's and MiniCPM3's logits_scaling, Falcon-H1's
# lm_head_multiplier. Found by reading transformers 5.17's modeling files for what follows
# `lm_head(`; the chunked loss would train such a model on logits its own forward never makes.
UNCHUNKED_LOGIT_SCALES = ("logits_scaling", "lm_head_multiplier")


def sft_loss_type(model: Any, args: Any) -> str:
    """trl's default, its chunked cross-entropy (the head's matmul only on trained tokens),
    where that computes the model's own loss; else the model's own loss, "nll". The chunked
    path reads the head's weight directly, so trl refuses it when LoRA is on lm_head; it runs
    the decoder as `base_model`, which Llama 4's causal LM does not name (it is the model
    itself); it reads `num_experts` for a MoE's load-balancing loss, which PhiMoE's and
    GraniteMoE's configs call otherwise (these fail at the first step); and it leaves out
    the logit scales in UNCHUNKED_LOGIT_SCALES (silently)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if args.loss_type != "chunked_nll":
        return args.loss_type
    base = _base_model(model)
    if isinstance(base.get_output_embeddings(), BaseTunerLayer) or base.base_model is base:
        return "nll"
    text_config = base.config.get_text_config()
    if any(getattr(text_config, key, 1.0) != 1.0 for key in UNCHUNKED_LOGIT_SCALES):
        return "nll"
    counts = all(hasattr(text_config, k) for k in ("num_experts", "num_experts_per_tok"))
    if _balance_loss_coefficient(model, args) and not counts:
        return "nll"
    return "chunked_nll"


def fit_to_model(args: Any, model: Any) -> None:
    """Adjust trl's settings where its defaults fail on this model, saying so."""
    if _balance_loss_coefficient(model, args) and (problem := balance_loss_problem(model)):
        log(f"    no MoE load-balancing loss: {problem} in this transformers")
        args.router_aux_loss_coef = 0.0
    if hasattr(args, "dataset_text_field"):  # SFT
        args.loss_type = sft_loss_type(model, args)


def build_trainer(
    config: Config, args: Any, model: Any, tokenizer: Any, splits: DatasetDict
) -> Any:
    fit_to_model(args, model)
    if config.method == "dpo":
        from trl import DPOTrainer

        train_set = splits["train"]
        if config.training.max_prompt_length:
            train_set = truncate_prompts(train_set, tokenizer, config.training.max_prompt_length)
        return DPOTrainer(
            model=model,
            ref_model=None,  # with a peft model, the reference is the base with adapters off
            args=args,
            train_dataset=train_set,
            eval_dataset=splits.get("test"),
            processing_class=tokenizer,
        )
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )


def save_adapter(
    trainer: Any, tokenizer: Any, adapter_dir: Path, checkpoints: Path, overwrite: bool
) -> None:
    """Every process calls this: the trainer gathers FSDP/ZeRO-3 shards of the adapter (a
    known source of empty adapters when skipped) and only the main process writes; the
    folder is then moved into place atomically."""
    gathered = checkpoints / "final-adapter"  # the same path in every process
    if trainer.is_fsdp_enabled:  # sharded checkpoints while training, the full adapter at the end
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(gathered))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    (gathered / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest has it all
    tokenizer.save_pretrained(gathered)
    with atomic_dir(adapter_dir, overwrite=overwrite, what="adapter folder") as staging:
        for path in gathered.iterdir():
            path.rename(staging / path.name)
    gathered.rmdir()


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def train(
    config: Config,
    args: Any,
    model: Any,
    tokenizer: Any,
    splits: DatasetDict,
    adapter_dir: Path,
    resume_from: str | None = None,
) -> TrainResult | None:
    """Train with `args` (from `training_arguments`), from `resume_from` (a trainer checkpoint)
    if given; save the adapter (+ tokenizer) atomically into `adapter_dir`; return the figures
    (None in processes other than the main)."""
    import torch

    from llm_finetune.tracking import attach as attach_trackers
    from llm_finetune.tracking import clear_tensorboard

    start = time.perf_counter()
    checkpoints = Path(args.output_dir)
    trainer = build_trainer(config, args, model, tokenizer, splits)
    check_trainer_engine(trainer)
    if resume_from is None and is_main_process():
        clear_tensorboard(config)
    attach_trackers(trainer, config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train(resume_from_checkpoint=resume_from)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    eval_loss = None
    if "test" in splits:
        logged = [e for e in trainer.state.log_history if "eval_loss" in e]
        if logged and logged[-1].get("step") == trainer.state.global_step:
            eval_loss = _finite(logged[-1]["eval_loss"])  # evaluated at the last step already
        else:
            eval_loss = _finite(trainer.evaluate().get("eval_loss"))
    save_adapter(trainer, tokenizer, adapter_dir, checkpoints, config.overwrite)
    if not is_main_process():
        return None
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    history = logged_history(trainer.state.log_history)
    evals = [(e["eval_loss"], e["step"]) for e in history if "eval_loss" in e]
    best = min(evals) if evals else (None, None)
    seen = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    runtime = (output.metrics or {}).get("train_runtime")
    tokens_seen = int(seen[-1]) if seen else None
    train_set = trainer.train_dataset
    tokens = 0
    if "input_ids" in train_set.column_names:
        tokens = sum(len(ids) for ids in train_set["input_ids"])
    return TrainResult(
        adapter_dir=str(adapter_dir),
        steps=trainer.state.global_step,
        train_loss_first=_finite(losses[0]) if losses else None,
        train_loss_last=_finite(losses[-1]) if losses else None,
        eval_loss=eval_loss,
        train_samples=len(train_set),
        train_tokens=tokens,
        seconds=round(time.perf_counter() - start, 3),
        tokens_seen=tokens_seen,
        train_runtime=runtime,
        tokens_per_second=round(tokens_seen / runtime, 1) if tokens_seen and runtime else None,
        peak_gpu_memory_gb=round(peak_gpu, 3) if peak_gpu is not None else None,
        engine=trainer_engine(trainer),
        processes=world_size(),
        losses=[round(float(x), 5) for x in losses],
        eval_loss_best=best[0],
        eval_loss_best_step=best[1],
        history=history,
    )


HISTORY_KEYS = ("loss", "eval_loss", "learning_rate")


def logged_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The trainer's log, by step, reduced to what the summary and the plots use."""
    history = []
    for entry in log_history:
        kept = {k: round(v, 8) for k in HISTORY_KEYS if (v := _finite(entry.get(k))) is not None}
        if kept and "step" in entry:
            history.append({"step": int(entry["step"]), **kept})
    return history
