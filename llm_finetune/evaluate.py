"""Did the fine-tune make the model better at its task? The base and the merged model answer
the same held-out prompts greedily, in the training format, and each answer is scored against
the expected one (DPO: how often each model prefers the chosen answer to the rejected one).

The held-out loss (`heldout`) says the model fits the text; this says it gives the right
answers, which is what the gate on publishing (`gate`) and the model card report. Bounded by
`evaluate.max_rows`, batched, one model in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError
from llm_finetune.progress import progress_bar

if TYPE_CHECKING:
    from llm_finetune.config import Config, EvaluateConfig

EXACT_MATCH = "exact_match"
ROUGE_L = "rouge_l"
PREFERENCE = "preference_accuracy"
METRIC_NAMES = {
    EXACT_MATCH: "exact match",
    ROUGE_L: "ROUGE-L F1",
    PREFERENCE: "prefers the chosen answer",
}
SHORT_ANSWER_WORDS = 8  # metric "auto": exact match when the median answer is this short
MAX_AUTO_NEW_TOKENS = 512
SAMPLES = 5  # held-out answers kept for the log and the model card


@dataclass(frozen=True)
class EvalRow:
    """One held-out row: the prompt as the model sees it, and what it should answer."""

    instruction: str  # the user's words, for the card's table
    prompt: str  # in the training format (Alpaca template or chat template)
    expected: str  # the answer trained on (DPO: the chosen one)
    rejected: str | None = None  # DPO only


def eval_rows(rows: Any, data_format: str, tokenizer: Any, limit: int) -> list[EvalRow]:
    """The first `limit` usable rows of `rows` (raw dataset rows in `data_format`); chat rows
    are used when a turn precedes their last, the assistant's (the answer to score)."""
    from llm_finetune.data import prompt_and_answer

    picked: list[EvalRow] = []
    for row in rows:
        if len(picked) >= limit:
            break
        pair = prompt_and_answer(row, data_format, tokenizer)
        if pair is None or (data_format == "chat" and len(row["messages"]) < 2):
            continue
        picked.append(EvalRow(_instruction(row, data_format), *pair, row.get("rejected")))
    return picked


def _instruction(row: dict[str, Any], data_format: str) -> str:
    """The user's words of a row, for the card's table: its last user turn in a chat."""
    if data_format == "alpaca":
        return row["instruction"]
    if data_format == "dpo":
        return row["prompt"]
    users = [m["content"] for m in row["messages"][:-1] if m.get("role") == "user"]
    return users[-1] if users else ""


def evaluation_rows(
    config: Config, raw: Any, eval_data: Any, tokenizer: Any
) -> tuple[list[EvalRow], str]:
    """The rows `evaluate` runs on: those of `evaluate.dataset` (`eval_data`, loaded by the
    preflight), else the held-out split; the first `evaluate.max_rows` of them, and where
    they come from, in words."""
    from llm_finetune.data import held_out_split

    if eval_data is not None:
        rows, source = eval_data, f"evaluate.dataset {config.evaluate.dataset.path}"
    else:
        rows = held_out_split(raw, config.data)
        source = f"the held-out split, data.test_size {config.data.test_size:g}"
    picked = eval_rows(rows or [], config.data.format, tokenizer, config.evaluate.max_rows)
    if not picked:
        raise UserError(
            f"no rows to evaluate in {source}: chat rows need an assistant turn last; set "
            "evaluate.dataset, or evaluate.enabled: false"
        )
    return picked, source


def rows_fingerprint(rows: Sequence[EvalRow]) -> str:
    """Names the evaluated rows: scores are comparable only on the same fingerprint."""
    text = json.dumps([[r.prompt, r.expected, r.rejected] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Metrics

_FINAL_PUNCTUATION = ".!?;:,"


def normalise(text: str) -> str:
    """An answer as users compare answers: case, runs of whitespace, surrounding quotes and
    final punctuation do not count ("Forty-seven." == "forty-seven")."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    text = text.strip("\"'`“”‘’ ")
    return text.rstrip(_FINAL_PUNCTUATION).rstrip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalise`."""
    hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / max(1, len(references))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words), by Google's rouge-score."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return sum(scores) / max(1, len(scores))


SCORERS = {EXACT_MATCH: exact_match, ROUGE_L: rouge_l}


def choose_metric(configured: str, method: str, references: Sequence[str]) -> str:
    """The metric of `evaluate.metric`; "auto": exact match for short answers (a median of at
    most SHORT_ANSWER_WORDS words), ROUGE-L for long ones; DPO: preference accuracy."""
    if method == "dpo":
        return PREFERENCE
    if configured != "auto":
        return configured
    words = statistics.median(len(r.split()) for r in references) if references else 0
    return EXACT_MATCH if words <= SHORT_ANSWER_WORDS else ROUGE_L


# ---------------------------------------------------------------------------------------
# Running a model


def load_for_evaluation(path: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The model in float32 on the CPU; in its stored dtype, spread over the GPUs, on CUDA."""
    import torch

    from llm_finetune.checkpoint_names import load_pretrained

    cuda = torch.cuda.is_available()
    model = load_pretrained(
        path,
        revision=revision,
        dtype="auto" if cuda else torch.float32,
        device_map="auto" if cuda else None,
        trust_remote_code=trust_remote_code,
    )
    return model.eval()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    what: str,
) -> list[str]:
    """Greedy answers, batched with left padding, each ending at the model's EOS."""
    import torch

    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        with torch.inference_mode(), progress_bar(len(prompts), f"    {what}", "row") as bar:
            for first in range(0, len(prompts), batch_size):
                batch = tokenizer(
                    list(prompts[first : first + batch_size]), return_tensors="pt", padding=True
                ).to(device)
                output = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                    pad_token_id=pad,
                    # greedy: the model's sampling defaults would only warn
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                new = output[:, batch["input_ids"].shape[1] :]
                answers += [
                    t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)
                ]
                bar.update(len(new))
    finally:
        tokenizer.padding_side = side
    return answers


def answer_log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], what: str
) -> list[float]:
    """log p(answer | prompt), summed over the answer's tokens (+ EOS, as DPO trains)."""
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    scores = []
    with torch.inference_mode(), progress_bar(len(prompts), f"    {what}", "row") as bar:
        for prompt, answer in zip(prompts, answers, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = prompt_ids + tokenizer(answer + eos, add_special_tokens=False)["input_ids"]
            tensor = torch.tensor([ids], device=device)
            log_probs = model(input_ids=tensor).logits[0, :-1].float().log_softmax(-1)
            targets = tensor[0, 1:]
            picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            scores.append(float(picked[len(prompt_ids) - 1 :].sum()))
            bar.update(1)
    return scores


# ---------------------------------------------------------------------------------------
# The stage's result


@dataclass
class ModelAnswers:
    """One model's score on the rows, and what it answered."""

    score: float
    answers: list[str]
    seconds: float
    margin: float | None = None  # DPO: mean log p(chosen) - log p(rejected)
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metrics


@dataclass
class Evaluation:
    metric: str
    rows: int
    rows_fingerprint: str
    source: str  # where the rows come from, in words
    base: ModelAnswers
    merged: ModelAnswers
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        values = dict(data)
        values["base"] = ModelAnswers(**values["base"])
        values["merged"] = ModelAnswers(**values["merged"])
        return cls(**values)


def score_model(
    path: str,
    rows: Sequence[EvalRow],
    tokenizer: Any,
    metric: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    what: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    lm_eval: EvaluateConfig | None = None,
) -> ModelAnswers:
    """Load the model at `path`, answer (or rate) every row, run the lm-eval tasks of
    `lm_eval` on it (if any), free it."""
    import torch

    start = time.perf_counter()
    model = load_for_evaluation(path, revision, trust_remote_code)
    prompts = [r.prompt for r in rows]
    margin = None
    if metric == PREFERENCE:
        chosen = answer_log_probs(model, tokenizer, prompts, [r.expected for r in rows], what)
        rejected = answer_log_probs(
            model, tokenizer, prompts, [r.rejected or "" for r in rows], f"{what} (rejected)"
        )
        diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
        score = sum(d > 0 for d in diffs) / max(1, len(diffs))
        margin = round(sum(diffs) / max(1, len(diffs)), 4)
        answers: list[str] = []
    else:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, what)
        score = SCORERS[metric](answers, [r.expected for r in rows])
    general = {}
    if lm_eval is not None and lm_eval.lm_eval_tasks:
        from llm_finetune.general_ability import run_tasks

        general = run_tasks(model, tokenizer, lm_eval, batch_size)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    seconds = round(time.perf_counter() - start, 2)
    return ModelAnswers(round(score, 4), answers, seconds, margin, general)


def answer_budget(rows: Sequence[EvalRow], tokenizer: Any, configured: int | None) -> int:
    """`evaluate.max_new_tokens`, else the longest expected answer's tokens plus 8: room to
    answer right, and to show a rambling answer, without generating far past it."""
    if configured is not None:
        return configured
    longest = max(len(tokenizer(r.expected, add_special_tokens=False)["input_ids"]) for r in rows)
    return min(MAX_AUTO_NEW_TOKENS, longest + 8)


def evaluate(
    base_path: str,
    merged_path: str,
    rows: Sequence[EvalRow],
    tokenizer: Any,
    *,
    metric: str,
    source: str,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    base_revision: str | None = None,
    trust_remote_code: bool = False,
    lm_eval: EvaluateConfig | None = None,
) -> Evaluation:
    """The base and the merged model on the same rows, scored the same way (and on the
    lm-eval tasks of `lm_eval`, if any)."""
    start = time.perf_counter()
    budget = answer_budget(rows, tokenizer, max_new_tokens)
    common = dict(max_new_tokens=budget, batch_size=batch_size, lm_eval=lm_eval)
    base = score_model(
        base_path,
        rows,
        tokenizer,
        metric,
        what="base",
        revision=base_revision,
        trust_remote_code=trust_remote_code,
        **common,
    )
    merged = score_model(merged_path, rows, tokenizer, metric, what="merged", **common)
    samples = [
        {"prompt": r.instruction, "expected": r.expected, "base": b, "merged": m}
        for r, b, m in zip(rows[:SAMPLES], base.answers, merged.answers, strict=False)
    ]
    return Evaluation(
        metric=metric,
        rows=len(rows),
        rows_fingerprint=rows_fingerprint(rows),
        source=source,
        base=base,
        merged=merged,
        samples=samples,
        seconds=round(time.perf_counter() - start, 2),
    )
