"""The Unsloth side of tests/test_unsloth_backend.py, in a process of its own.

Unsloth must be imported before transformers, peft and trl, and importing it patches them for
the whole process, so the test runs `python -m tests.unsloth_child '<json>'` and reads the
`REPORT {...}` line printed last. Here: load + LoRA with FastLanguageModel, the project's trl
training, save_pretrained_merged, push_to_hub_merged to the test's local Hub server, and
Unsloth's GPU save and push routes (from its source, on the CPU). Importing this module
imports nothing heavy, and pytest does not collect it (no test_ prefix).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What a load from a Hub id leaves; Unsloth's name mapper sends it to another repo.
HUB_ID = "meta-llama/Llama-3.1-8B"


def generate(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    import torch
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=8, do_sample=False)
    return ids[0, enc["input_ids"].shape[1] :].tolist()


def unsloths_gpu_push_route(model: Any, merged: Path) -> tuple[Callable[..., Any], list[Any]]:
    """Unsloth's GPU push route (unsloth/save.py `_push_merged_to_hub_revision`; the module
    imports only on GPU machines), run from its source, with its merge replaced by a copy of
    the `merged` folder: the part that talks to the Hub. Returns the stand-in for
    `model.push_to_hub_merged` and the list of the merges it made."""
    import ast
    import os
    import shutil

    import unsloth
    from huggingface_hub import HfApi
    from peft import PeftModel

    source = (Path(unsloth.__file__).parent / "save.py").read_text()
    wanted = {"_push_merged_to_hub_revision", "_determine_username", "MODEL_CARD"}
    parts = [
        ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if (isinstance(node, ast.FunctionDef) and node.name in wanted)
        or (
            isinstance(node, ast.Assign) and {getattr(t, "id", None) for t in node.targets} & wanted
        )
    ]
    merges: list[Any] = []

    def merge_into(save_directory: str, **kwargs: Any) -> None:
        """Stands in for unsloth_generic_save's local merge; records where it finds the base."""
        merges.append([kwargs["push_to_hub"], model.config._name_or_path])
        shutil.copytree(merged, save_directory, dirs_exist_ok=True)

    gpu = {
        "HfApi": HfApi,
        "get_token": lambda: None,
        "os": os,
        "Path": Path,
        "PeftModel": PeftModel,
        "unsloth_generic_save": merge_into,
    }
    exec("\n\n".join(parts), gpu)

    def gpu_route(
        repo_id: str,
        tokenizer: Any = None,
        save_method: str = "merged_16bit",
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Trained with Unsloth",
        revision: str | None = None,
    ) -> Any:
        # unsloth_generic_save(...) with a revision: `return _push_merged_to_hub_revision(locals())`
        return gpu["_push_merged_to_hub_revision"](
            dict(
                model=model,
                tokenizer=tokenizer,
                save_directory=repo_id,
                save_method=save_method,
                token=token,
                private=private,
                commit_message=commit_message,
                revision=revision,
                commit_description="Upload model trained with Unsloth 2x faster",
                create_pr=False,
                datasets=None,
                tags=None,
                is_main_process=True,
            )
        )

    return gpu_route, merges


def unsloths_gpu_save(model: Any, saver_module: str) -> tuple[Callable[..., None], list[str]]:
    """Unsloth's GPU save, save_pretrained_merged -> unsloth_generic_save -> unsloth_zoo's
    merge_and_overwrite_lora, whose wrapper module needs a GPU to import; the merge itself (the
    original 16-bit shards re-read, the LoRA added in float32) runs on the CPU too. Returns the
    stand-in for `model.save_pretrained_merged` and the base names it was asked to resolve."""
    import os

    from unsloth_zoo.saving_utils import merge_and_overwrite_lora

    base_names: list[str] = []

    def get_model_name(name: str, load_in_4bit: bool = False) -> str:
        """loader_utils.get_model_name, in short: a folder as is, a Hub id to Unsloth's copy
        (unsloth/Llama-3.1-8B)."""
        base_names.append(name)
        return name if os.path.isdir(name) else "unsloth/" + name.split("/")[-1]

    def gpu_save(
        save_directory: str, tokenizer: Any = None, save_method: str = "merged_16bit", **kwargs: Any
    ) -> None:
        merge_and_overwrite_lora(
            get_model_name,
            model=model,
            tokenizer=tokenizer,
            save_directory=str(save_directory),
            push_to_hub=False,
            private=False,
            token=None,
            save_method=save_method,
            output_dtype=None,
            low_disk_space_usage=True,
            use_temp_file=False,
        )

    gpu_save.__module__ = saver_module  # as Unsloth binds it on a GPU
    return gpu_save, base_names


def main(args: dict[str, Any]) -> dict[str, Any]:
    from llm_finetune.backends import unsloth as backend_module

    start = time.perf_counter()
    backend_module.import_unsloth(strict=True)  # first: before transformers, peft, trl
    import_seconds = time.perf_counter() - start

    import tempfile

    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config
    from llm_finetune.data import format_dataset, inference_prompt, load_raw
    from llm_finetune.errors import UserError
    from llm_finetune.train import train, training_arguments

    out = Path(args["out"])
    config = Config.model_validate(args["config"])
    backend = backend_module.UnslothBackend()
    base = BaseModel(args["base"], args["base"])
    training_args = training_arguments(config, out / "checkpoints")
    model, tokenizer = backend.load_for_training(config, base)
    splits = format_dataset(load_raw(config.data), config.data, tokenizer)
    result = train(config, training_args, model, tokenizer, splits, out / "adapter")
    prompt = inference_prompt("alpaca", "Write the number 47 in words.", tokenizer)

    report: dict[str, Any] = {"import_seconds": import_seconds, "train": result.as_dict()}
    report["generation_before_save"] = generate(model, tokenizer, prompt)
    started = time.perf_counter()
    report["merge"] = backend.save_merged(
        model, tokenizer, base, out / "adapter", out / "merged", config
    )
    report["merge_seconds"] = time.perf_counter() - started
    try:
        backend.save_merged(model, tokenizer, base, out / "adapter", out / "merged", config)
        report["second_save"] = "overwrote"
    except UserError as exc:
        report["second_save"] = str(exc)
    report["model_type_after_save"] = type(model).__name__
    report["generation_after_save"] = generate(model, tokenizer, prompt)

    started = time.perf_counter()
    report["push"] = backend_module.push_merged(
        model,
        tokenizer,
        args["repo_id"],
        args["token"],
        private=False,
        commit_message="llm-finetune test push",
        endpoint=args["endpoint"],
        merge_dtype=config.merge.dtype,
    )
    report["push_seconds"] = time.perf_counter() - started
    card = out / "card.md"
    card.write_text("---\nlibrary_name: transformers\n---\n# our card\n")
    report["push_with_card"] = backend_module.push_merged(
        model,
        tokenizer,
        args["repo_id"] + "-card",
        args["token"],
        endpoint=args["endpoint"],
        merge_dtype=config.merge.dtype,
        readme=card,
    )
    tempdir_before = tempfile.tempdir
    report["push_to_branch"] = backend_module.push_merged(
        model,
        tokenizer,
        args["repo_id"] + "-branch",
        args["token"],
        endpoint=args["endpoint"],
        commit_message="to a branch",
        merge_dtype=config.merge.dtype,
        revision="dev",
        staging=out / "push-staging",
    )
    report["staging_left"] = (out / "push-staging").exists() or tempfile.tempdir != tempdir_before

    gpu_route, merges = unsloths_gpu_push_route(model, out / "merged")
    cpu_route, model.push_to_hub_merged = model.push_to_hub_merged, gpu_route
    model.config._name_or_path = HUB_ID
    try:
        report["push_gpu_route"] = backend_module.push_merged(
            model,
            tokenizer,
            args["repo_id"] + "-gpu",
            args["token"],
            endpoint=args["endpoint"],
            commit_message="the gpu route",
            merge_dtype=config.merge.dtype,
            revision="dev",
            staging=out / "gpu-staging",
            base_folder=Path(args["base"]),
        )
    finally:
        model.push_to_hub_merged = cpu_route
    report["gpu_route_merges"] = merges
    report["name_after_push"] = model.config._name_or_path

    # Unsloth's GPU save through the backend's save_merged.
    gpu_save, base_names = unsloths_gpu_save(model, backend_module.GPU_SAVER_MODULE)
    cpu_save, model.save_pretrained_merged = model.save_pretrained_merged, gpu_save
    try:
        report["gpu_merge"] = backend.save_merged(
            model, tokenizer, base, out / "adapter", out / "gpu-merged", config
        )
    finally:
        model.save_pretrained_merged = cpu_save
    report["gpu_merge_base_names"] = base_names
    report["name_after_save"] = model.config._name_or_path
    model.config._name_or_path = args["base"]

    # Unsloth's own choice, without the backend's dtype override.
    from unsloth_zoo.cpu.runtime import cpu_bf16_supported

    report["cpu_bf16_native"] = cpu_bf16_supported()
    raw = out / "merged-raw"
    model.save_pretrained_merged(str(raw), tokenizer, save_method="merged_16bit")
    report["raw_unsloth_dtype"] = json.loads((raw / "config.json").read_text())["dtype"]
    tokenizer_config = json.loads((raw / "tokenizer_config.json").read_text())
    report["raw_padding_side"] = tokenizer_config["padding_side"]
    try:  # endpoint=None: huggingface_hub's endpoint as read at import (HF_ENDPOINT, a dead port)
        backend_module.push_merged(model, tokenizer, args["repo_id"] + "-2", args["token"])
        report["push_default_endpoint"] = "pushed"
    except UserError as exc:
        report["push_default_endpoint"] = str(exc)
    return report


if __name__ == "__main__":
    print("REPORT " + json.dumps(main(json.loads(sys.argv[1]))))
