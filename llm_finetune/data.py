"""Datasets: load local files, Hub names or bundled data, and format them as the handbook does.

SFT text is the handbook's Alpaca template plus the tokenizer's EOS token (without EOS the
fine-tuned model never learns to stop); chat data goes through the tokenizer's chat
template; DPO rows become prompt / chosen+EOS / rejected+EOS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.config import DataConfig, DatasetSource
from llm_finetune.errors import UserError, first_line

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

# The handbook's template, verbatim (long lines are part of the text).
ALPACA_TEMPLATE = """Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
{}

### Response:
{}"""  # noqa: E501

ALPACA_WITH_INPUT_TEMPLATE = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""  # noqa: E501

REQUIRED_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "dpo": ("prompt", "chosen", "rejected"),
}
OPTIONAL_COLUMNS = {"alpaca": ("input",), "chat": (), "dpo": ()}

BUILTIN_DIR = Path(__file__).resolve().parent / "demo"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt with an empty response: what the model sees at inference time."""
    if input_text:
        return ALPACA_WITH_INPUT_TEMPLATE.format(instruction, input_text, "")
    return ALPACA_TEMPLATE.format(instruction, "")


def format_alpaca(example: dict[str, Any], eos_token: str) -> str:
    return alpaca_prompt(example["instruction"], example.get("input") or "") + (
        (example["output"] or "") + eos_token
    )


def format_chat(example: dict[str, Any], tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "data.format is 'chat' but the tokenizer has no chat template "
            "(use data.format: alpaca, or a model whose tokenizer has one)"
        )
    text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    # Templates that close each turn with EOS + "\n" already end in EOS: do not add a second.
    stripped = text.rstrip()
    return stripped if stripped.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def format_dpo(example: dict[str, Any], eos_token: str) -> dict[str, str]:
    return {
        "prompt": alpaca_prompt(example["prompt"]),
        "chosen": example["chosen"] + eos_token,
        "rejected": example["rejected"] + eos_token,
    }


def prompt_and_answer(
    row: dict[str, Any], data_format: str, tokenizer: Any
) -> tuple[str, str] | None:
    """A raw row's prompt as the model sees it at inference, and the answer it was trained to
    give (DPO: the chosen one); None for a chat row whose last turn is not the assistant's."""
    if data_format == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input") or ""), row["output"] or ""
    if data_format == "dpo":
        return format_dpo(row, "")["prompt"], row["chosen"]
    messages = row["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        return None
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    return prompt, messages[-1]["content"]


def inference_prompt(data_format: str, prompt: str, tokenizer: Any) -> str:
    """A verification/demo prompt formatted the way the model was trained to see it."""
    if data_format == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return alpaca_prompt(prompt)


def resolve_source(path: str) -> tuple[str, dict[str, Any]]:
    """Map a dataset path to `load_dataset` arguments: bundled, local file, or Hub name."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if not re.fullmatch(r"[a-z0-9-]+", name):
            raise UserError(f"bundled dataset names are lowercase words and dashes, got {path!r}")
        candidate = BUILTIN_DIR / f"{name.replace('-', '_')}.jsonl"
        if not candidate.is_file():
            known = sorted(p.stem.replace("_", "-") for p in BUILTIN_DIR.glob("*.jsonl"))
            raise UserError(f"unknown bundled dataset {path!r}; bundled: {known}")
        return "json", {"data_files": str(candidate)}
    local = Path(path).expanduser()
    if local.suffix.lower() in LOCAL_FORMATS:
        if not local.is_file():
            raise UserError(f"dataset file {path!r} not found")
        return LOCAL_FORMATS[local.suffix.lower()], {"data_files": str(local)}
    if local.is_dir():
        return str(local), {}
    return path, {}


def load_source(source: DatasetSource, key: str, data_format: str) -> Dataset:
    """Load one dataset (`key`: its place in the config, for errors) and rename its columns to
    ours; refuse a missing column by name."""
    from datasets import load_dataset

    builder, kwargs = resolve_source(source.path)
    where = f"{key} ({source.path})"
    try:
        dataset = load_dataset(builder, source.name, split=source.split, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        reason = first_line(exc)
        raise UserError(f"{where}: could not load the dataset: {reason}") from None
    renames = {theirs: ours for ours, theirs in source.columns.items() if theirs != ours}
    missing_mapped = [theirs for theirs in renames if theirs not in dataset.column_names]
    if missing_mapped:
        raise UserError(
            f"{where}: columns {missing_mapped} named in 'columns' are not in the dataset; "
            f"it has {dataset.column_names}"
        )
    # A mapped column replaces a same-named one the dataset already has.
    replaced = [ours for ours in renames.values() if ours in dataset.column_names]
    dataset = dataset.remove_columns([c for c in replaced if c not in renames])
    dataset = dataset.rename_columns(renames)
    missing = [c for c in REQUIRED_COLUMNS[data_format] if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{where}: missing column {missing[0]!r} needed by data.format {data_format!r}; "
            f"the dataset has {dataset.column_names}; map one with "
            f"columns: {{{missing[0]}: <your column>}}"
        )
    keep = [c for c in REQUIRED_COLUMNS[data_format] + OPTIONAL_COLUMNS[data_format]]
    dataset = dataset.select_columns([c for c in keep if c in dataset.column_names])
    if "input" in keep and "input" not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
    if data_format != "chat":
        # One text type for every source (csv gives large_string, an empty csv column float64),
        # so that sources of different file types can be concatenated.
        from datasets import Features, Value

        text_features = Features({c: Value("string") for c in dataset.column_names})
        if dataset.features != text_features:
            dataset = dataset.cast(text_features)
    return dataset


def load_raw(config: DataConfig) -> Dataset:
    """All sources concatenated (before formatting): the pipeline's data preflight."""
    from datasets import concatenate_datasets

    parts = [
        load_source(s, f"data.datasets[{i}]", config.format) for i, s in enumerate(config.datasets)
    ]
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(dataset) == 0:
        raise UserError("data.datasets: the datasets hold no rows")
    if config.max_samples is not None and config.max_samples < len(dataset):
        dataset = dataset.shuffle(seed=config.shuffle_seed).select(range(config.max_samples))
    return dataset


def held_out_split(raw: Dataset, config: DataConfig) -> Dataset | None:
    """The rows training holds out (`data.test_size`): `format_dataset` splits the same rows,
    since datasets draws the split from the number of rows and the seed only."""
    if config.test_size > 0 and len(raw) >= 2:
        return raw.train_test_split(test_size=config.test_size, seed=config.shuffle_seed)["test"]
    return None


def format_dataset(raw: Dataset, config: DataConfig, tokenizer: Any) -> DatasetDict:
    """Format rows for trl (a `text` column, or prompt/chosen/rejected) and split off a test set."""
    from datasets import DatasetDict

    eos = tokenizer.eos_token
    if not eos:
        raise UserError("the tokenizer has no EOS token; set one in the base model's tokenizer")
    if config.format == "alpaca":
        formatted = raw.map(
            lambda ex: {"text": format_alpaca(ex, eos)}, remove_columns=raw.column_names
        )
    elif config.format == "chat":
        formatted = raw.map(
            lambda ex: {"text": format_chat(ex, tokenizer)}, remove_columns=raw.column_names
        )
    else:
        formatted = raw.map(lambda ex: format_dpo(ex, eos), remove_columns=raw.column_names)
    if config.test_size > 0 and len(formatted) >= 2:
        return formatted.train_test_split(test_size=config.test_size, seed=config.shuffle_seed)
    return DatasetDict(train=formatted)
