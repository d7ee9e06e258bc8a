"""Which backend trains and saves a run, and why: `choose_backend` and `get_backend`.

The pipeline calls only the methods of `base.Backend` and never asks which backend it has;
everything else (data, trl training, verification, the card, the upload) is shared, so one
config drives either backend. `choose_backend` imports nothing heavy except torch, to answer
why it picked what it picked.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_finetune.errors import UserError

if TYPE_CHECKING:
    from llm_finetune.backends.base import Backend


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _unsloth_supports_ddp() -> bool:
    """Unsloth trains under DDP since it ships `models/_ddp_defaults.py` (2026.10 does); older
    releases refuse several GPUs. Looked up on disk: importing unsloth here would be too early."""
    spec = importlib.util.find_spec("unsloth")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(p) / "models" / "_ddp_defaults.py").is_file() for p in locations)


def choose_backend(requested: str) -> BackendChoice:
    """Resolve `backend: auto|hf|unsloth` to a backend that can run here, and say why."""
    from llm_finetune.distributed import requested_engine

    unsloth_installed = importlib.util.find_spec("unsloth") is not None
    if requested == "hf":
        return BackendChoice("hf", "backend: hf was requested")
    engine = requested_engine()
    if engine in ("fsdp", "deepspeed"):
        # Unsloth trains under both, but its merged save has no DeepSpeed gather, and under
        # FSDP every process would have to make the save call: the hf backend does both.
        if requested == "unsloth":
            raise UserError(
                f"backend: unsloth runs across processes with DDP only here, not {engine}: use "
                "ACCELERATE_CONFIG=configs/accelerate/ddp.yaml, or backend: hf (or auto) for "
                f"{engine}"
            )
        return BackendChoice("hf", f"backend: auto picked hf: {engine} runs on the hf backend")
    cuda = _cuda_available()
    ddp_without_support = engine == "ddp" and unsloth_installed and not _unsloth_supports_ddp()
    if requested == "unsloth":
        if not unsloth_installed:
            raise UserError(
                "backend: unsloth is not installed: on a GPU box pip install -e '.[gpu]'; on a "
                "CPU machine scripts/install_unsloth_cpu.sh .venv (or use backend: hf or auto)"
            )
        if ddp_without_support:
            raise UserError(
                "backend: the installed unsloth trains on one GPU only: pip install -e '.[gpu]' "
                "for a release with DDP, or use backend: hf (or auto) for several processes"
            )
        where = "on the CUDA GPU" if cuda else "on Unsloth's CPU fallback (no CUDA GPU found)"
        return BackendChoice("unsloth", f"backend: unsloth was requested; it runs {where}")
    if not cuda:
        return BackendChoice("hf", "backend: auto picked hf: no CUDA GPU found")
    if not unsloth_installed:
        return BackendChoice("hf", "backend: auto picked hf: unsloth is not installed")
    if ddp_without_support:
        return BackendChoice("hf", "backend: auto picked hf: the installed unsloth has no DDP")
    return BackendChoice("unsloth", "backend: auto picked unsloth: a CUDA GPU and unsloth")


def get_backend(name: str) -> Backend:
    if name == "hf":
        from llm_finetune.backends import hf

        return hf.HFBackend()
    if name == "unsloth":
        from llm_finetune.backends.unsloth import UnslothBackend

        return UnslothBackend()
    raise UserError(f"unknown backend {name!r}; use hf, unsloth or auto")
