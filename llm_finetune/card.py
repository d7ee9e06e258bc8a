"""The model card: README.md with Hub metadata and the facts of the run that made the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune import __version__
from llm_finetune.fsutil import read_json_object
from llm_finetune.lora_targets import lands_on

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config
    from llm_finetune.evaluate import Evaluation

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ model_name }} is **{{ base_model_text }}** fine-tuned with LoRA ({{ method }}) by
llm-finetune {{ version }}, then merged into the base weights and saved in
**{{ dtype }}** ("merged_16bit"), so it loads with plain transformers, without peft.

## Usage

```python
from transformers import {{ auto_class }}, AutoTokenizer

model = {{ auto_class }}.from_pretrained("{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
prompt = {{ usage_prompt }}
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Training

| | |
|---|---|
{% for key, value in training_rows %}| {{ key }} | {{ value }} |
{% endfor %}

## Results

| metric | value |
|---|---|
{% for key, value in metric_rows %}| {{ key }} | {{ value }} |
{% endfor %}
{% if comparison %}
## Before and after

The base model and this model on the same held-out rows, which were not trained on:
{{ comparison_source }}.

| | base model | this model |
|---|---|---|
{% for key, before, after in comparison %}| {{ key }} | {{ before }} | {{ after }} |
{% endfor %}{% if comparison_worse %}
**Warning:** fine-tuning made the held-out loss worse.
{% endif %}{% endif %}
{% if samples %}
Held-out answers, greedy, side by side:

| prompt | expected | base model | this model |
|---|---|---|---|
{% for r in samples %}| {{ r.prompt }} | {{ r.expected }} | {{ r.base }} | {{ r.merged }} |
{% endfor %}{% endif %}
{% if plot_file %}
## Training curves

![Train and eval loss against step, and the learning rate]({{ plot_file }})
{% endif %}
{% if export_table %}
## Exports, each checked against this model before publishing

{{ export_table }}

KL, top-1 agreement and "stops at EOS" compare each format's next-token distributions and
greedy generations with this 16-bit model's, on the same held-out token sequences;
perplexity is each format's own on those sequences; "answers right" counts each format's
greedy answers equal to the expected ones.
{% if answers_table %}
Each format's own answers to the first held-out prompts:

{{ answers_table }}
{% endif %}{% endif %}"""

EXPORT_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ what }} of [{{ merged_repo_id }}]({{ merged_link }}), **{{ base_model_text }}** fine-tuned
with LoRA ({{ method }}) by llm-finetune {{ version }}. {{ how }}

## Files and their check against the 16-bit model

{{ export_table }}

KL, top-1 agreement and "stops at EOS" compare each file's next-token distributions and greedy
generations with the 16-bit model's, on the same held-out token sequences; perplexity is each
file's own on those sequences; "answers right" counts its greedy answers equal to the expected
ones. A file beyond its limits is not published.
{% if answers_table %}
Each file's own answers to the first held-out prompts:

{{ answers_table }}
{% endif %}
## Usage

{{ usage }}
"""

GGUF_USAGE = """```sh
llama-cli -hf {repo_id}:{tag}
ollama run hf.co/{repo_id}:{tag}
```

The prompt format the model was trained with is in each file's `tokenizer.chat_template`, and
in the Ollama `template` and `params` files of this repo (stop tokens included)."""

BNB_USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")  # needs bitsandbytes
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```"""

EXPORT_TEXTS = {
    "gguf": (
        "GGUF files",
        "Written with llama.cpp's own converter and quantizer, and each checked by running it "
        "in llama.cpp.",
        GGUF_USAGE,
    ),
    "merged_4bit": (
        "A bitsandbytes 4-bit (NF4) copy",
        "Quantized from the 16-bit merge with bitsandbytes.",
        BNB_USAGE,
    ),
    "fp32": (
        "A float32 merge",
        "The LoRA adapter merged into the base weights in float32.",
        BNB_USAGE.replace("  # needs bitsandbytes", ""),
    ),
}


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (namespace/name): only those go into the metadata."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and ":" not in name


def card_rows(
    config: Config, base: BaseModel, backend: str, summary: dict[str, Any]
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The card's training table (from the config) and results table (from the run summary).

    `base`: the base as configured, and the commit a Hub base was pinned to; results the
    run did not produce are left out.
    """
    t, lora = config.training, config.lora
    training = [
        ("base model", base.name),
        *([("base model revision", base.revision)] if base.on_hub else []),
        ("method", config.method.upper()),
        ("backend", backend),
        ("datasets", ", ".join(d.path for d in config.data.datasets)),
        ("data format", config.data.format),
        ("LoRA r / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
        ("LoRA target modules", lora.target_modules),
        *(
            [("LoRA lands on", lands_on(summary["lora_targets"]))]
            if "lora_targets" in summary
            else []
        ),
        ("rsLoRA", lora.use_rslora),
        ("max_seq_length", config.model.max_seq_length),
        ("learning rate", t.learning_rate),
        ("epochs / max steps", f"{t.num_train_epochs} / {t.max_steps}"),
        (
            "batch size x grad accum",
            f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}",
        ),
        ("optimizer / scheduler", f"{t.optim} / {t.lr_scheduler_type}"),
        ("warmup steps / weight decay", f"{t.warmup_steps} / {t.weight_decay}"),
        ("packing", t.packing),
        ("seed", t.seed),
        ("merged dtype", config.merge.dtype),
    ]
    if config.method == "dpo":
        training.append(("DPO beta", t.beta))

    from llm_finetune.verify import MODES, peak_memory_text

    train, verify = summary.get("train", {}), summary.get("verify", {})
    mode = verify.get("mode")  # absent from a merge checked before the mode was recorded
    metrics = [
        ("train steps", train.get("steps")),
        ("train loss (first logged)", train.get("train_loss_first")),
        ("train loss (last logged)", train.get("train_loss_last")),
        ("eval loss", train.get("eval_loss")),
        ("eval loss (best logged)", train.get("eval_loss_best")),
        ("eval loss (best logged): step", train.get("eval_loss_best_step")),
        ("merge check: max abs logit diff vs base+adapter", verify.get("max_abs_logit_diff")),
        ("merge check: tolerance", verify.get("tolerance")),
        ("merge check: greedy generations agreeing", verify.get("generations_agree")),
        ("merge check: MoE expert choices agreeing", verify.get("routing_agreement")),
        ("merge check: tokens routed otherwise, left out", verify.get("rerouted_tokens") or None),
        ("merge check: mode", f"{mode} ({MODES[mode]})" if mode else None),
        ("merge check: peak memory", peak_memory_text(verify)),
        ("merge check: seconds", verify.get("seconds")),
    ]
    return training, [(k, v) for k, v in metrics if v is not None]


def comparison_rows(
    heldout: dict[str, Any] | None, evaluation: Evaluation | None = None
) -> list[tuple[str, Any, Any]]:
    """The before/after table: the task metric on the held-out answers (`evaluation`), then
    the held-out loss and perplexity (the summary's `heldout`); none when neither was
    measured."""
    rows: list[tuple[str, Any, Any]] = []
    if evaluation is not None:
        rows.append((evaluation.metric_name, evaluation.base.score, evaluation.merged.score))
        if evaluation.merged.margin is not None:
            label = "mean log p(chosen) - log p(rejected)"
            rows.append((label, evaluation.base.margin, evaluation.merged.margin))
        for task, before in evaluation.base.lm_eval.items():
            after = evaluation.merged.lm_eval.get(task, {})
            rows += [(f"lm-eval {task}: {m}", v, after.get(m)) for m, v in before.items()]
    if heldout and "merged" in heldout:
        base, merged = heldout["base"], heldout["merged"]
        rows += [
            ("held-out loss", base["loss"], merged["loss"]),
            ("held-out perplexity", base["perplexity"], merged["perplexity"]),
            ("held-out tokens", base["tokens"], merged["tokens"]),
        ]
    return rows


def comparison_source(heldout: dict[str, Any] | None, evaluation: Evaluation | None) -> str:
    """What the before/after table measured, in words."""
    parts = []
    if evaluation is not None:
        parts.append(f"greedy answers to {evaluation.rows} prompts ({evaluation.source})")
    if evaluation is not None and evaluation.base.lm_eval:
        parts.append(f"lm-evaluation-harness tasks {', '.join(evaluation.base.lm_eval)}")
    if heldout and "merged" in heldout:
        parts.append(
            f"mean next-token cross-entropy over every token of {heldout['rows']} rows, and "
            "its exponential"
        )
    return "; ".join(parts)


# model-index entries of this project: the Hub shows them, and a later run reads them back to
# compare on the same rows (the fingerprint is the dataset revision).
HELD_OUT_DATASET_TYPE = "llm-finetune/held-out"


def eval_results(
    evaluation: Evaluation | None, heldout: dict[str, Any] | None, datasets: list[str]
) -> list[Any] | None:
    """The merged model's results in the Hub's model-index format (huggingface_hub EvalResult):
    the task metric on the evaluated rows, and the held-out loss."""
    from huggingface_hub import EvalResult

    if evaluation is None:
        return None
    common = dict(
        task_type="text-generation",
        dataset_type=HELD_OUT_DATASET_TYPE,
        dataset_name=f"held-out rows of {', '.join(datasets)}",
        dataset_split="test",
        dataset_revision=evaluation.rows_fingerprint,
    )
    results = [
        EvalResult(
            metric_type=evaluation.metric,
            metric_value=evaluation.merged.score,
            metric_name=evaluation.metric_name,
            **common,
        )
    ]
    for task, metrics in evaluation.merged.lm_eval.items():
        results += [
            EvalResult(
                task_type="text-generation",
                dataset_type=task,
                dataset_name=task,
                metric_type=metric.split(",")[0],
                metric_value=value,
                metric_name=metric,
                source_name="lm-evaluation-harness",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness",
            )
            for metric, value in metrics.items()
        ]
    if heldout and "merged" in heldout:
        results.append(
            EvalResult(
                metric_type="loss",
                metric_value=heldout["merged"]["loss"],
                metric_name="held-out loss",
                **common,
            )
        )
    return results


def published_scores(readme: Path) -> dict[str, float]:
    """What a card this project wrote records: "<metric>@<rows fingerprint>" -> value, for
    its own held-out entries; {} for a card without them (or another tool's card)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(readme)
    except Exception:  # not a card with metadata: nothing to compare with
        return {}
    if "llm-finetune" not in (card.data.tags or []):
        return {}
    return {
        f"{r.metric_type}@{r.dataset_revision}": float(r.metric_value)
        for r in card.data.eval_results or []
        if r.dataset_type == HELD_OUT_DATASET_TYPE and isinstance(r.metric_value, int | float)
    }


def _auto_class(folder: Path) -> str:
    """The class the model in `folder` loads with (Mistral 3 has no causal-LM class)."""
    from llm_finetune.checkpoint_names import model_class

    config = folder / "config.json"
    fix = f"write {folder} again with save_pretrained"
    model_type = read_json_object(config, fix).get("model_type") if config.is_file() else None
    return model_class(model_type or "").__name__


def write_model_card(
    folder: Path,
    *,
    repo_id: str,
    base_model: str,
    datasets: list[str],
    method: str,
    dtype: str,
    license: str | None,
    tags: list[str],
    training_rows: list[tuple[str, Any]],
    metric_rows: list[tuple[str, Any]],
    usage_prompt: str,
    plot_file: str | None = None,
    heldout: dict[str, Any] | None = None,
    evaluation: Evaluation | None = None,
    exports: list[dict[str, Any]] | None = None,
) -> Path:
    """README.md with Hub metadata (base_model, datasets, tags, license) and the run's facts;
    `plot_file`: an image beside it that the card shows (the Hub renders it from the repo);
    `heldout`, `evaluation`: the before/after measurements (see `comparison_rows`), also as
    the card's model-index."""
    from huggingface_hub import ModelCard, ModelCardData

    from llm_finetune.exports.formats import answers_table, markdown_table, table_cell

    hub_base = (
        base_model if looks_like_hub_id(base_model) and not Path(base_model).exists() else None
    )
    data = ModelCardData(
        base_model=hub_base,
        datasets=[d for d in datasets if looks_like_hub_id(d) and not Path(d).exists()] or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["llm-finetune", "lora", method, "merged_16bit", *tags],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(evaluation, heldout, datasets),
    )
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        base_model_text=base_model,
        repo_id=repo_id,
        auto_class=_auto_class(Path(folder)),
        version=__version__,
        method=method.upper(),
        dtype=dtype,
        usage_prompt=repr(usage_prompt),
        training_rows=training_rows,
        metric_rows=metric_rows,
        plot_file=plot_file,
        comparison=comparison_rows(heldout, evaluation),
        comparison_source=comparison_source(heldout, evaluation),
        comparison_worse=(heldout or {}).get("worse"),
        samples=[
            {k: table_cell(v) for k, v in row.items()}
            for row in (evaluation.samples if evaluation else [])
        ],
        export_table=markdown_table(exports) if exports else "",
        answers_table=answers_table(exports) if exports else "",
    )
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def write_export_card(
    folder: Path,
    kind: str,
    repo_id: str,
    config: Config,
    merged_repo_id: str,
    rows: list[dict[str, Any]],
) -> Path:
    """README.md of an export's own repo: what the files are, and how each measured."""
    from huggingface_hub import ModelCard, ModelCardData

    from llm_finetune.exports.formats import answers_table, kind_of, markdown_table

    mine = [r for r in rows if r["passed"] and kind_of(r["format"]) == kind]
    what, how, usage = EXPORT_TEXTS[kind]
    smallest = min(mine, key=lambda r: r["bytes"])["format"]
    data = ModelCardData(
        base_model=merged_repo_id,
        license=config.publish.license,
        tags=["llm-finetune", config.method, kind, *(["llama.cpp"] if kind == "gguf" else [])],
        library_name=None if kind == "gguf" else "transformers",
        pipeline_tag="text-generation",
    )
    card = ModelCard.from_template(
        data,
        template_str=EXPORT_CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        what=what,
        how=how,
        merged_repo_id=merged_repo_id,
        merged_link=f"/{merged_repo_id}",
        base_model_text=config.model.name,
        method=config.method.upper(),
        version=__version__,
        export_table=markdown_table(mine),
        answers_table=answers_table(mine),
        usage=usage.format(repo_id=repo_id, tag=smallest.upper()),
    )
    path = Path(folder) / "README.md"
    card.save(path)
    return path
