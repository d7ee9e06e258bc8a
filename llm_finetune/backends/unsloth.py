"""The `unsloth` backend: Unsloth's FastLanguageModel loads the base with LoRA, and its
`save_pretrained_merged(dir, tokenizer, save_method="merged_16bit")` writes the merged model,
as the LLM Engineer's Handbook does. Training stays the shared trl code (`llm_finetune.train`).

Import order: Unsloth must be imported before transformers, peft and trl in the process (it
patches them when it is imported; imported later it warns "Unsloth should be imported before
[trl, transformers, peft] ..." and a `from trl import SFTTrainer` bound earlier keeps the
unpatched class). Nothing heavy is imported at module level here; `import_unsloth()` does the
import and says when it came too late. `UnslothBackend.prepare` calls it first thing in the
preflight, before anything imports transformers.

Two implementations hide behind the same two methods, chosen by Unsloth when it is imported:
- no GPU (Unsloth >= 2026.5 falls back to the CPU): `unsloth_zoo/cpu/loader.py`, i.e. stock
  transformers + peft; the merge deep-copies the in-memory PeftModel, runs peft's
  `merge_and_unload` in the model's dtype and casts float32 to a 16-bit dtype, then a plain
  `save_pretrained`; `push_to_hub_merged` is `model.push_to_hub` then `tokenizer.push_to_hub`
  (two commits, with transformers' generic model card).
- a GPU: `unsloth/save.py` (`unsloth_generic_save_pretrained_merged` ->
  `unsloth_zoo.saving_utils.merge_and_overwrite_lora`), which re-reads the ORIGINAL 16-bit base
  weights and merges shard by shard. It finds them by `model.config._name_or_path` through
  Unsloth's name mapper, which sends a Hub id such as meta-llama/Llama-3.1-8B to Unsloth's
  mirror (unsloth/Llama-3.1-8B): `_merging_from` points it at the configured base on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.backends.base import set_padding, target_modules_error
from llm_finetune.errors import UserError, first_line
from llm_finetune.hub import require_token

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config
    from llm_finetune.hub import PublishTarget

CPU_SAVER_MODULE = "unsloth_zoo.cpu.loader"
GPU_SAVER_MODULE = "unsloth.save"
PATCHED_BY_UNSLOTH = ("trl", "transformers", "peft")


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def imported_too_early() -> list[str]:
    """The libraries Unsloth patches that are already imported (empty once unsloth is in)."""
    if "unsloth" in sys.modules:
        return []
    return [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]


def import_unsloth(strict: bool = False) -> Any:
    """Import unsloth (first, ideally) and return the module.

    With `strict`, refuse when transformers/peft/trl were imported before it: Unsloth then runs
    partly unpatched. Without, the caller gets the module and Unsloth's own warning.
    """
    early = imported_too_early()
    if early and strict:
        raise UserError(
            f"backend unsloth: {', '.join(early)} were imported before unsloth; "
            "import unsloth first (llm_finetune.backends.unsloth.import_unsloth())"
        )
    if not unsloth_installed():
        raise UserError(
            "backend: unsloth is not installed: on a CUDA machine pip install -e '.[gpu]'; "
            "on a CPU machine scripts/install_unsloth_cpu.sh <venv> (or use backend: hf)"
        )
    # Its statistics (a README fetched from the Hub at load time) would stall an offline box.
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import unsloth
    except Exception as exc:  # e.g. UNSLOTH_DISABLE_CPU_FALLBACK=1 without a GPU
        reason = first_line(exc)
        raise UserError(f"backend unsloth: import unsloth failed: {reason}") from None
    return unsloth


def unsloth_dtype(requested: str) -> Any:
    """`model.dtype` for FastLanguageModel: "auto" -> None (Unsloth's choice: bf16 where the GPU
    or CPU supports it natively, else fp16 on older GPUs and fp32 on CPUs)."""
    if requested == "auto":
        return None
    import torch

    return getattr(torch, requested)


def saver_module(model: Any) -> str:
    """The module whose save_pretrained_merged this model carries (which Unsloth code path)."""
    method = getattr(model, "save_pretrained_merged", None)
    if method is None:
        return "none"
    func = getattr(method, "__func__", method)
    func = getattr(func, "__wrapped__", func)
    return getattr(func, "__module__", None) or type(method).__module__


def _safetensors_dtypes(folder: Path) -> list[str]:
    """Tensor dtypes named in the safetensors headers (read without loading any tensor)."""
    from llm_finetune.safetensors_stream import read_header, torch_dtype_name

    found = {
        info.dtype
        for path in folder.glob("*.safetensors")
        for info in read_header(path).tensors.values()
    }
    return sorted(torch_dtype_name(d) for d in found)


@contextlib.contextmanager
def _cpu_merge_dtype(model: Any, requested: str) -> Iterator[bool]:
    """On the CPU path, make `merged_16bit` round a float32 merge to `requested`.

    unsloth_zoo's CPU merge casts a float32 model to bfloat16 only where the CPU has native
    bf16 (AMX / AVX512-BF16), else to float16, whatever the base was stored in. For the config's
    merge.dtype to hold, its `cpu_bf16_supported` is answered for the duration of the save only
    (the merge itself still runs in float32: one rounding, as the hf backend's merge).
    Yields whether it overrode anything.
    """
    import torch

    if saver_module(model) != CPU_SAVER_MODULE or requested not in ("bfloat16", "float16"):
        yield False
        return
    if getattr(model, "dtype", None) != torch.float32:
        yield False  # a bf16 model merges and saves in bf16; nothing to choose
        return
    loader = sys.modules[CPU_SAVER_MODULE]
    original = getattr(loader, "cpu_bf16_supported", None)
    if original is None:
        yield False
        return
    loader.cpu_bf16_supported = lambda: requested == "bfloat16"
    try:
        yield True
    finally:
        loader.cpu_bf16_supported = original


@contextlib.contextmanager
def _merging_from(model: Any, base_folder: Path | None) -> Iterator[None]:
    """Make Unsloth's merge read the configured base from `base_folder` for one call.

    On a GPU the merge looks the base up by `model.config._name_or_path` (a Hub id after a
    Hub load) through `get_model_name(..., load_in_4bit=False)`, whose table maps e.g.
    meta-llama/Llama-3.1-8B to Unsloth's own copy, unsloth/Llama-3.1-8B: another repo, a second
    16 GB download not counted by the preflight, and a failure offline. A local folder is taken
    as is ("Detected local model directory"), so it merges into the weights that were trained.
    """
    config = getattr(model, "config", None)
    if base_folder is None or config is None:
        yield
        return
    saved = config._name_or_path
    config._name_or_path = str(base_folder)
    try:
        yield
    finally:
        config._name_or_path = saved


@contextlib.contextmanager
def _right_padding(tokenizer: Any) -> Iterator[None]:
    """Save the tokenizer as trained: `for_inference` flips the same object to left padding."""
    side = getattr(tokenizer, "padding_side", None)
    if side is not None:
        tokenizer.padding_side = "right"
    try:
        yield
    finally:
        if side is not None:
            tokenizer.padding_side = side


def check_kernel_toolchain() -> None:
    """On a GPU, Triton compiles a small C launcher for Unsloth's kernels at the first training
    step, with the host C compiler and the Python headers (Triton's runtime/build.py): slim
    images lack one or both, and the run would fail only after the model has loaded."""
    import sysconfig

    compiler = os.environ.get("CC") or next(
        (found for name in ("gcc", "clang", "cc") if (found := shutil.which(name))), None
    )
    if compiler is None:
        raise UserError(
            "Unsloth's Triton kernels need a C compiler and none was found: apt-get install "
            "build-essential (or set CC), or use backend: hf"
        )
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)
    headers = Path(include["include"]) / "Python.h"
    if not headers.is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise UserError(
            f"Unsloth's Triton kernels need the Python headers and {headers} is missing: "
            f"apt-get install python{version}-dev, or use backend: hf"
        )


def patch_dpo_trainer(unsloth: Any) -> bool:
    """`PatchDPOTrainer()`, as the handbook calls it before DPO, where this Unsloth exports it
    (the CPU fallback does not; 2026.10 patches trl on import and keeps it as a no-op)."""
    patch = getattr(unsloth, "PatchDPOTrainer", None)
    if patch is None:
        return False
    patch()
    return True


class UnslothBackend:
    name = "unsloth"
    # On GPUs Unsloth patches Llama's classes and peft's forward for every model its process
    # loads: the merge is checked with the stock libraries a user loads the model with.
    verifies_in_fresh_process = True
    samples_after_training = True

    def prepare(self, config: Config) -> None:
        """Unsloth first (it patches transformers/peft/trl on import), then what it cannot do,
        then, on a GPU, the toolchain its kernels are built with at the first step."""
        import_unsloth(strict=True)
        self.check_config(config)
        import torch

        if torch.cuda.is_available():
            check_kernel_toolchain()

    @staticmethod
    def check_config(config: Config) -> None:
        """What Unsloth's merged_16bit cannot do, refused before training (call in preflight)."""
        if config.merge.dtype == "float32":
            raise UserError(
                "backend unsloth saves merged_16bit: merge.dtype float32 is not possible; use "
                "bfloat16/float16, or backend: hf (or `llm-finetune merge --dtype float32` later)"
            )

    def load_for_training(self, config: Config, base: BaseModel) -> tuple[Any, Any]:
        unsloth = import_unsloth()
        self.check_config(config)
        fast = unsloth.FastLanguageModel
        kwargs: dict[str, Any] = {
            "model_name": base.path,
            "max_seq_length": config.model.max_seq_length,
            "dtype": unsloth_dtype(config.model.dtype),
            "load_in_4bit": config.model.load_in_4bit,
            "revision": base.revision,
            "trust_remote_code": config.model.trust_remote_code,
            # The configured repo, not Unsloth's pre-quantized "-bnb-4bit" twin (GPU only).
            "use_exact_model_name": True,
        }
        if config.model.attn_implementation:
            kwargs["attn_implementation"] = config.model.attn_implementation
        model, tokenizer = fast.from_pretrained(**kwargs)
        set_padding(tokenizer)
        lora = config.lora
        try:
            model = fast.get_peft_model(
                model,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                bias=lora.bias,
                use_gradient_checkpointing=(
                    "unsloth" if config.training.gradient_checkpointing else False
                ),
                random_state=config.training.seed,
                use_rslora=lora.use_rslora,
            )
        except ValueError as exc:
            raise target_modules_error(exc) from None
        if config.method == "dpo":
            patch_dpo_trainer(unsloth)
        return model, tokenizer

    def sample(self, model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
        """The handbook's look after training: `FastLanguageModel.for_inference(model)`, then
        one greedy generation from the model in memory (before any merge)."""
        import torch

        import_unsloth().FastLanguageModel.for_inference(model)
        inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def save_merged(
        self,
        model: Any,
        tokenizer: Any,
        base: BaseModel,
        adapter_dir: Path,
        output_dir: Path,
        config: Config,
    ) -> dict[str, Any]:
        """model.save_pretrained_merged(..., "merged_16bit") into a staging folder, renamed in."""
        from llm_finetune.fsutil import atomic_dir
        from llm_finetune.merge import align_eos_in_folder, resolve_base_folder
        from llm_finetune.tokenizer_files import BASE_TOKENIZER_PATTERNS, complete_tokenizer

        self.check_config(config)
        saver = saver_module(model)
        on_cpu = saver == CPU_SAVER_MODULE
        model_dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        kwargs: dict[str, Any] = {}
        base_folder = None
        if not on_cpu:
            # unsloth/save.py: the default safe_serialization=True turns into a pickle on hosts
            # with <= 2 physical CPUs; None pins safetensors (GPU path, untested here).
            kwargs["safe_serialization"] = None
            base_folder = resolve_base_folder(base.path, base.revision)
        output_dir = Path(output_dir)
        with atomic_dir(
            output_dir, overwrite=config.overwrite, what="merged model folder"
        ) as stage:
            with (
                _cpu_merge_dtype(model, config.merge.dtype) as overridden,
                _right_padding(tokenizer),
                _merging_from(model, base_folder),
            ):
                model.save_pretrained_merged(
                    str(stage), tokenizer, save_method="merged_16bit", **kwargs
                )
            if not (stage / "config.json").is_file():
                raise UserError(f"unsloth wrote no config.json into {stage}: nothing was merged")
            eos_fixes = align_eos_in_folder(stage, tokenizer.eos_token_id, tokenizer.pad_token_id)
            tokenizer_from_base = complete_tokenizer(
                base_folder
                or resolve_base_folder(base.path, base.revision, BASE_TOKENIZER_PATTERNS),
                stage,
            )
        files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*"))
        stored = _safetensors_dtypes(output_dir)
        quantized = bool(getattr(getattr(model, "config", None), "quantization_config", None))
        if on_cpu:
            merged_from = (
                f"the in-memory model (base {base.path} loaded in {model_dtype}), merged by peft "
                f"merge_and_unload on a deep copy"
            )
        else:
            merged_from = (
                f"the original 16-bit base weights of {base.path}, re-read shard by shard "
                f"from {base_folder}"
            )
        facts: dict[str, Any] = {
            "backend": "unsloth",
            "unsloth_version": getattr(sys.modules.get("unsloth"), "__version__", None),
            "code_path": saver,
            "device": "cpu" if on_cpu else "gpu",
            "save_method": "merged_16bit",
            "output_dir": str(output_dir),
            "files": files,
            "requested_dtype": config.merge.dtype,
            "stored_dtypes": stored,
            "training_dtype": model_dtype,
            "loaded_in_4bit": quantized,
            "merged_from": merged_from,
            # CPU: an fp32 model holds the bf16 base exactly (lossless upcast); bf16 is the base.
            "from_original_16bit_base": (not on_cpu)
            or (not quantized and model_dtype in ("float32", "bfloat16")),
            "cpu_dtype_override": overridden,
            "eos_fixes": eos_fixes,
            "tokenizer_from_base": tokenizer_from_base,
            "base_folder": str(base_folder) if base_folder else None,  # what the GPU merge read
        }
        if stored and stored != [config.merge.dtype]:
            facts["note"] = (
                f"merge.dtype is {config.merge.dtype} but unsloth stored {', '.join(stored)}"
            )
        return facts

    def pushes_merged(self, config: Config) -> bool:
        return config.publish.enabled  # the handbook's push_to_hub_merged

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
        base_folder = merge_facts.get("base_folder")  # what the GPU merge read, if it did
        return push_merged(
            model,
            tokenizer,
            target.repo_id,
            target.token,
            private=config.publish.private,
            commit_message=f"{commit_message}: merged_16bit ({config.merge.dtype}) by Unsloth",
            revision=config.publish.revision,
            endpoint=target.endpoint,
            merge_dtype=config.merge.dtype,
            staging=staging,
            base_folder=Path(base_folder) if base_folder else None,
        )

    def merged_copies(self, config: Config) -> int:
        return 2 if self.pushes_merged(config) else 1  # the push saves its own copy first

    def memory_beside_verification(self, config: Config, parameters: int) -> int:
        if not self.pushes_merged(config):
            return 0
        return int(parameters * (0.6 if config.model.load_in_4bit else 2))  # kept to push


@contextlib.contextmanager
def _temporary_files_in(folder: Path | None) -> Iterator[None]:
    """Point `tempfile` at `folder` (made, and removed afterwards) for one call.

    Both of Unsloth's pushes save the whole merged model into a temporary folder before they
    upload it (on a GPU `_push_merged_to_hub_revision`, on the CPU transformers' push_to_hub).
    /tmp is often a small container disk on rented boxes; `folder` sits beside the outputs,
    whose free space the preflight checked.
    """
    if folder is None:
        yield
        return
    import tempfile

    shutil.rmtree(folder, ignore_errors=True)  # what a killed push left
    folder.mkdir(parents=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


def push_merged(
    model: Any,
    tokenizer: Any,
    repo_id: str,
    token: str | None,
    private: bool = False,
    commit_message: str | None = None,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    merge_dtype: str = "bfloat16",
    readme: Path | None = None,
    staging: Path | None = None,
    base_folder: Path | None = None,
) -> dict[str, Any]:
    """`model.push_to_hub_merged(repo_id, tokenizer, save_method="merged_16bit", ...)`.

    `revision`: the branch to commit to (made if missing). Always passed: on a GPU it routes
    Unsloth 2026.10 through `_push_merged_to_hub_revision` (one commit of a finished folder,
    under our message). Without it, Unsloth creates the repo with a card validated at
    https://huggingface.co whatever the endpoint (fatal with no network), and uploads shard by
    shard to main as "(Trained with Unsloth)". `endpoint`: the Hub to push to; None means
    huggingface_hub's (HF_ENDPOINT as read at import). `readme`: a model card uploaded
    afterwards over Unsloth's. `staging`: where the push may write its temporary copy of the
    merged model (None: the system's temporary folder). `base_folder`: the base on disk that a
    GPU push merges into (`save_merged`'s `base_folder`; see `_merging_from`). Returns the
    branch's files and commits after the push (read back from the endpoint).
    """
    token = require_token(token)
    import_unsloth()
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from llm_finetune.hub import (
        RetryPolicy,
        client_timeout,
        explain_http_error,
        hub_api,
        hub_client_settings,
        libraries_endpoint,
    )

    target = (endpoint or constants.ENDPOINT).rstrip("/")
    message = commit_message or "Upload merged_16bit model"
    api = hub_api(target, token)
    with (
        hub_client_settings(target),
        libraries_endpoint(target),
        client_timeout(RetryPolicy().timeout),
        _temporary_files_in(staging),
    ):
        try:
            with (
                _cpu_merge_dtype(model, merge_dtype),
                _right_padding(tokenizer),
                _merging_from(model, base_folder),
            ):
                model.push_to_hub_merged(
                    repo_id,
                    tokenizer,
                    save_method="merged_16bit",
                    token=token,
                    private=private,
                    commit_message=message,
                    revision=revision,
                )
            if readme is not None:
                api.upload_file(
                    path_or_fileobj=str(readme),
                    path_in_repo="README.md",
                    repo_id=repo_id,
                    revision=revision,
                    commit_message="Model card",
                )
            commits = api.list_repo_commits(repo_id, revision=revision)
            files = sorted(api.list_repo_files(repo_id, revision=commits[0].commit_id))
        except HfHubHTTPError as exc:
            raise explain_http_error(exc, target, repo_id) from None
        except OSError as exc:
            raise UserError(f"upload to {target} failed: {exc}; re-run the publish") from None
        except Exception as exc:  # httpx transport errors are not OSErrors
            if not type(exc).__module__.startswith("httpx"):
                raise
            raise UserError(f"cannot reach the Hub at {target}: {exc}") from None
    return {
        "repo_id": repo_id,
        "endpoint": target,
        "code_path": saver_module(model),
        "commit": commits[0].commit_id,
        "commits": [{"id": c.commit_id, "title": c.title} for c in commits],
        "files": files,
    }
