"""Shared fixtures: a tiny local Llama, a briefly trained adapter, a local Hub server.

The environment is set before any Hugging Face library is imported: no telemetry, a private
HF_HOME, and a private cache for the builtin model, so tests never touch the real Hub or
the user's caches. Child processes inherit the same settings.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="llm-finetune-tests-"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf-home")
os.environ["LLM_FINETUNE_CACHE"] = str(_SESSION_DIR / "cache")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)

REPO_ROOT = Path(__file__).resolve().parent.parent
needs_unsloth = pytest.mark.skipif(
    importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed"
)
GOOD_TOKEN = "hf_test_good_token_0123456789abcdef"
READ_TOKEN = "hf_test_read_only_0123456789abcdef"


@pytest.fixture(scope="session")
def tiny_base() -> str:
    from llm_finetune.demo import resolve_builtin_model

    return str(resolve_builtin_model("builtin:tiny-llama"))


def dpo_pairs(folder: Path) -> Path:
    """A small DPO file (prompt, chosen, rejected) of number words."""
    import json

    rows = [
        {"prompt": f"Write the number {n} in words.", "chosen": w, "rejected": "no"}
        for n, w in [(1, "one"), (2, "two"), (3, "three"), (4, "four")] * 4
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_config(tmp: Path, **sections):
    """A validated Config for the tiny model; keyword arguments replace whole sections."""
    from llm_finetune.config import Config

    data = {
        "run_name": "test",
        "output_dir": str(tmp / "out"),
        "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
        "lora": {"r": 8, "alpha": 16},
        "data": {"datasets": [{"path": "builtin:number-words"}]},
        "training": {
            "learning_rate": 5e-3,
            "max_steps": 40,
            "per_device_train_batch_size": 16,
            "logging_steps": 5,
        },
    }
    data.update(sections)
    return Config.model_validate(data)


@pytest.fixture(scope="session")
def trained_adapter(tiny_base, tmp_path_factory):
    """(config, base path, adapter dir, TrainResult) of a 40-step LoRA SFT on the tiny model."""
    from llm_finetune.backends.hf import HFBackend
    from llm_finetune.base_model import BaseModel
    from llm_finetune.data import format_dataset, load_raw
    from llm_finetune.train import train, training_arguments

    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp)
    args = training_arguments(config, tmp / "checkpoints")
    model, tokenizer = HFBackend().load_for_training(config, BaseModel(tiny_base, tiny_base))
    splits = format_dataset(load_raw(config.data), config.data, tokenizer)
    result = train(config, args, model, tokenizer, splits, tmp / "adapter")
    return config, tiny_base, tmp / "adapter", result


@pytest.fixture
def hub(tmp_path):
    """A local Hub-compatible server with a writer (alice, org team) and a read-only user."""
    from llm_finetune.hub_server import HubServer, HubUser

    users = {
        GOOD_TOKEN: HubUser("alice", orgs=("team",)),
        READ_TOKEN: HubUser("bob", can_write=False),
    }
    with HubServer(tmp_path / "hub-storage", users=users) as server:
        yield server
