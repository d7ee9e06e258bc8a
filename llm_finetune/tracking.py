"""Experiment trackers (`training.report_to`): checked before training, writing their local
files into the run's output folder, and given the run's name and its whole config.

trl/transformers do the logging (their callbacks, chosen by `report_to`); this module adds
what they leave out. Credentials come from each tracker's own environment variables or login
(WANDB_API_KEY, COMET_API_KEY, ...), never from the config, and are never printed or written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from llm_finetune.errors import UserError

if TYPE_CHECKING:
    from llm_finetune.config import Config

TENSORBOARD_DIR = "tensorboard"  # in output_dir: `tensorboard --logdir outputs/<run>/tensorboard`
# tracker -> (module it imports, what `pip install` takes)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
# Where a tracker keeps its local files unless the user says otherwise: the output folder,
# not the working directory.
LOCAL_DIRS = {"wandb": ("WANDB_DIR", "."), "comet_ml": ("COMET_OFFLINE_DIRECTORY", "comet")}
# transformers warns, at trl's import and at every save, that comet_ml has no API key whenever
# comet_ml is installed (the dev extra installs it), even when report_to does not name it.
COMET_KEY_NOTICE = "comet_ml is installed but the Comet API Key is not configured"


def trackers(config: Config) -> list[str]:
    """`report_to` as TrainingArguments takes it: [] for "none"."""
    return [name for name in config.training.report_to if name != "none"]


class _UnrequestedComet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(COMET_KEY_NOTICE)


def quiet_unrequested_trackers(config: Config) -> None:
    """Drop transformers' notice about Comet's API key when the run does not log to Comet: the
    user cannot act on it. When it does, `check_trackers` has already asked for the key."""
    if "comet_ml" in trackers(config):
        return
    integrations = logging.getLogger("transformers.integrations.integration_utils")
    if not any(isinstance(f, _UnrequestedComet) for f in integrations.filters):
        integrations.addFilter(_UnrequestedComet())


def check_trackers(config: Config) -> str:
    """Before training: each tracker is installed and, when it logs online, has credentials.
    Points the trackers' local files at the output folder. Returns the preflight's line."""
    names = trackers(config)
    if not names:
        return "trackers: none (training.report_to: [none])"
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        install = " ".join(PACKAGES[n][1] for n in missing)
        verb, pronoun = ("is", "it") if len(missing) == 1 else ("are", "them")
        raise UserError(
            f"training.report_to: {', '.join(missing)} {verb} not installed: "
            f"pip install {install}, or remove {pronoun} from training.report_to"
        )
    out = config.output_path
    for name in names:
        if name in LOCAL_DIRS:
            variable, folder = LOCAL_DIRS[name]
            os.environ.setdefault(variable, str((out / folder).resolve()))
    if "wandb" in names:
        _check_wandb_credentials()
    if "comet_ml" in names:
        _check_comet_credentials()
    where = f" (TensorBoard: {out / TENSORBOARD_DIR})" if "tensorboard" in names else ""
    return f"trackers: {', '.join(names)}{where}"


def _check_wandb_credentials() -> None:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    import wandb

    # False without a key in WANDB_API_KEY or from `wandb login`; no request, no prompt
    if not wandb.login(verify=False, prompt=False):
        raise UserError(
            "training.report_to: wandb has no API key: set WANDB_API_KEY (or run `wandb login`), "
            "or WANDB_MODE=offline to log locally"
        )


def _check_comet_credentials() -> None:
    import comet_ml

    settings = comet_ml.get_config()
    if settings.get_bool(None, "comet.start.online", default=None, not_set_value=None) is False:
        return
    if comet_ml.get_api_key(None, settings) is None:
        raise UserError(
            "training.report_to: comet_ml has no API key: set COMET_API_KEY (or run "
            "`comet login`), or COMET_START_ONLINE=0 for an offline experiment"
        )


def clear_tensorboard(config: Config) -> None:
    """A run that trains from step 0 starts a fresh log: curves of an earlier run would
    overlap its own. A resumed run appends to it."""
    shutil.rmtree(config.output_path / TENSORBOARD_DIR, ignore_errors=True)


def attach(trainer: Any, config: Config) -> None:
    """TensorBoard's log into <output_dir>/tensorboard (unless TENSORBOARD_LOGGING_DIR says
    where), and the run's config sent to each tracker when training begins."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(config.output_path / TENSORBOARD_DIR)
    trainer.add_callback(_RunConfigToTrackers(config, trainer.callback_handler.callbacks))


class _RunConfigToTrackers(TrainerCallback):
    """transformers' callbacks send the TrainingArguments and the model's config; this sends
    the YAML config too (base, data, LoRA, merge, publish). It runs after theirs, which open
    the tracker's run in their own `on_train_begin`."""

    def __init__(self, config: Config, callbacks: list[Any]) -> None:
        from llm_finetune.config import config_to_dict

        self.config = config_to_dict(config)  # holds no secrets: tokens are never config
        self.names = trackers(config)
        self.callbacks = callbacks

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            for callback in self.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    text = "```\n" + json.dumps(self.config, indent=2) + "\n```"
                    callback.tb_writer.add_text("llm_finetune_config", text)
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"llm_finetune": self.config}, allow_val_change=True)
        if "comet_ml" in self.names:
            import comet_ml

            experiment = comet_ml.get_running_experiment()
            if experiment is not None:
                experiment.log_parameters(self.config, prefix="llm_finetune")
