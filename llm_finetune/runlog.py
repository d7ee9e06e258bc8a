"""What a run prints and leaves behind: one line per stage, the run summary JSON (also for a
failed run: it says where and why), and the closing table."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_finetune.distributed import is_main_process
from llm_finetune.evaluate import METRIC_NAMES
from llm_finetune.exports.formats import table

SUMMARY_FILE = "run-summary.json"


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
    for key in (
        "train_loss_first",
        "train_loss_last",
        "eval_loss_best",
        "eval_loss_last",
        "verify_max_abs_logit_diff",
    ):
        if summary.get(key) is not None:
            log(f"{key}: {summary[key]:.6g}")
    if summary.get("exports"):
        columns = table(summary["exports"])
        widths = [max(len(row[i]) for row in columns) for i in range(len(columns[0]))]
        log("")
        for row in columns:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            log("  ".join(cells).rstrip())
    heldout = summary.get("heldout") or {}
    if "merged" in heldout:
        base, merged = heldout["base"], heldout["merged"]
        flag = "  (worse: see the warning above)" if heldout["worse"] else ""
        log(
            f"held-out loss / perplexity ({heldout['rows']} rows): base {base['loss']:.4g} / "
            f"{base['perplexity']:.4g} -> merged {merged['loss']:.4g} / "
            f"{merged['perplexity']:.4g}{flag}"
        )
    evaluation = summary.get("evaluation")
    if evaluation:
        log(
            f"{METRIC_NAMES[evaluation['metric']]} ({evaluation['rows']} held-out rows): base "
            f"{evaluation['base']['score']:.1%} -> merged {evaluation['merged']['score']:.1%}"
        )
    if summary.get("plot"):
        log(f"curves: {summary['plot']}")
    if summary.get("published"):
        p = summary["published"]
        log(f"published: {p['repo_id']} at {p['endpoint']} (commit {p['commit'][:12]})")
    for kind, p in summary.get("published_exports", {}).items():
        log(f"published {kind}: {p['repo_id']} (commit {p['commit'][:12]})")
