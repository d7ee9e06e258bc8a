"""Everything that can fail without a GPU, checked before the model is loaded: the backend,
the launch, the base model (pinned to one commit), the outputs a re-run reuses, the data, the
disk and memory the save and its check need, and the Hub token and namespace."""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.base_model import BaseModel, BaseWeights, base_weights, resolve_base
from llm_finetune.distributed import check_launch, is_main_process
from llm_finetune.errors import UserError
from llm_finetune.exports.stage import toolchain_problems
from llm_finetune.hub import PublishTarget
from llm_finetune.runlog import log

if TYPE_CHECKING:
    from llm_finetune.backends.base import Backend
    from llm_finetune.config import Config
    from llm_finetune.lora_targets import LoraTargets
    from llm_finetune.resume import Reuse

PUSH_STAGING = ".unsloth-push"  # in output_dir: a backend push's temporary copy of the model


@dataclass
class Preflight:
    base: BaseModel
    backend: Backend
    backend_reason: str
    raw_data: Any
    reuse: Reuse
    publish: PublishTarget | None = None
    lora_targets: LoraTargets | None = None  # None: no training ahead, or not worked out
    eval_data: Any = None  # evaluate.dataset's rows, when the config names one


def preflight(config: Config, until: str, stack: contextlib.ExitStack) -> Preflight:
    """Check what a run to `until` ("train" or "publish") needs; the local Hub server, if
    any, is stopped by `stack`."""
    from llm_finetune.backends import choose_backend, get_backend

    out = config.output_path
    choice = choose_backend(config.backend)
    log(f"    {choice.reason}")
    backend = get_backend(choice.name)
    backend.prepare(config)  # first: a backend may have to be imported before transformers
    import torch

    cuda = torch.cuda.is_available()
    launch = check_launch(cuda)
    if config.model.load_in_4bit and not cuda:
        raise UserError("model.load_in_4bit needs a CUDA GPU; set it to false on this machine")
    if "8bit" in config.training.optim and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"training.optim {config.training.optim!r} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (GPU boxes: pip install -e '.[gpu]'), or use adamw_torch"
        )
    base = resolve_base(config.model)
    pinned = f" at commit {base.revision}" if base.on_hub else ""
    log(f"    base model: {base.path}{pinned}")
    from llm_finetune.resume import inspect_outputs

    reuse = inspect_outputs(config, until, base)
    log(f"    outputs: {reuse.describe()} ({out})")
    targets = None
    if reuse.adapter is None:  # training ahead
        from llm_finetune.lora_targets import check_lora_targets

        targets, lines = check_lora_targets(config, base)
        for line in lines:
            log(f"    {line}")
    from llm_finetune.data import load_raw

    raw = load_raw(config.data)
    log(f"    data: {len(raw)} rows from {len(config.data.datasets)} source(s)")
    report = Preflight(base, backend, choice.reason, raw, reuse, lora_targets=targets)
    if launch:
        log(f"    {launch}")
    if not is_main_process():
        return report
    if reuse.adapter is None:  # trackers watch training
        from llm_finetune.tracking import check_trackers

        log(f"    {check_trackers(config)}")
    if until == "publish" and reuse.merged is None:
        check_base_precision(base, config, backend.name)
        if removed := remove_leftovers(out):
            log(f"    {removed}")
        weights = base_weights(base)
        copies = backend.merged_copies(config)
        formats = tuple(config.export.formats)
        log(f"    {check_disk(weights, out, config.merge.dtype, copies, formats)}")
        if config.verify.enabled:
            log(f"    {check_verify_memory(base, config, backend)}")
    if until == "publish" and config.evaluates:
        check_evaluation(config, report)
    if until == "publish" and config.export.exported:
        log(f"    {check_export_tools(config, base)}")
    if until == "publish" and config.publish.enabled:
        report.publish = check_publish_target(config, stack)
    return report


def check_evaluation(config: Config, report: Preflight) -> None:
    """What the evaluation stage reads, loaded before training: evaluate.dataset's rows
    (kept in `report`), and the lm-eval tasks with their data."""
    if config.evaluate.dataset is not None:
        from llm_finetune.data import load_source

        rows = load_source(config.evaluate.dataset, "evaluate.dataset", config.data.format)
        report.eval_data = rows
        log(f"    evaluation data: {len(rows)} rows from {config.evaluate.dataset.path}")
    if config.evaluate.lm_eval_tasks:
        from llm_finetune.general_ability import check_tasks

        log(f"    {check_tasks(config.evaluate)}")


def check_base_precision(base: BaseModel, config: Config, backend: str) -> None:
    """A quantized base is refused before training, not at the merge: the streaming merge
    needs its 16-bit weights. Unsloth's save re-reads the 16-bit original of its own bnb-4bit
    repos, so there only MXFP4 (gpt-oss as released) is refused."""
    from transformers import AutoConfig

    from llm_finetune.merge import is_mxfp4, refuse_quantized_base

    model_config = AutoConfig.from_pretrained(
        base.path, revision=base.revision, trust_remote_code=config.model.trust_remote_code
    )
    quantization = getattr(model_config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    facts = {"quantization_config": quantization}
    if backend == "hf" or is_mxfp4(facts):
        refuse_quantized_base(facts, base.name)


def check_export_tools(config: Config, base: BaseModel) -> str:
    """What the exports need is installed, and llama.cpp's converter knows the model's
    architecture: before training, not after it."""
    if problems := toolchain_problems(config):
        raise UserError(problems[0])
    if config.export.gguf_types:
        from transformers import AutoConfig

        from llm_finetune.exports.gguf import architecture_problem

        model = AutoConfig.from_pretrained(
            base.path, revision=base.revision, trust_remote_code=config.model.trust_remote_code
        )
        if problem := architecture_problem(getattr(model, "architectures", None) or []):
            raise UserError(problem)
    tested = " and pass their self-test" if config.export.gguf_types else ""
    return f"exports: {', '.join(config.export.formats)}: the tools they need are installed{tested}"


def remove_leftovers(out: Path) -> str | None:
    """A killed run's half-written merge and a push's copy each hold up to a model's size:
    removed before the disk check counts them as used (the next merge would anyway)."""
    from llm_finetune.fsutil import leftovers

    found = [p for p in [*leftovers(out / "merged"), out / PUSH_STAGING] if p.is_dir()]
    if not found:
        return None
    size = sum(f.stat().st_size for p in found for f in p.rglob("*") if f.is_file())
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    names = ", ".join(p.name for p in found)
    return f"outputs: removed what a killed run left ({names}: {size / 1e9:.2f} GB)"


def check_disk(
    weights: BaseWeights | None,
    out: Path,
    merge_dtype: str,
    copies: int = 1,
    export_formats: tuple[str, ...] = (),
) -> str:
    """Check before training that the merged model fits: the base's 16-bit size again,
    `copies` times (a backend's push may write a second, temporary one), the exports asked
    for, plus, for a Hub base not cached yet, its download into the Hub cache (on the same
    disk or its own)."""
    from huggingface_hub import constants

    from llm_finetune.exports.stage import export_disk_need
    from llm_finetune.fsutil import check_free_disk, same_disk

    if weights is None:
        return "disk: the base's size is unknown here; the merge checks again before writing"
    merged = weights.size * (2 if merge_dtype == "float32" else 1) * copies
    label = "the merged model" if copies == 1 else f"{copies} copies of the merged model"
    on_output_disk = {label: merged}
    if exports := export_disk_need(export_formats, weights.size):
        on_output_disk["the exports"] = exports
    if weights.to_download:
        cache = Path(constants.HF_HUB_CACHE) / "base"  # where the download's folder goes
        if same_disk(cache, out):
            on_output_disk["the base's download"] = weights.to_download
        else:
            check_free_disk(cache, weights.to_download, "the base's download into the Hub cache")
    what = " and ".join(on_output_disk)
    needed = sum(on_output_disk.values())
    check_free_disk(out, needed, what)
    return f"disk: {what}: about {needed / 1e9:.2f} GB; enough is free"


def check_verify_memory(base: BaseModel, config: Config, backend: Backend) -> str:
    """Verification holds the models in float32: whole when they fit (beside what the
    backend keeps), else one layer at a time. Check before training that it fits, and say
    which way it will run, rather than fail hours later."""
    from llm_finetune.verify_memory import (
        available_memory,
        base_shapes,
        describe_memory,
        layout_of,
        lora_parameters,
        plan_memory,
    )

    shapes = base_shapes(base.path, base.revision)
    if shapes is None:
        return "memory: the base's tensors are unknown here; verification plans when it runs"
    layout = layout_of(shapes, lora_parameters(shapes, config.lora.r, config.lora.target_modules))
    beside = backend.memory_beside_verification(config, layout.parameters)
    gpus, ram = available_memory()
    cap = config.verify.max_memory
    plan = plan_memory(layout, gpus, 2**62 if ram is None else ram, cap, beside)
    if ram is None:
        return "memory: the free RAM is unknown here; verification plans when it runs"
    have = describe_memory(gpus, ram)
    return f"memory: verification will hold {plan.describe()}; this machine has {have}"


def check_publish_target(config: Config, stack: contextlib.ExitStack) -> PublishTarget:
    """The token can write every repo this run publishes to (the local server is started)."""
    from llm_finetune.hub import preflight as check_repo_access

    target = start_publish_target(config)
    if target.server is not None:
        stack.callback(target.server.stop)
        log(f"    local Hub server at {target.endpoint} (storage {target.local_storage})")
    private = config.publish.private
    checked = check_repo_access(target.repo_id, target.endpoint, target.token, private)
    for repo_id in [config.publish.adapter_repo_id, *config.export_repos().values()]:
        if repo_id:
            check_repo_access(repo_id, target.endpoint, target.token, private)
    state = "exists" if checked.repo_existed else "created"
    log(f"    publish: {checked.user} can write {target.repo_id} on {target.endpoint} ({state})")
    return target


def start_publish_target(config: Config) -> PublishTarget:
    """The Hub (or the configured endpoint) with the user's token; for `endpoint: local`, a
    Hub-compatible server on 127.0.0.1 for this run, with a token that lives in memory only."""
    from llm_finetune.hub import require_token, resolve_endpoint, resolve_token

    publish = config.publish
    assert publish.repo_id is not None  # validated by the config
    if publish.endpoint != "local":
        token = require_token(resolve_token(), alternative="set publish.enabled: false")
        return PublishTarget(publish.repo_id, resolve_endpoint(publish.endpoint), token)
    from llm_finetune.hub_server import HubServer, HubUser

    token = "hf_local_" + secrets.token_urlsafe(24)
    storage = config.output_path / "local-hub"
    namespace = publish.repo_id.split("/", 1)[0]
    server = HubServer(storage, users={token: HubUser(namespace)}).start()
    return PublishTarget(publish.repo_id, server.url, token, storage, server)
