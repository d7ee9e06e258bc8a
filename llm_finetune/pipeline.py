"""The whole run, as the handbook's steps: preflight, model, data, train, merge, verify, publish.

This module only wires the stages; each lives in its own module and runs alone from the CLI.
Everything that can fail without a GPU (config, outputs, data columns, base model, token,
namespace, disk) is checked in `preflight` before the model is loaded.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_finetune.config import Config, config_to_dict
from llm_finetune.data import format_dataset, inference_prompt
from llm_finetune.distributed import (
    OtherProcessFailed,
    announce_outcome,
    check_launch,
    check_same_resume_point,
    is_main_process,
    wait_for_main,
)
from llm_finetune.errors import UserError, exit_code_for, first_line
from llm_finetune.manifest import write_manifest
from llm_finetune.resume import Reuse, merge_fingerprint, train_fingerprint

SUMMARY_FILE = "run-summary.json"
UNSLOTH_PUSH_STAGING = ".unsloth-push"  # in output_dir: the Unsloth push's temporary copy


def log(message: str) -> None:
    if is_main_process():  # one log for a multi-process run
        print(message, flush=True)


class StageClock:
    """Prints one line per stage and records its wall time for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.current = name
        log(f"==> [{name}] {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.current = None
        log(f"    [{name}] done in {self.seconds[name]:.1f}s")


@dataclass
class PublishTarget:
    repo_id: str
    endpoint: str
    token: str | None
    local_storage: Path | None = None
    server: Any = None


@dataclass
class Preflight:
    base: str
    backend: str
    backend_reason: str
    raw_data: Any
    reuse: Reuse
    publish: PublishTarget | None = None


def resolve_base(config: Config) -> str:
    """A local folder, a builtin model (built on first use), or a Hub id whose config loads."""
    name = config.model.name
    if name.startswith("builtin:"):
        from llm_finetune.demo import resolve_builtin_model

        return str(resolve_builtin_model(name))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name {name!r} is a folder without config.json")
        return str(local)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(
            name, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except Exception as exc:  # gated, missing, offline: the user needs the reason in one line
        reason = first_line(exc)
        raise UserError(f"model.name {name!r}: cannot load its config: {reason}") from None
    return name


@dataclass(frozen=True)
class BaseWeights:
    size: int  # bytes of the safetensors files
    parameters: int
    to_download: int = 0  # bytes of them not in the Hub cache yet (a Hub id)


def base_weights(base: str, revision: str | None) -> BaseWeights | None:
    """Size and parameter count of the base's safetensors weights: from the headers on disk,
    or as the Hub lists them (None when unknown: offline, no access)."""
    local = Path(base)
    if local.is_dir():
        from math import prod

        from llm_finetune.safetensors_stream import read_header

        shards = sorted(local.glob("*.safetensors"))
        tensors = [t for shard in shards for t in read_header(shard).tensors.values()]
        return BaseWeights(
            sum(p.stat().st_size for p in shards), sum(prod(t.shape) for t in tensors)
        )
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(base, revision=revision, files_metadata=True)
    except Exception:  # offline or no access: the merge checks again before writing
        return None
    from huggingface_hub import try_to_load_from_cache

    shards = [s for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    size = sum(s.size or 0 for s in shards)
    parameters = info.safetensors.total if info.safetensors else size // 2  # 16-bit weights
    to_download = sum(
        s.size or 0
        for s in shards
        if not isinstance(try_to_load_from_cache(base, s.rfilename, revision=info.sha), str)
    )
    return BaseWeights(size, parameters, to_download)


def remove_leftovers(out: Path) -> str | None:
    """A killed run's half-written merge and Unsloth's push copy each hold up to a model's
    size: removed before the disk check counts them as used (the next merge would anyway)."""
    from llm_finetune.fsutil import leftovers

    found = [p for p in [*leftovers(out / "merged"), out / UNSLOTH_PUSH_STAGING] if p.is_dir()]
    if not found:
        return None
    size = sum(f.stat().st_size for p in found for f in p.rglob("*") if f.is_file())
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    names = ", ".join(p.name for p in found)
    return f"outputs: removed what a killed run left ({names}: {size / 1e9:.2f} GB)"


def same_disk(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` (made later if missing) land on one filesystem."""
    from llm_finetune.merge import existing_ancestor

    return (
        existing_ancestor(a.resolve()).stat().st_dev == existing_ancestor(b.resolve()).stat().st_dev
    )


def check_disk(weights: BaseWeights | None, out: Path, merge_dtype: str, copies: int = 1) -> str:
    """Check before training that the merged model fits: the base's 16-bit size again,
    `copies` times (Unsloth's push writes a second, temporary one), plus, for a Hub base not
    cached yet, its download into the Hub cache (on the same disk or its own)."""
    from huggingface_hub import constants

    from llm_finetune.merge import check_free_disk

    if weights is None:
        return "disk: the base's size is unknown here; the merge checks again before writing"
    merged = weights.size * (2 if merge_dtype == "float32" else 1) * copies
    label = "the merged model" if copies == 1 else f"{copies} copies of the merged model"
    on_output_disk = {label: merged}
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


def check_verify_memory(weights: BaseWeights | None, config: Config, backend: str) -> str:
    """Verification runs the model in float32 over every GPU and then RAM: check before
    training that they can hold it, rather than fail hours later."""
    from llm_finetune.verify import available_memory, memory_needed

    if weights is None:
        return "memory: the base's size is unknown here; verification needs 4 bytes a parameter"
    needed = memory_needed(weights.parameters)
    if backend == "unsloth" and config.publish.enabled:  # it publishes from the trained model
        needed += weights.parameters * (0.6 if config.model.load_in_4bit else 2)
    gpu, ram = available_memory()
    if ram is None:
        return "memory: the free RAM is unknown here; verification needs 4 bytes a parameter"
    have = f"{gpu / 1e9:.0f} GB of GPU memory and {ram / 1e9:.0f} GB of free RAM"
    if needed > gpu + ram:
        raise UserError(
            f"verification needs about {needed / 1e9:.0f} GB to run the model in float32 "
            f"({weights.parameters / 1e9:.1f} B parameters) and this machine has {have}: use a "
            "bigger machine, or set verify.enabled: false and run llm-finetune verify elsewhere"
        )
    return f"memory: verification needs about {needed / 1e9:.2f} GB; this machine has {have}"


def start_publish_target(config: Config, out: Path) -> PublishTarget:
    from llm_finetune.publish import resolve_endpoint, resolve_token

    publish = config.publish
    assert publish.repo_id is not None  # validated by the config
    if publish.endpoint != "local":
        return PublishTarget(publish.repo_id, resolve_endpoint(publish.endpoint), resolve_token())
    from llm_finetune.hub_server import HubServer, HubUser

    token = "hf_local_" + secrets.token_urlsafe(24)  # lives in memory only
    storage = out / "local-hub"
    namespace = publish.repo_id.split("/", 1)[0]
    server = HubServer(storage, users={token: HubUser(namespace)}).start()
    return PublishTarget(publish.repo_id, server.url, token, storage, server)


def preflight(config: Config, until: str, stack: contextlib.ExitStack) -> Preflight:
    from llm_finetune.backends import choose_backend
    from llm_finetune.data import load_raw
    from llm_finetune.resume import inspect_outputs

    out = config.output_path
    reuse = inspect_outputs(config, until)
    log(f"    outputs: {reuse.describe()} ({out})")
    choice = choose_backend(config.backend)
    log(f"    {choice.reason}")
    if choice.name == "unsloth":  # first: Unsloth patches transformers/peft/trl on import
        from llm_finetune.backends.unsloth import (
            UnslothBackend,
            check_kernel_toolchain,
            import_unsloth,
        )

        import_unsloth(strict=True)
        UnslothBackend.check_config(config)
    import torch

    cuda = torch.cuda.is_available()
    if choice.name == "unsloth" and cuda:
        check_kernel_toolchain()
    launch = check_launch(cuda)
    if config.model.load_in_4bit and not cuda:
        raise UserError("model.load_in_4bit needs a CUDA GPU; set it to false on this machine")
    if "8bit" in config.training.optim and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"training.optim {config.training.optim!r} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (GPU boxes: pip install -e '.[gpu]'), or use adamw_torch"
        )
    raw = load_raw(config.data)
    log(f"    data: {len(raw)} rows from {len(config.data.datasets)} source(s)")
    base = resolve_base(config)
    log(f"    base model: {base}")
    report = Preflight(base, choice.name, choice.reason, raw, reuse)
    if launch:
        log(f"    {launch}")
    if not is_main_process():
        return report
    if until == "publish" and reuse.merged is None:
        if removed := remove_leftovers(out):
            log(f"    {removed}")
        weights = base_weights(base, config.model.revision)
        copies = 2 if choice.name == "unsloth" and config.publish.enabled else 1
        log(f"    {check_disk(weights, out, config.merge.dtype, copies)}")
        if config.verify.enabled:
            log(f"    {check_verify_memory(weights, config, choice.name)}")
    if until == "publish" and config.publish.enabled:
        from llm_finetune.publish import preflight as publish_preflight

        target = start_publish_target(config, out)
        if target.server is not None:
            stack.callback(target.server.stop)
            log(f"    local Hub server at {target.endpoint} (storage {target.local_storage})")
        checked = publish_preflight(
            target.repo_id, target.endpoint, target.token, config.publish.private
        )
        if config.publish.adapter_repo_id:
            publish_preflight(
                config.publish.adapter_repo_id,
                target.endpoint,
                target.token,
                config.publish.private,
            )
        state = "exists" if checked.repo_existed else "created"
        log(
            f"    publish: {checked.user} can write {target.repo_id} on {target.endpoint} ({state})"
        )
        report.publish = target
    return report


def _card_rows(config: Config, base: str, backend: str, summary: dict[str, Any]):
    t, lora = config.training, config.lora
    training = [
        ("base model", base if not base.startswith("/") else config.model.name),
        ("method", config.method.upper()),
        ("backend", backend),
        ("datasets", ", ".join(d.path for d in config.data.datasets)),
        ("data format", config.data.format),
        ("LoRA r / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
        ("LoRA target modules", lora.target_modules),
        ("rsLoRA", lora.use_rslora),
        ("max_seq_length", config.model.max_seq_length),
        ("learning rate", t.learning_rate),
        ("epochs / max steps", f"{t.num_train_epochs} / {t.max_steps}"),
        (
            "batch size x grad accum",
            f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}",
        ),
        ("optimizer / scheduler", f"{t.optim} / {t.lr_scheduler_type}"),
        ("warmup steps / weight decay", f"{t.warmup_steps} / {t.weight_decay}"),
        ("packing", t.packing),
        ("seed", t.seed),
        ("merged dtype", config.merge.dtype),
    ]
    if config.method == "dpo":
        training.append(("DPO beta", t.beta))
    train, verify = summary.get("train", {}), summary.get("verify", {})
    metrics = [
        ("train steps", train.get("steps")),
        ("train loss (first logged)", train.get("train_loss_first")),
        ("train loss (last logged)", train.get("train_loss_last")),
        ("eval loss", train.get("eval_loss")),
        ("merge check: max abs logit diff vs base+adapter", verify.get("max_abs_logit_diff")),
        ("merge check: tolerance", verify.get("tolerance")),
        ("merge check: greedy generations agreeing", verify.get("generations_agree")),
    ]
    return training, [(k, v) for k, v in metrics if v is not None]


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def print_table(summary: dict[str, Any]) -> None:
    stages = summary["stages"]
    width = max(len(s) for s in stages) if stages else 5
    log("\n" + "stage".ljust(width) + "  seconds")
    for name, seconds in stages.items():
        log(f"{name.ljust(width)}  {seconds:8.1f}")
    log(f"{'total'.ljust(width)}  {sum(stages.values()):8.1f}")
    for key in ("train_loss_first", "train_loss_last", "verify_max_abs_logit_diff"):
        if summary.get(key) is not None:
            log(f"{key}: {summary[key]:.6g}")
    if summary.get("published"):
        p = summary["published"]
        log(f"published: {p['repo_id']} at {p['endpoint']} (commit {p['commit'][:12]})")


def run(config: Config, until: str = "publish") -> dict[str, Any]:
    """Run the pipeline up to `until` ("train" or "publish"); return the run summary."""
    out = config.output_path
    clock = StageClock()
    exit_code = 0  # what the CLI will exit with; the other processes exit with it too
    summary: dict[str, Any] = {
        "run_name": config.run_name,
        "status": "running",
        "output_dir": str(out),
        "stages": clock.seconds,
        "config": config_to_dict(config),
    }
    try:
        with contextlib.ExitStack() as stack:
            with clock.stage("preflight", "checking config, outputs, data, base model, Hub access"):
                checks = preflight(config, until, stack)
            summary["backend"] = {"name": checks.backend, "reason": checks.backend_reason}
            summary["reused"] = checks.reuse.describe()
            backend, model, tokenizer = _train(config, checks, summary, clock)
            if until == "train":
                summary["status"] = "trained"
                return summary
            if not is_main_process():  # its share is done: wait for the main one's outcome
                _wait_for_main_process()
                summary["status"] = "succeeded"
                return summary
            facts = _merge(config, checks, summary, clock, backend, model, tokenizer)
            if backend.name != "unsloth" or checks.publish is None:
                model = None  # freed before verification; the unsloth backend publishes from it
                gc.collect()
            prompts = [
                inference_prompt(config.data.format, p, tokenizer) for p in config.verify.prompts
            ]
            if config.verify.enabled:
                _verify(config, checks, summary, clock, prompts, facts)
            if checks.publish is not None:
                _publish(config, checks, summary, clock, prompts[0], facts, model, tokenizer)
            summary["status"] = "succeeded"
            return summary
    except BaseException as exc:
        exit_code = exit_code_for(exc)
        summary["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary["failed_stage"] = clock.current
        summary["error"] = (
            str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        )
        if isinstance(exc, KeyboardInterrupt) and (out / "adapter").is_dir():
            log(f"interrupted during {clock.current}; the adapter is kept in {out / 'adapter'}")
        raise
    finally:
        if is_main_process():
            write_summary(out, summary)  # also for a failed run: it says where and why
            if until == "publish":
                announce_outcome(exit_code)
        if summary["status"] in ("succeeded", "trained"):
            print_table(summary)
            log(f"summary: {out / SUMMARY_FILE}")


def _wait_for_main_process() -> None:
    """A process other than the main one, after training: free the model's memory, then wait
    for the main process to merge, verify and publish, and share its outcome."""
    from llm_finetune.verify import free_memory

    free_memory()
    exit_code = wait_for_main()
    if exit_code:
        raise OtherProcessFailed(exit_code)


def _train(
    config: Config, checks: Preflight, summary: dict[str, Any], clock: StageClock
) -> tuple[Any, Any, Any]:
    """Load the model with LoRA, format the data, train (or reuse a finished adapter of this
    config); the adapter and its manifest are on disk afterwards."""
    from llm_finetune.backends import get_backend
    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.resume import prepare_checkpoints
    from llm_finetune.train import train, training_arguments

    out = config.output_path
    backend = get_backend(checks.backend)
    if checks.reuse.adapter is not None:
        result = checks.reuse.adapter["train"]
        model, tokenizer = None, load_tokenizer(str(out / "adapter"), config.model)
    else:
        with clock.stage("load_model", f"loading {config.model.name} with LoRA ({backend.name})"):
            args = training_arguments(config, out / "checkpoints")  # starts the process group
            check_same_resume_point(checks.reuse.checkpoint)
            model, tokenizer = backend.load_for_training(config, checks.base)
        with clock.stage("data", f"formatting {config.data.format} data"):
            splits = format_dataset(checks.raw_data, config.data, tokenizer)
            log("    first example: " + json.dumps(splits["train"][0])[:300])
        with clock.stage("train", f"{config.method.upper()} with trl"):
            if is_main_process():
                prepare_checkpoints(out / "checkpoints", config)
            trained = train(
                config,
                args,
                model,
                tokenizer,
                splits,
                out / "adapter",
                resume_from=checks.reuse.checkpoint,
            )
        if trained is None:  # not the main process
            return backend, None, None
        result = trained.as_dict()
        write_manifest(out / "adapter", "adapter", train_fingerprint(config), train=result)
        if backend.name == "unsloth":
            _sample(config, summary, clock, backend, model, tokenizer)
    summary["train"] = result
    summary["train_loss_first"] = result["train_loss_first"]
    summary["train_loss_last"] = result["train_loss_last"]
    summary["adapter_dir"] = result["adapter_dir"]
    log(
        f"    adapter: {result['adapter_dir']} "
        f"(loss {result['train_loss_first']:.4g} -> {result['train_loss_last']:.4g})"
    )
    return backend, model, tokenizer


def _sample(
    config: Config,
    summary: dict[str, Any],
    clock: StageClock,
    backend: Any,
    model: Any,
    tokenizer: Any,
) -> None:
    """The trained model answers the first verify prompt (the handbook's look after training).
    A look, not a gate: the adapter is saved, and verification judges the merged model."""
    prompt = config.verify.prompts[0]
    with clock.stage("sample", "FastLanguageModel.for_inference, one generation"):
        try:
            text = backend.sample(
                model,
                tokenizer,
                inference_prompt(config.data.format, prompt, tokenizer),
                config.verify.max_new_tokens,
            )
        except Exception as exc:
            summary["sample_after_training"] = {"prompt": prompt, "error": first_line(exc)}
            log(f"    warning: the sample generation failed: {first_line(exc)}")
            return
    summary["sample_after_training"] = {"prompt": prompt, "generation": text}
    log(f"    {prompt!r} -> {text!r}")


def _merge(
    config: Config,
    checks: Preflight,
    summary: dict[str, Any],
    clock: StageClock,
    backend: Any,
    model: Any,
    tokenizer: Any,
) -> dict[str, Any]:
    """Merge (or reuse a finished merge of this config); returns the merged folder's facts."""
    out = config.output_path
    if checks.reuse.merged is not None:
        facts = {k: v for k, v in checks.reuse.merged.items() if k in ("merge", "verify")}
    else:
        with clock.stage("merge", f"merging into the 16-bit base ({config.merge.dtype})"):
            merged = backend.save_merged(
                model, tokenizer, checks.base, out / "adapter", out / "merged", config
            )
        facts = {"merge": merged}
        seal_merged(config, facts)
    summary["merge"] = facts["merge"]
    summary["merged_dir"] = str(out / "merged")
    return facts


def seal_merged(config: Config, facts: dict[str, Any]) -> None:
    """(Re)write the merged folder's manifest after each change to it (merge, card)."""
    folder = config.output_path / "merged"
    write_manifest(folder, "merged", merge_fingerprint(config), **facts)


def _verify(
    config: Config,
    checks: Preflight,
    summary: dict[str, Any],
    clock: StageClock,
    prompts: list[str],
    facts: dict[str, Any],
) -> None:
    from llm_finetune.verify import verify, verify_in_fresh_process

    out = config.output_path
    if "verify" not in facts:
        # Unsloth, imported into this process, patches transformers and peft (on GPUs): the
        # check is made with the stock libraries a user loads the model with.
        fresh = checks.backend == "unsloth"
        check = verify_in_fresh_process if fresh else verify
        with clock.stage("verify", "merged model vs base+adapter on fixed prompts"):
            if fresh:
                log("    in a fresh process: stock transformers and peft, not Unsloth's patches")
            report = check(
                checks.base,
                out / "adapter",
                out / "merged",
                prompts,
                max_new_tokens=config.verify.max_new_tokens,
                revision=config.model.revision,
                trust_remote_code=config.model.trust_remote_code,
            )
        facts["verify"] = report.as_dict()
        seal_merged(config, facts)
    result = facts["verify"]
    summary["verify"] = result
    summary["verify_max_abs_logit_diff"] = result["max_abs_logit_diff"]
    log(
        f"    max |Δlogit| {result['max_abs_logit_diff']:.3g} "
        f"(tolerance {result['tolerance']:.3g}), greedy generations agree "
        f"{result['generations_agree']}/{result['prompts']}, "
        f"adapter effect {result['adapter_effect_max_abs_logit_diff']:.3g}"
    )
    log(f"    sample: {config.verify.prompts[0]!r} -> {result['sample_generation']!r}")
    if result["generations_agree"] < result["prompts"]:
        log("    warning: some greedy generations differ (near-tied logits after rounding)")
    if result["adapter_effect_max_abs_logit_diff"] <= result["tolerance"]:
        log("    warning: the adapter barely changes the model; was training effective?")


def _push_with_unsloth(
    config: Config,
    target: PublishTarget,
    summary: dict[str, Any],
    clock: StageClock,
    model: Any,
    tokenizer: Any,
    message: str,
) -> None:
    """The handbook's call: model.push_to_hub_merged(repo_id, tokenizer, "merged_16bit")."""
    from llm_finetune.backends.unsloth import push_merged

    base_folder = summary["merge"].get("base_folder")  # what the GPU merge read, if it did

    with clock.stage("unsloth_push", f"push_to_hub_merged({target.repo_id!r}, merged_16bit)"):
        pushed = push_merged(
            model,
            tokenizer,
            target.repo_id,
            target.token,
            private=config.publish.private,
            commit_message=f"{message}: merged_16bit ({config.merge.dtype}) by Unsloth",
            revision=config.publish.revision,
            endpoint=target.endpoint,
            merge_dtype=config.merge.dtype,
            staging=config.output_path / UNSLOTH_PUSH_STAGING,
            base_folder=Path(base_folder) if base_folder else None,
        )
    summary["unsloth_push"] = pushed
    log(f"    Unsloth pushed {len(pushed['files'])} files ({pushed['code_path']})")


@contextlib.contextmanager
def _rerun_hint(target: PublishTarget) -> Iterator[None]:
    """A publish error names a command to resume it; for the run's own local server, which
    stops with the run, re-running the run is the way (finished stages are reused)."""
    try:
        yield
    except UserError as exc:
        if target.server is None:
            raise
        reason = str(exc).split("; Re-run", 1)[0].split(". Re-run", 1)[0]
        raise UserError(
            f"{reason}; run the same command again: finished stages are reused and only "
            "missing files are sent"
        ) from None


def _publish(
    config: Config,
    checks: Preflight,
    summary: dict[str, Any],
    clock: StageClock,
    prompt: str,
    facts: dict[str, Any],
    model: Any = None,
    tokenizer: Any = None,
) -> None:
    from llm_finetune.loadback import load_back
    from llm_finetune.publish import publish_adapter, publish_folder, write_model_card

    target = checks.publish
    assert target is not None
    merged_dir = config.output_path / "merged"
    with clock.stage("model_card", "writing README.md"):
        training_rows, metric_rows = _card_rows(config, checks.base, checks.backend, summary)
        write_model_card(
            merged_dir,
            repo_id=target.repo_id,
            base_model=config.model.name,
            datasets=[d.path for d in config.data.datasets],
            method=config.method,
            dtype=config.merge.dtype,
            license=config.publish.license,
            tags=config.publish.tags,
            training_rows=training_rows,
            metric_rows=metric_rows,
            usage_prompt=prompt,
        )
        seal_merged(config, facts)
    message = config.publish.commit_message or f"llm-finetune run {config.run_name}"
    if model is not None and checks.backend == "unsloth":
        _push_with_unsloth(config, target, summary, clock, model, tokenizer, message)
    with (
        clock.stage("publish", f"uploading to {target.repo_id} on {target.endpoint}"),
        _rerun_hint(target),
    ):
        # After an Unsloth push this sends only what differs from the verified folder (our
        # card instead of the generic one, ...) and checks every file's hash on the server.
        published = publish_folder(
            merged_dir,
            target.repo_id,
            target.endpoint,
            target.token,
            private=config.publish.private,
            revision=config.publish.revision,
            commit_message=f"{message}: merged_16bit ({config.merge.dtype})",
            replace_readme=config.publish.replace_readme or checks.backend == "unsloth",
        )
        summary["published"] = published.as_dict()
        state = f"commit {published.commit}" if published.committed else "already up to date"
        kept = f"{len(published.unchanged)} already there"
        log(f"    {state}, {len(published.files)} files ({kept}): {published.url}")
        if published.readme_kept:
            log("    kept the repo's own README.md (publish.replace_readme: true replaces it)")
        if config.publish.adapter_repo_id:
            adapter = publish_adapter(
                config.output_path / "adapter",
                config.publish.adapter_repo_id,
                target.endpoint,
                target.token,
                private=config.publish.private,
                revision=config.publish.revision,
                commit_message=f"{message}: LoRA adapter",
                replace_readme=config.publish.replace_readme,
            )
            summary["published_adapter"] = adapter.as_dict()
            log(f"    adapter: {adapter.url}")
    if config.publish.load_back:
        with clock.stage("load_back", f"from_pretrained({target.repo_id!r}) in a fresh process"):
            loaded = load_back(
                target.repo_id,
                config.publish.revision,
                target.endpoint,
                prompt,
                token=target.token if config.publish.private else None,
                max_new_tokens=config.verify.max_new_tokens,
            )
        summary["load_back"] = loaded
        log(f"    {target.repo_id} answers: {loaded['generation']!r}")
