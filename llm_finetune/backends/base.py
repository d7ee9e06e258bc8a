"""The seam between the pipeline and a backend: the `Backend` protocol, and the helpers both
backends (`hf`, `unsloth`) share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llm_finetune.errors import UserError

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config
    from llm_finetune.hub import PublishTarget


class Backend(Protocol):
    name: str
    # Verification runs in a fresh process: this backend patches its own process's libraries.
    verifies_in_fresh_process: bool
    # The trained model answers one prompt before the merge (the handbook's look at it).
    samples_after_training: bool

    def prepare(self, config: Config) -> None:
        """First thing in the preflight, before transformers/peft/trl are imported: import
        order, environment, and what this backend cannot do with `config` (UserError)."""

    def load_for_training(self, config: Config, base: BaseModel) -> tuple[Any, Any]:
        """The base model with LoRA adapters attached (a peft model) and its tokenizer."""

    def sample(self, model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
        """One greedy generation from the trained model in memory."""

    def save_merged(
        self,
        model: Any,
        tokenizer: Any,
        base: BaseModel,
        adapter_dir: Path,
        output_dir: Path,
        config: Config,
    ) -> dict[str, Any]:
        """Write the merged 16-bit model into `output_dir` (which must not exist yet).

        Returns facts for the run summary (how and from which weights it merged).
        """

    def pushes_merged(self, config: Config) -> bool:
        """Whether it publishes from the trained model itself (kept in memory until then)."""

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
        """Publish from the trained model (only where `pushes_merged`); `staging` is where its
        temporary copy of the merged model may go. Returns the branch's files and commits."""

    def merged_copies(self, config: Config) -> int:
        """How many copies of the merged model the save and push write to the output's disk."""

    def memory_beside_verification(self, config: Config, parameters: int) -> int:
        """Bytes this backend keeps in memory while the merge is verified."""


def set_padding(tokenizer: Any) -> Any:
    """PAD = EOS where the tokenizer has none (as the handbook does), right padding to train."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def target_modules_error(exc: ValueError) -> UserError:
    """peft's refusal of `lora.target_modules` (e.g. none found in the model), in one line."""
    return UserError(f"lora.target_modules: {str(exc).splitlines()[0]}")
