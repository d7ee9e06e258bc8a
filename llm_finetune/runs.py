"""`llm-finetune runs [DIR]`: one line per run under DIR (default `outputs/`), read from the
run-summary.json each run leaves, also when it failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.runlog import SUMMARY_FILE

COLUMNS = (
    "run",
    "folder",
    "status",
    "failed stage",
    "steps",
    "train loss",
    "eval loss",
    "merge check",
    "published",
)


def find_summaries(folder: Path) -> list[Path]:
    """The summaries of runs in `folder` (a run folder itself, or one holding run folders,
    one or two levels down: `outputs/<run>`, `outputs/<group>/<run>`)."""
    if not folder.is_dir():
        raise UserError(
            f"{str(folder)!r} is not a folder: pass the folder your runs write into "
            "(output_dir's parent, `outputs` by default)"
        )
    found = [folder / SUMMARY_FILE, *folder.glob(f"*/{SUMMARY_FILE}")]
    found += folder.glob(f"*/*/{SUMMARY_FILE}")
    return sorted(p for p in found if p.is_file())


def run_row(path: Path, folder: Path) -> dict[str, str]:
    """One run's line (`folder`: where the listing started); a summary that does not read
    says so in its status."""
    where = path.parent.relative_to(folder).as_posix()
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        unreadable = {"run": path.parent.name, "folder": where, "status": "unreadable"}
        return {**dict.fromkeys(COLUMNS, "-"), **unreadable}
    train = summary.get("train") or {}
    return {
        "run": str(summary.get("run_name") or path.parent.name),
        "folder": where,
        "status": str(summary.get("status", "-")),
        "failed stage": str(summary.get("failed_stage") or "-"),
        "steps": _text(train.get("steps")),
        "train loss": _text(summary.get("train_loss_last")),
        "eval loss": _text(summary.get("eval_loss_last", train.get("eval_loss"))),
        "merge check": _merge_check(summary),
        "published": _published(summary.get("published")),
    }


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _merge_check(summary: dict[str, Any]) -> str:
    """A recorded check passed (a failing one stops the run at its stage, unrecorded)."""
    verify = summary.get("verify")
    if isinstance(verify, dict) and "max_abs_logit_diff" in verify:
        return f"ok (max |Δlogit| {verify['max_abs_logit_diff']:.2g})"
    return "failed" if summary.get("failed_stage") == "verify" else "-"


def _published(published: Any) -> str:
    if not isinstance(published, dict) or "repo_id" not in published:
        return "-"
    commit = str(published.get("commit") or "")[:12]
    return f"{published['repo_id']}@{commit} ({published.get('endpoint', '?')})"


def runs_table(rows: list[dict[str, str]]) -> str:
    """Aligned columns, a header line first."""
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in COLUMNS) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
