"""Seeing a run: trackers (checked before training; W&B and Comet in their offline modes),
eval loss while training, the curves' PNG, base vs merged on held-out rows, the card's
sections, `llm-finetune runs`, and progress bars only on a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llm_finetune import cli
from llm_finetune.config import load_config
from llm_finetune.errors import UserError
from tests.conftest import GOOD_TOKEN, REPO_ROOT, tiny_config

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the config ----------------------------------------------------------------------------


def test_report_to_is_tensorboard_unless_set_and_takes_one_name_or_a_list():
    assert load_config(DEMO).training.report_to == ["tensorboard"]
    assert load_config(DEMO, ["training.report_to=wandb"]).training.report_to == ["wandb"]
    both = load_config(DEMO, ["training.report_to=[wandb,comet_ml]"]).training.report_to
    assert both == ["wandb", "comet_ml"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[none,wandb]", "'none' cannot be combined with trackers"),
        ("neptune", r"training.report_to.0: Input should be 'tensorboard', 'wandb'"),
        ("[]", "training.report_to: List should have at least 1 item"),
    ],
)
def test_a_bad_report_to_is_refused_in_one_line(value, message):
    with pytest.raises(UserError, match=message) as caught:
        load_config(DEMO, [f"training.report_to={value}"])
    assert "\n" not in str(caught.value)


def test_what_is_watched_does_not_change_what_a_rerun_reuses(tmp_path):
    """Switching the tracker or the eval interval keeps a finished adapter reusable."""
    from llm_finetune.base_model import BaseModel
    from llm_finetune.resume import train_fingerprint

    base = BaseModel("builtin:tiny-llama", "/x")
    plain = tiny_config(tmp_path)
    watched = plain.model_copy(deep=True)
    watched.training.report_to = ["wandb"]
    watched.training.eval_steps = 7
    assert train_fingerprint(plain, base) == train_fingerprint(watched, base)
    trained_longer = plain.model_copy(deep=True)
    trained_longer.training.max_steps = 41
    assert train_fingerprint(plain, base) != train_fingerprint(trained_longer, base)


# --- the preflight -------------------------------------------------------------------------


def test_a_tracker_that_is_not_installed_fails_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("mlflow", "trackio") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "out"
    code = cli.main(
        [
            "run",
            str(DEMO),
            f"output_dir={out}",
            "publish.enabled=false",
            "training.report_to=[tensorboard,mlflow,trackio]",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "error: training.report_to: mlflow, trackio are not installed: pip install mlflow "
        "trackio, or remove them from training.report_to"
    )
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "preflight")
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_wandb_without_an_api_key_is_refused_unless_offline(tmp_path, monkeypatch):
    from llm_finetune.tracking import check_trackers

    monkeypatch.setenv("HOME", str(tmp_path))  # no `wandb login` of this machine's user
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = tiny_config(tmp_path, training={"report_to": ["wandb"]})
    with pytest.raises(
        UserError, match=r"wandb has no API key: set WANDB_API_KEY .*WANDB_MODE=offline"
    ):
        check_trackers(config)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check_trackers(config) == "trackers: wandb"


def test_comet_without_an_api_key_is_refused_unless_offline(tmp_path, monkeypatch):
    from llm_finetune.tracking import check_trackers

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.comet.config
    monkeypatch.chdir(tmp_path)  # nor one in the working directory
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.delenv("COMET_START_ONLINE", raising=False)
    config = tiny_config(tmp_path, training={"report_to": ["comet_ml"]})
    with pytest.raises(
        UserError, match=r"comet_ml has no API key: set COMET_API_KEY .*COMET_START_ONLINE=0"
    ):
        check_trackers(config)
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    assert check_trackers(config) == "trackers: comet_ml"


@pytest.mark.parametrize(("report_to", "shown"), [(["tensorboard"], False), (["comet_ml"], True)])
def test_comet_key_notice_only_when_the_run_logs_to_comet(tmp_path, monkeypatch, report_to, shown):
    """transformers says comet_ml lacks a key whenever it is installed; a run that does not log
    to Comet must not show it, one that does keeps it."""
    from transformers.integrations import integration_utils

    from llm_finetune.tracking import quiet_unrequested_trackers

    logger = logging.getLogger(integration_utils.__name__)
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(integration_utils, "_is_comet_installed", True)
    monkeypatch.setattr(integration_utils, "_is_comet_recent_enough", True)
    monkeypatch.setattr(integration_utils, "_is_comet_configured", False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        quiet_unrequested_trackers(tiny_config(tmp_path, training={"report_to": report_to}))
        quiet_unrequested_trackers(tiny_config(tmp_path, training={"report_to": report_to}))
        assert integration_utils.is_comet_available() is False
    finally:
        logger.removeHandler(handler)
    notices = [r for r in records if "Comet API Key is not configured" in r.getMessage()]
    assert len(notices) == (1 if shown else 0)
    assert len(logger.filters) == (0 if shown else 1)  # added once, however often it is called


# --- a run watched by TensorBoard, W&B and Comet, offline ------------------------------------


def test_offline_trackers_get_the_run_name_config_and_eval_loss(tmp_path):
    """`llm-finetune train` with the three trackers in their own offline modes: each holds
    the run's name, its YAML config and the eval loss logged while training, under the
    output folder; the Hub token in the environment is in none of their files."""
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_finetune.cli",
            "train",
            str(DEMO),
            f"output_dir={out}",
            "run_name=watched-run",
            "training.max_steps=4",
            "training.eval_steps=2",
            "training.logging_steps=1",
            "training.report_to=[tensorboard,wandb,comet_ml]",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "HF_TOKEN": GOOD_TOKEN,
            "WANDB_MODE": "offline",
            "COMET_START_ONLINE": "0",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    train = summary["train"]
    evals = [(e["step"], e["eval_loss"]) for e in train["history"] if "eval_loss" in e]
    assert [step for step, _ in evals] == [2, 4]
    assert train["eval_loss_best"] == min(loss for _, loss in evals)
    assert summary["eval_loss_last"] == pytest.approx(evals[-1][1])
    assert (out / "training-curves.png").read_bytes().startswith(PNG_MAGIC)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events), size_guidance={"tensors": 0})
    board.Reload()
    assert [e.step for e in board.Scalars("eval/loss")] == [2, 4]
    assert len(board.Scalars("train/loss")) == 4
    config_text = board.Tensors("llm_finetune_config/text_summary")[0].tensor_proto.string_val[0]
    assert b'"run_name": "watched-run"' in config_text and b'"shuffle_seed": 0' in config_text

    (wandb_run,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    record = wandb_run.read_bytes()
    # data.shuffle_seed: a key of our config only (not the trainer's, not the command line)
    assert b"watched-run" in record and b"shuffle_seed" in record and b"eval/loss" in record

    (comet_archive,) = (out / "comet").glob("*.zip")
    with zipfile.ZipFile(comet_archive) as archive:
        experiment = b"".join(archive.read(name) for name in archive.namelist())
    assert b"watched-run" in experiment and b"shuffle_seed" in experiment
    assert b"eval/loss" in experiment

    assert GOOD_TOKEN not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert GOOD_TOKEN.encode() not in path.read_bytes(), path
    assert GOOD_TOKEN.encode() not in experiment


# --- the curves, before/after, the card --------------------------------------------------------


def test_the_curves_are_a_png_and_nothing_is_drawn_without_losses(tmp_path):
    from llm_finetune.plots import plot_training

    history = [
        {"step": 1, "loss": 6.8, "learning_rate": 0.0},
        {"step": 10, "loss": 1.2, "learning_rate": 1e-3},
        {"step": 10, "eval_loss": 1.4},
    ]
    path = plot_training(history, tmp_path / "curves.png", "a run")
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)
    assert plot_training([{"step": 5, "eval_loss": 1.0}], tmp_path / "none.png", "x") is None
    assert not (tmp_path / "none.png").exists()


def test_the_heldout_loss_is_the_mean_cross_entropy_over_every_token(tiny_base):
    """Against transformers' own loss (labels=input_ids), row by row, weighted by tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.heldout import heldout_loss

    tokenizer = load_tokenizer(tiny_base)
    texts = ["one two three", "forty-seven</s>", "Write the number 99 in words.\nninety-nine"]
    measured = heldout_loss(tiny_base, texts, tokenizer, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    total = tokens = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert measured["tokens"] == tokens and measured["rows"] == 3
    assert measured["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(2.718281828 ** (total / tokens), rel=1e-4)


def test_a_fine_tune_that_made_the_heldout_loss_worse_is_a_warning(tmp_path, capsys):
    from llm_finetune import pipeline
    from llm_finetune.heldout import compare

    before = {"loss": 1.0, "perplexity": 2.718, "rows": 4, "tokens": 40, "seconds": 0.1}
    after = {**before, "loss": 1.5, "perplexity": 4.482}
    result = compare(before, after)
    assert result["worse"] and result["loss_change"] == 0.5
    assert not compare(after, before)["worse"]
    recorded = pipeline.heldout_stage(tiny_config(tmp_path), None, None, {"heldout": result})
    assert recorded is result
    printed = capsys.readouterr().out
    assert "held-out loss (4 rows): base 1 (perplexity 2.718) -> merged 1.5" in printed
    assert "warning: fine-tuning made the held-out loss worse" in printed


def test_a_heldout_measurement_that_fails_is_a_warning_not_a_lost_run(tmp_path, capsys):
    """The merge is verified and the adapter kept: a model that cannot be measured (here: no
    merged folder) costs the before/after numbers, not the run."""
    from types import SimpleNamespace

    from llm_finetune import pipeline

    checks = SimpleNamespace(raw_data=None, base=None)
    clock = pipeline.StageClock()
    facts: dict = {}
    result = pipeline.heldout_stage(tiny_config(tmp_path), checks, clock, facts)
    assert set(result) == {"error"} and "heldout" not in facts
    assert "warning: the held-out loss could not be measured" in capsys.readouterr().out
    assert "heldout" in clock.seconds


def test_the_card_shows_the_curves_and_the_before_after_table(tmp_path):
    from llm_finetune.card import write_model_card
    from llm_finetune.heldout import compare

    before = {"loss": 6.78, "perplexity": 878.1, "rows": 40, "tokens": 1683, "seconds": 0.5}
    after = {**before, "loss": 0.27, "perplexity": 1.31}
    common = dict(
        repo_id="demo/model",
        base_model="builtin:tiny-llama",
        datasets=["builtin:number-words"],
        method="sft",
        dtype="bfloat16",
        license=None,
        tags=[],
        training_rows=[("seed", 0)],
        metric_rows=[("train steps", 200)],
        usage_prompt="Write the number 47 in words.",
    )
    card = write_model_card(
        tmp_path, plot_file="training-curves.png", heldout=compare(before, after), **common
    ).read_text()
    assert "## Before and after" in card and "every token of 40 rows" in card
    assert "| held-out loss | 6.78 | 0.27 |" in card
    assert "| held-out perplexity | 878.1 | 1.31 |" in card
    assert "![Train and eval loss against step, and the learning rate](training-curves.png)" in card
    assert "Warning" not in card
    worse = write_model_card(tmp_path, heldout=compare(after, before), **common).read_text()
    assert "**Warning:** fine-tuning made the held-out loss worse." in worse
    assert "## Training curves" not in worse
    plain = write_model_card(tmp_path, **common).read_text()
    assert "## Before and after" not in plain and "## Training curves" not in plain


# --- llm-finetune runs -----------------------------------------------------------------------


def _summary(folder: Path, **fields) -> None:
    folder.mkdir(parents=True)
    (folder / "run-summary.json").write_text(json.dumps(fields))


def test_runs_lists_each_run_from_its_summary(tmp_path, capsys):
    _summary(
        tmp_path / "tiny-demo",
        run_name="tiny-demo",
        status="succeeded",
        train={"steps": 200},
        train_loss_last=0.2349,
        eval_loss_last=0.269,
        verify={"max_abs_logit_diff": 0.0414, "tolerance": 0.25},
        published={
            "repo_id": "demo/tiny-llama-number-words",
            "commit": "d19da3428473d083b3d1813abb720ebce29fb864",
            "endpoint": "http://127.0.0.1:8765",
        },
    )
    _summary(tmp_path / "group" / "bad-token", run_name="mine", status="failed",
             failed_stage="preflight")  # fmt: skip
    _summary(tmp_path / "broken-check", run_name="x", status="failed", failed_stage="verify")
    (tmp_path / "half-written").mkdir()
    (tmp_path / "half-written" / "run-summary.json").write_text('{"run_name": ')
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "folder", "status", "failed", "stage", "steps", "train", "loss", "eval", "loss",
        "merge", "check", "published",
    ]  # fmt: skip
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows["tiny-demo"][:7] == [
        "tiny-demo", "tiny-demo", "succeeded", "-", "200", "0.2349", "0.269",
    ]  # fmt: skip
    assert "ok (max |Δlogit| 0.041)" in lines[1 + list(rows).index("tiny-demo")]
    assert rows["tiny-demo"][-2:] == [
        "demo/tiny-llama-number-words@d19da3428473",
        "(http://127.0.0.1:8765)",
    ]
    assert rows["group/bad-token"][:4] == ["mine", "group/bad-token", "failed", "preflight"]
    assert rows["broken-check"][-2:] == ["failed", "-"]
    assert rows["half-written"][:3] == ["half-written", "half-written", "unreadable"]


def test_runs_of_a_folder_without_runs_and_of_no_folder(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"no runs under {tmp_path}")
    assert cli.main(["runs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: '{tmp_path / 'missing'}' is not a folder: pass the folder")
    assert "\n" not in err


# --- progress bars -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "ci", "shown"),
    [(True, None, True), (True, "true", False), (False, None, False), (True, "false", True)],
)
def test_bars_show_on_a_terminal_outside_ci_only(monkeypatch, terminal, ci, shown):
    from llm_finetune import progress

    stderr = io.StringIO()
    monkeypatch.setattr(stderr, "isatty", lambda: terminal)
    monkeypatch.setattr(sys, "stderr", stderr)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert progress.bars_wanted() is shown
    with progress.progress_bar(3, "merge", "tensor") as bar:
        bar.update(3)
    assert ("merge" in stderr.getvalue()) is shown
    for name in progress.LIBRARY_SWITCHES:
        monkeypatch.setenv(name, "")  # restored afterwards, whatever quiet_library_bars sets
        monkeypatch.delenv(name)
    progress.quiet_library_bars()
    assert all((os.environ.get(n) == "1") is not shown for n in progress.LIBRARY_SWITCHES)
