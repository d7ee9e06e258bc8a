"""General ability before and after: lm-evaluation-harness tasks (`evaluate.lm_eval_tasks`)
run on the base and on the merged model, for the forgetting users check after a fine-tune.

lm-eval (`pip install -e '.[eval]'`) is the field's standard harness; we call its Python API
on the model the evaluation stage has already loaded, so each model loads once. Task names are
lm-eval's own (`arc_easy`, `hellaswag`, `mmlu`, ...) or those of YAML files in
`evaluate.lm_eval_include_path`; the preflight loads every task and its data before training.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError, first_line

if TYPE_CHECKING:
    from llm_finetune.config import EvaluateConfig

INSTALL_HINT = "pip install -e '.[eval]' (lm-eval), or remove evaluate.lm_eval_tasks"


def _quiet_lm_eval() -> None:
    """lm-eval's bars and notices are not the run's log: its logger at ERROR, its tqdm off,
    and its `git describe` of the working directory (stderr noise outside a checkout) skipped."""
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from tqdm import tqdm

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    for module in (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface):
        module.tqdm = silent_tqdm
    lm_eval.evaluator.get_git_commit_hash = lambda: None


def task_manager(settings: EvaluateConfig) -> Any:
    """lm-eval's TaskManager for these settings, built once per process: the preflight and
    both models' runs share it."""
    return _task_manager(settings.lm_eval_include_path, tuple(settings.lm_eval_tasks))


@functools.cache
def _task_manager(include: str | None, tasks: tuple[str, ...]) -> Any:
    """The tasks of `include` (a folder of task YAMLs) and, unless they hold every task
    named, lm-eval's bundled ones (indexing those takes seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            f"evaluate.lm_eval_tasks needs lm-eval, which is not installed: {INSTALL_HINT}"
        ) from None
    _quiet_lm_eval()
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(local.match_tasks([task]) for task in tasks):
            return local
    return TaskManager(include_path=include, include_defaults=True)


def check_tasks(settings: EvaluateConfig) -> str:
    """Before training: lm-eval is installed, every task name exists, and its data loads (a
    Hub dataset is downloaded now, not after training). Returns the preflight's line."""
    from lm_eval.tasks import get_task_dict

    if settings.lm_eval_include_path and not Path(settings.lm_eval_include_path).is_dir():
        raise UserError(
            f"evaluate.lm_eval_include_path {settings.lm_eval_include_path!r} is not a folder "
            "of lm-eval task YAML files"
        )
    manager = task_manager(settings)
    unknown = [t for t in settings.lm_eval_tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(
            f"evaluate.lm_eval_tasks: lm-eval knows no task {unknown[0]!r}; list them with "
            "`lm-eval ls tasks`, or put its YAML in evaluate.lm_eval_include_path"
        )
    try:
        tasks = get_task_dict(list(settings.lm_eval_tasks), manager)
    except Exception as exc:  # a dataset that cannot be loaded (offline, gated, a bad path)
        raise UserError(
            f"evaluate.lm_eval_tasks {settings.lm_eval_tasks}: lm-eval cannot load the tasks' "
            f"data: {first_line(exc)}"
        ) from None
    return f"lm-eval tasks: {', '.join(settings.lm_eval_tasks)} ({len(tasks)} loaded)"


def primary_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per configured task (or group), its metrics "<metric>,<filter>" -> value, the first
    one lm-eval reports being the one compared (acc for multiple choice, exact_match for
    generation tasks)."""
    picked = {}
    for task in tasks:
        values = results["results"].get(task, {})
        picked[task] = {
            key: float(value)
            for key, value in values.items()
            if "," in key and "_stderr," not in key and isinstance(value, int | float)
        }
    return picked


def run_tasks(model: Any, tokenizer: Any, settings: EvaluateConfig, batch_size: int) -> dict:
    """The tasks on a loaded model: {task: {metric: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    manager = task_manager(settings)
    training = model.training
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=list(settings.lm_eval_tasks),
        task_manager=manager,
        limit=settings.lm_eval_limit,
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    model.train(training)
    return primary_metrics(results, list(settings.lm_eval_tasks))
