"""Several processes under `accelerate launch` / `torchrun`: who is who, which engine trains,
and how the processes end together.

Training runs in every process; the adapter is gathered and saved collectively; everything
after it (merge, verify, publish) and all logging happens in the main process, while the
others wait for its outcome and exit with its exit code. They wait on the launcher's
rendezvous store rather than at a collective barrier: an NCCL barrier would time out during
a long merge or upload, and the store is the one connection every launch already proved.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from llm_finetune.errors import EXIT_INTERRUPTED, UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def on_main_node() -> bool:
    """Whether this process shares its launcher (torchrun's agent) with the main process."""
    return int(os.environ.get("GROUP_RANK", "0")) == 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine() -> str:
    """What `accelerate launch --config_file ...` asked for: fsdp, deepspeed, ddp or single
    (FSDP and DeepSpeed also run in one process, e.g. to offload to the CPU)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def shards_weights() -> bool:
    """FSDP and ZeRO-3 place and shard the weights themselves: no device_map at load time."""
    engine = requested_engine()
    return engine == "fsdp" or (engine == "deepspeed" and _deepspeed_zero3_settings()[0])


def _deepspeed_zero3_settings() -> tuple[bool, bool]:
    """(ZeRO stage 3?, 16-bit weights gathered on save?) from accelerate's env or the
    DeepSpeed JSON file it points to."""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        gathers = zero.get("stage3_gather_16bit_weights_on_model_save", False)
        return str(zero.get("stage")) == "3", gathers is True or str(gathers).lower() == "true"
    stage3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return stage3, _flag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")


def check_launch(cuda: bool) -> str | None:
    """Refuse, before any model is loaded, a launch that would run but not as asked; return
    a line saying how the processes train (None for a single process)."""
    engine = requested_engine()
    if engine == "single":
        return None
    if engine in ("fsdp", "deepspeed") and not cuda:
        raise UserError(
            f"{engine.upper()} needs CUDA GPUs, and accelerate would quietly run this config as "
            "plain DDP on CPUs: use ACCELERATE_CONFIG=configs/accelerate/ddp.yaml here"
        )
    if engine == "deepspeed":
        stage3, gathers = _deepspeed_zero3_settings()
        if stage3 and not gathers:
            raise UserError(
                "DeepSpeed ZeRO-3 without zero3_save_16bit_model would save an empty adapter: "
                "set zero3_save_16bit_model: true in the accelerate config (or "
                "stage3_gather_16bit_weights_on_model_save in the DeepSpeed JSON)"
            )
    names = {"fsdp": "FSDP", "deepspeed": "DeepSpeed", "ddp": "DDP"}
    if world_size() == 1:
        return f"1 process ({names[engine]})"
    return (
        f"{world_size()} processes ({names[engine]}): training in all, "
        "merge/verify/publish in the main one"
    )


def trainer_engine(trainer: Any) -> str:
    """The engine the trainer actually set up, in the words of `requested_engine`."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def check_trainer_engine(trainer: Any) -> None:
    """accelerate falls back to DDP when it cannot set up what the config asked for: stop
    before training rather than run out of memory (or run slower) an hour later."""
    requested, actual = requested_engine(), trainer_engine(trainer)
    if requested != actual:
        raise UserError(
            f"the launch asked for {requested} but the trainer set up {actual}: check the "
            "accelerate config and that every process sees a CUDA GPU"
        )


def check_same_resume_point(checkpoint: str | None) -> None:
    """Every process must resume from the same trainer checkpoint. Nodes that each keep their
    own output_dir see different ones (or none), and would train out of step: refuse."""
    import torch.distributed as dist

    if world_size() <= 1 or not dist.is_initialized():
        return
    seen: list[str | None] = [None] * world_size()
    dist.all_gather_object(seen, Path(checkpoint).name if checkpoint else None)
    if len(set(seen)) > 1:
        by_process = ", ".join(
            f"process {rank}: {name or 'none'}" for rank, name in enumerate(seen)
        )
        raise UserError(
            f"the processes would resume from different trainer checkpoints ({by_process}): "
            "put output_dir on storage every node shares, or start over with overwrite: true"
        )


class OtherProcessFailed(Exception):
    """Raised in a non-main process when the main one failed after training."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"the main process exited with {exit_code}")
        self.exit_code = exit_code


def _outcome_key() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"llm-finetune/{run}/{restart}/outcome"


def _rendezvous_store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(minutes=5),
    )


def announce_outcome(exit_code: int, acknowledgement_s: float = 60.0) -> None:
    """Main process: tell the waiting processes how the run ended, and give them a moment to
    read it (the store may live in this very process)."""
    import torch.distributed as dist
    from torch.distributed import DistError

    if world_size() <= 1 or not dist.is_initialized():  # nobody trained, nobody waits
        return
    key = _outcome_key()
    # A store or a process that is gone already: the launcher has stopped the others (and
    # this runs while an exception of the run's own may be on its way out).
    with contextlib.suppress(DistError):
        store = _rendezvous_store()
        store.set(key, str(exit_code))
        if exit_code == EXIT_INTERRUPTED:  # Ctrl-C / SIGTERM reached every process: none waits
            return
        others = [f"{key}/read/{rank}" for rank in range(1, world_size())]
        store.wait(others, timedelta(seconds=acknowledgement_s))


def wait_for_main(poll_s: float = 1.0) -> int:
    """Other processes: block until the main process announces its exit code, and return it.

    Polls (`check`, then a sleep: a timed-out `wait` logs a c10d warning every time, which
    would fill this process's output for as long as the merge, checks and exports take), so
    that SIGTERM from the launcher (when the main process dies) is handled promptly; a store
    that went away means the main process went with it."""
    import torch.distributed as dist
    from torch.distributed import DistNetworkError

    if world_size() <= 1 or not dist.is_initialized():  # reused an adapter: nothing to wait for
        return 0
    store = _rendezvous_store()
    key = _outcome_key()
    try:
        while not store.check([key]):
            time.sleep(poll_s)  # a pending signal handler runs here
    except DistNetworkError:
        return 1
    code = int(store.get(key))
    store.set(f"{key}/read/{int(os.environ.get('RANK', '0'))}", "1")
    return code


def exit_after_main(exit_code: int, grace_s: float = 60.0) -> int:
    """A failing process other than the main one: let the main process exit first, and return
    `exit_code` for this one.

    The launcher stops every process of a node (SIGTERM) as soon as one of them fails. Were a
    quiet process to go first, the main one would be killed before it prints why or writes the
    run summary, and the failure would be blamed on the wrong process. So it waits for that
    SIGTERM, which comes once the main process has failed with the same error or outcome; after
    `grace_s` (the processes disagree: the main one did not fail) it goes anyway. On other
    nodes nothing races with the main process, and a lone process has nobody to wait for."""
    if exit_code == 0 or is_main_process() or world_size() <= 1 or not on_main_node():
        return exit_code
    with contextlib.suppress(KeyboardInterrupt):  # the launcher's SIGTERM, as cli maps it
        time.sleep(grace_s)
    return exit_code
