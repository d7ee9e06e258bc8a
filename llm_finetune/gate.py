"""The gate on publishing: a merged model is published only when validation confirms it, as
the handbook says ("after fine-tuning is complete and validation confirms the model performs
well"), and never over a better model this project published to the same repo.

Confirmed means: the held-out loss is below the base's, the task metric (`evaluate`) is at
least the base's (or `evaluate.min_score`), and the repo's card does not record a better
score on the same held-out rows. A refusal is one line naming each failed check and by how
much; nothing is published, and the adapter and the merged model stay on disk.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import NotConfirmed
from llm_finetune.evaluate import METRIC_NAMES, Evaluation

if TYPE_CHECKING:
    from llm_finetune.config import EvaluateConfig
    from llm_finetune.hub import PublishTarget


PUBLISHED = "the published model's"  # what a check against the target repo's card compares with


@dataclass(frozen=True)
class Check:
    """One comparison the gate makes: the merged model's value against a reference."""

    name: str
    merged: float
    reference: float
    against: str  # "the base's", "evaluate.min_score", PUBLISHED
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.merged >= self.reference
        return self.merged < self.reference

    def problem(self) -> str:
        """The failure in words, with the numbers and the difference."""
        relation = "below" if self.higher_is_better else "not below"
        change = self.merged - self.reference
        return (
            f"{self.name} {self.merged:.4g} is {relation} {self.against} "
            f"{self.reference:.4g} ({change:+.4g})"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def validation_checks(
    heldout: dict[str, Any] | None, evaluation: Evaluation | None, settings: EvaluateConfig
) -> list[Check]:
    """What the run measured, as checks: the held-out loss against the base's; the task
    metric against `evaluate.min_score`, else against the base's; each lm-eval task's first
    metric against the base's, less `evaluate.lm_eval_max_drop`."""
    min_score = settings.min_score
    checks = []
    if heldout and "merged" in heldout:
        checks.append(
            Check(
                "held-out loss",
                heldout["merged"]["loss"],
                heldout["base"]["loss"],
                "the base's",
                higher_is_better=False,
            )
        )
    if evaluation is not None:
        name = METRIC_NAMES[evaluation.metric]
        if min_score is not None:
            checks.append(
                Check(name, evaluation.merged.score, min_score, "evaluate.min_score", True)
            )
        else:
            checks.append(
                Check(name, evaluation.merged.score, evaluation.base.score, "the base's", True)
            )
        drop = settings.lm_eval_max_drop
        against = f"the base's less {drop:g}" if drop else "the base's"
        for task, before in evaluation.base.lm_eval.items():
            metric = next(iter(before), None)
            if metric is not None:
                merged = evaluation.merged.lm_eval.get(task, {}).get(metric, float("nan"))
                checks.append(
                    Check(f"{task} {metric}", merged, before[metric] - drop, against, True)
                )
    return checks


def published_check(evaluation: Evaluation | None, published: dict[str, float]) -> Check | None:
    """The new score against the one the repo's card records for the same metric on the same
    rows (`published`: card.published_scores); None when there is nothing comparable."""
    if evaluation is None:
        return None
    key = f"{evaluation.metric}@{evaluation.rows_fingerprint}"
    if key not in published:
        return None
    name = METRIC_NAMES[evaluation.metric]
    return Check(name, evaluation.merged.score, published[key], PUBLISHED, True)


@dataclass
class Verdict:
    checks: list[Check]
    enabled: bool  # evaluate.gate
    unmeasured: str | None = None  # why the held-out loss could not be measured

    @property
    def passed(self) -> bool:
        return self.unmeasured is None and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "passed": self.passed,
            "checks": [c.as_dict() for c in self.checks],
            "unmeasured": self.unmeasured,
        }

    def lines(self) -> list[str]:
        """One line per check for the log."""
        return [
            f"{'ok' if c.passed else 'FAILED'}: {c.name} {c.merged:.4g} against {c.against} "
            f"{c.reference:.4g}"
            for c in self.checks
        ]


def verdict_for(
    heldout: dict[str, Any] | None,
    evaluation: Evaluation | None,
    settings: EvaluateConfig,
    published: dict[str, float],
) -> Verdict:
    """Every check of the run's measurements (`published`: what the target repo's card
    records, card.published_scores)."""
    checks = validation_checks(heldout, evaluation, settings)
    if (check := published_check(evaluation, published)) is not None:
        checks.append(check)
    unmeasured = heldout["error"] if heldout is not None and "error" in heldout else None
    return Verdict(checks, settings.gate, unmeasured)


def published_scores_at(target: PublishTarget, revision: str) -> dict[str, float]:
    """What the card of the repo a run publishes to records of this project's held-out
    results ({} for a new repo, or a card of another tool)."""
    from llm_finetune.card import published_scores
    from llm_finetune.hub import download_card

    with tempfile.TemporaryDirectory() as folder:
        readme = download_card(
            target.repo_id, target.endpoint, target.token, revision, Path(folder)
        )
        return published_scores(readme) if readme is not None else {}


def enforce(verdict: Verdict, kept: str, replace_better: bool) -> list[str]:
    """Raise NotConfirmed for a failed check the config does not waive; return the lines to
    log (a waived failure is a warning)."""
    if verdict.unmeasured is not None and verdict.enabled:
        raise NotConfirmed(
            f"validation could not measure the held-out loss ({verdict.unmeasured}): nothing "
            f"was published; {kept} are kept; fix the cause, or set evaluate.gate: false to "
            "publish unvalidated"
        )
    failed = [c for c in verdict.checks if not c.passed]
    published = [c for c in failed if c.against == PUBLISHED]
    waived = published if replace_better else []
    if not verdict.enabled:
        waived = failed
    refused = [c for c in failed if c not in waived]
    if refused:
        reasons = "; ".join(c.problem() for c in refused)
        fix = (
            "publish.replace_better: true publishes over it"
            if refused == published
            else "change the training settings or the data, or set evaluate.gate: false to "
            "publish anyway"
        )
        raise NotConfirmed(
            f"validation did not confirm the model: {reasons}. Nothing was published; {kept} "
            f"are kept; {fix}"
        )
    lines = [f"warning: {c.problem()} (not enforced: the config allows it)" for c in waived]
    if verdict.unmeasured is not None:
        lines.append(f"warning: no held-out loss ({verdict.unmeasured}); not enforced")
    if not verdict.checks:
        lines.append("warning: nothing confirms the model: no held-out rows were measured")
    return lines
