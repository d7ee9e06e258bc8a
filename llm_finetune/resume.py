"""What a re-run of the same config can reuse: a finished adapter, a finished merge, or the
last trainer checkpoint; and a refusal when the outputs came from a different config.

Each finished folder carries a manifest with the fingerprint of the config sections that
made it, so a re-run never mixes two configs and never silently retrains.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.config import Config, config_to_dict
from llm_finetune.errors import UserError
from llm_finetune.manifest import check_manifest, fingerprint, read_manifest

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel

TRAIN_SECTIONS = ("method", "backend", "model", "lora", "data", "training")
# Training keys that change what is watched, not the weights: a finished adapter stays reusable.
WATCHING_KEYS = ("report_to", "eval_steps")
CHECKPOINT_INPUTS = "llm-finetune-inputs.json"


def train_fingerprint(config: Config, base: BaseModel) -> str:
    """What the adapter depends on: the training sections and, for a Hub base, its commit."""
    data = config_to_dict(config)
    inputs = {key: data[key] for key in TRAIN_SECTIONS}
    inputs["training"] = {k: v for k, v in data["training"].items() if k not in WATCHING_KEYS}
    if base.revision:
        inputs["base_revision"] = base.revision
    return fingerprint(inputs)


def merge_fingerprint(config: Config, base: BaseModel) -> str:
    return fingerprint(
        {"train": train_fingerprint(config, base), "merge": config_to_dict(config)["merge"]}
    )


@dataclass
class Reuse:
    adapter: dict[str, Any] | None = None  # manifest of a finished adapter of this config
    merged: dict[str, Any] | None = None  # manifest of a finished merge of this config
    checkpoint: str | None = None  # trainer checkpoint to resume training from

    def describe(self) -> str:
        if self.merged:
            return "reusing the finished adapter and merged model of this config"
        if self.adapter:
            return "reusing the finished adapter of this config"
        if self.checkpoint:
            return f"resuming training from {Path(self.checkpoint).name}"
        return "starting fresh"


def latest_checkpoint(checkpoints: Path, train_fp: str) -> str | None:
    """The newest `checkpoint-N` the trainer finished, if it was made by this config."""
    steps = [
        (int(m.group(1)), p)
        for p in checkpoints.glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()
    ]
    if not steps:
        return None
    inputs = checkpoints / CHECKPOINT_INPUTS
    made_by = json.loads(inputs.read_text()).get("fingerprint") if inputs.is_file() else None
    if made_by != train_fp:
        raise UserError(
            f"{str(checkpoints)!r} holds checkpoints of a different config; "
            "use a new output_dir, or overwrite: true to start over"
        )
    return str(max(steps)[1])


def prepare_checkpoints(checkpoints: Path, config: Config, base: BaseModel) -> None:
    """Mark the checkpoint folder with the config that fills it (a fresh run clears it first)."""
    if config.overwrite and checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    inputs = {"fingerprint": train_fingerprint(config, base), "run_name": config.run_name}
    (checkpoints / CHECKPOINT_INPUTS).write_text(json.dumps(inputs) + "\n")


def check_same_base_commit(adapter_dir: Path, base: BaseModel) -> None:
    """A finished adapter of a Hub base that has moved on since: say which commit to pin to
    finish the run with, rather than only "a different config"."""
    trained_on = ((read_manifest(adapter_dir) or {}).get("base") or {}).get("revision")
    if trained_on and base.revision and trained_on != base.revision:
        raise UserError(
            f"{str(adapter_dir)!r} was trained on {base.name} at commit {trained_on} and the "
            f"base is now at {base.revision}: set model.revision: {trained_on} to finish this "
            "run, or overwrite: true to train again"
        )


def inspect_outputs(config: Config, until: str, base: BaseModel) -> Reuse:
    """Decide what this run reuses; refuse outputs of another config or changed files."""
    if config.overwrite:
        return Reuse()
    out = config.output_path
    reuse = Reuse()
    if (out / "adapter").exists():
        check_same_base_commit(out / "adapter", base)
        reuse.adapter = check_manifest(out / "adapter", train_fingerprint(config, base))
    if until == "publish" and (out / "merged").exists():
        if reuse.adapter is None:
            raise UserError(
                f"{str(out / 'merged')!r} exists without its adapter; restore "
                f"{str(out / 'adapter')!r}, or overwrite: true to start over"
            )
        reuse.merged = check_manifest(out / "merged", merge_fingerprint(config, base))
    if reuse.adapter is None and (out / "checkpoints").is_dir():
        reuse.checkpoint = latest_checkpoint(out / "checkpoints", train_fingerprint(config, base))
    return reuse
