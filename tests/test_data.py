"""Dataset loading and formatting: the handbook's Alpaca text + EOS, chat, DPO, local files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llm_finetune.config import DataConfig, DatasetSource
from llm_finetune.data import (
    alpaca_prompt,
    format_alpaca,
    format_chat,
    format_dataset,
    format_dpo,
    inference_prompt,
    load_raw,
    load_source,
    resolve_source,
)
from llm_finetune.errors import UserError

EOS = "</s>"

ROWS = [
    {"instruction": "Write the number 3 in words.", "input": "-", "output": "three"},
    {"instruction": "Translate to English.", "input": "un", "output": "one"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from llm_finetune.demo import build_tokenizer

    return build_tokenizer()


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the file type that the suffix names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise ValueError(path)
    return path


def data_config(*sources: dict[str, Any], **options: Any) -> DataConfig:
    return DataConfig(datasets=list(sources), **options)


# --- formatting ----------------------------------------------------------------------------


def test_alpaca_text_is_the_handbook_template_plus_eos() -> None:
    row = {"instruction": "Write the number 47 in words.", "input": "", "output": "forty-seven"}
    assert format_alpaca(row, EOS) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Write the number 47 in words.\n"
        "\n"
        "### Response:\n"
        "forty-seven</s>"
    )


def test_alpaca_without_input_key_or_with_none_input() -> None:
    expected = format_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"}, EOS)
    assert format_alpaca({"instruction": "Say hi.", "output": "hi"}, EOS) == expected
    assert format_alpaca({"instruction": "Say hi.", "input": None, "output": "hi"}, EOS) == expected


def test_alpaca_with_input() -> None:
    row = {"instruction": "Translate to English.", "input": "un", "output": "one"}
    assert format_alpaca(row, "<|end|>") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Translate to English.\n"
        "\n"
        "### Input:\n"
        "un\n"
        "\n"
        "### Response:\n"
        "one<|end|>"
    )


def test_alpaca_prompt_is_the_text_before_the_response() -> None:
    row = {"instruction": "Translate to English.", "input": "un", "output": "one"}
    prompt = alpaca_prompt(row["instruction"], row["input"])
    assert prompt.endswith("### Response:\n")
    assert format_alpaca(row, EOS) == prompt + "one" + EOS


def test_chat_uses_the_tokenizer_template_and_ends_with_one_eos(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write 5 in words."},
        {"role": "assistant", "content": "five"},
    ]
    text = format_chat({"messages": messages}, tokenizer)
    assert text == (
        "<|system|>\nBe brief.</s>\n<|user|>\nWrite 5 in words.</s>\n<|assistant|>\nfive</s>"
    )
    assert text.count(EOS + "\n" + EOS) == 0


def test_chat_appends_eos_when_template_lacks_it(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert format_chat({"messages": messages}, tokenizer) == "[user] hi\n[assistant] hello\n</s>"


def test_chat_without_template_is_a_user_error() -> None:
    no_template = SimpleNamespace(chat_template=None, eos_token=EOS)
    with pytest.raises(UserError, match=r"^data.format is 'chat' but the tokenizer has no chat"):
        format_chat({"messages": [{"role": "user", "content": "x"}]}, no_template)


def test_dpo_formatting() -> None:
    row = {"prompt": "Write 2 in words.", "chosen": "two", "rejected": "2"}
    assert format_dpo(row, EOS) == {
        "prompt": (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n"
            "\n"
            "### Instruction:\n"
            "Write 2 in words.\n"
            "\n"
            "### Response:\n"
        ),
        "chosen": "two</s>",
        "rejected": "2</s>",
    }


def test_inference_prompt_alpaca_and_dpo(tokenizer) -> None:
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Convert 21 to words.\n"
        "\n"
        "### Response:\n"
    )
    assert inference_prompt("alpaca", "Convert 21 to words.", tokenizer) == expected
    assert inference_prompt("dpo", "Convert 21 to words.", tokenizer) == expected


def test_inference_prompt_chat(tokenizer) -> None:
    assert inference_prompt("chat", "Convert 21 to words.", tokenizer) == (
        "<|user|>\nConvert 21 to words.</s>\n<|assistant|>\n"
    )


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_local_file(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"rows{suffix}", ROWS)
    dataset = load_raw(data_config({"path": str(path)}))
    assert sorted(dataset.column_names) == ["input", "instruction", "output"]
    assert dataset.to_list() == ROWS


def test_load_drops_other_columns_and_adds_empty_input(tmp_path: Path) -> None:
    rows = [{"id": 1, "instruction": "Say hi.", "output": "hi", "source": "x"}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    dataset = load_raw(data_config({"path": str(path)}))
    assert dataset.to_list() == [{"instruction": "Say hi.", "output": "hi", "input": ""}]


def test_csv_empty_input_cell_formats_without_input(tmp_path: Path, tokenizer) -> None:
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = write_rows(tmp_path / "rows.csv", rows * 2)
    config = data_config({"path": str(path)})
    splits = format_dataset(load_raw(config), config, tokenizer)
    assert list(splits["train"]["text"]) == [format_alpaca(rows[0], EOS)] * 2


def test_sources_of_different_file_types_concatenate(tmp_path: Path) -> None:
    """csv loads as large_string (an all-empty column as float64), json as string."""
    csv_rows = [{"instruction": "a", "input": "", "output": "b"}]
    csv_path = write_rows(tmp_path / "one.csv", csv_rows)
    jsonl_path = write_rows(tmp_path / "two.jsonl", ROWS)
    dataset = load_raw(data_config({"path": str(csv_path)}, {"path": str(jsonl_path)}))
    assert list(dataset["instruction"]) == ["a", ROWS[0]["instruction"], ROWS[1]["instruction"]]
    assert list(dataset["output"]) == ["b", "three", "one"]


def test_columns_mapping(tmp_path: Path) -> None:
    rows = [{"question": "What is 1 in words?", "answer": "one", "extra": 0}]
    path = write_rows(tmp_path / "qa.jsonl", rows)
    source = {"path": str(path), "columns": {"instruction": "question", "output": "answer"}}
    dataset = load_raw(data_config(source))
    assert dataset.to_list() == [
        {"instruction": "What is 1 in words?", "output": "one", "input": ""}
    ]


def test_mapped_column_replaces_same_named_column(tmp_path: Path) -> None:
    rows = [{"instruction": "old", "question": "new", "output": "o"}]
    path = write_rows(tmp_path / "both.jsonl", rows)
    dataset = load_raw(data_config({"path": str(path), "columns": {"instruction": "question"}}))
    assert dataset.to_list() == [{"instruction": "new", "output": "o", "input": ""}]


def test_columns_mapping_can_swap(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "swapped.jsonl", [{"instruction": "o", "output": "i"}])
    source = {"path": str(path), "columns": {"instruction": "output", "output": "instruction"}}
    assert load_raw(data_config(source)).to_list() == [
        {"instruction": "i", "output": "o", "input": ""}
    ]


def test_missing_column_names_column_and_dataset_columns(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", [{"instruction": "q", "answer": "a"}])
    with pytest.raises(UserError) as info:
        load_raw(data_config({"path": str(path)}))
    assert str(info.value) == (
        f"data.datasets[0] ({path}): missing column 'output' needed by data.format 'alpaca'; "
        "the dataset has ['instruction', 'answer']; map one with columns: {output: <your column>}"
    )


def test_missing_dpo_column_in_second_source(tmp_path: Path) -> None:
    good = write_rows(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}])
    config = data_config({"path": str(good)}, {"path": str(bad)}, format="dpo")
    with pytest.raises(UserError) as info:
        load_raw(config)
    assert str(info.value) == (
        f"data.datasets[1] ({bad}): missing column 'rejected' needed by data.format 'dpo'; "
        "the dataset has ['prompt', 'chosen']; map one with columns: {rejected: <your column>}"
    )


def test_mapping_names_a_column_the_dataset_lacks(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(UserError) as info:
        load_raw(data_config({"path": str(path), "columns": {"instruction": "question"}}))
    assert str(info.value) == (
        f"data.datasets[0] ({path}): columns ['question'] named in 'columns' are not in the "
        "dataset; it has ['instruction', 'output']"
    )


def test_unknown_builtin() -> None:
    with pytest.raises(UserError) as info:
        resolve_source("builtin:numbers")
    assert str(info.value) == "unknown bundled dataset 'builtin:numbers'; bundled: ['number-words']"


def test_missing_local_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(UserError) as info:
        load_source(DatasetSource(path=str(path)), "data.datasets[0]", "alpaca")
    assert str(info.value) == f"dataset file {str(path)!r} not found"


def test_unreadable_file_is_one_line_user_error(tmp_path: Path) -> None:
    path = tmp_path / "header-only.csv"
    path.write_text("instruction,output\n")
    with pytest.raises(UserError) as info:
        load_raw(data_config({"path": str(path)}))
    message = str(info.value)
    assert message.startswith(f"data.datasets[0] ({path}): could not load the dataset: ")
    assert "\n" not in message


def test_builtin_number_words() -> None:
    dataset = load_raw(data_config({"path": "builtin:number-words"}))
    assert len(dataset) == 400
    assert sorted(dataset.column_names) == ["input", "instruction", "output"]
    assert dataset[0] == {
        "instruction": "Write the number 0 in words.",
        "output": "zero",
        "input": "",
    }
    assert dataset[47] == {
        "instruction": "Write the number 47 in words.",
        "output": "forty-seven",
        "input": "",
    }
    assert all(row["instruction"] and row["output"] for row in dataset)


def test_max_samples_is_a_seeded_subset() -> None:
    full = load_raw(data_config({"path": "builtin:number-words"}))
    first = load_raw(data_config({"path": "builtin:number-words"}, max_samples=10))
    again = load_raw(data_config({"path": "builtin:number-words"}, max_samples=10))
    other = load_raw(data_config({"path": "builtin:number-words"}, max_samples=10, shuffle_seed=1))
    assert len(first) == 10
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()
    assert all(row in full.to_list() for row in first.to_list())
    assert first.to_list() != full.select(range(10)).to_list()  # shuffled, not the head


def test_max_samples_above_size_keeps_all(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", ROWS)
    assert load_raw(data_config({"path": str(path)}, max_samples=50)).to_list() == ROWS


# --- format_dataset ------------------------------------------------------------------------


def test_test_size_split(tokenizer) -> None:
    config = data_config({"path": "builtin:number-words"}, test_size=0.25)
    splits = format_dataset(load_raw(config), config, tokenizer)
    assert set(splits) == {"train", "test"}
    assert (len(splits["train"]), len(splits["test"])) == (300, 100)
    assert splits["train"].column_names == ["text"]
    expected = sorted(format_alpaca(row, EOS) for row in load_raw(config))
    assert sorted([*splits["train"]["text"], *splits["test"]["text"]]) == expected


def test_no_test_split_by_default(tokenizer) -> None:
    config = data_config({"path": "builtin:number-words"}, max_samples=8)
    splits = format_dataset(load_raw(config), config, tokenizer)
    assert list(splits) == ["train"]
    assert len(splits["train"]) == 8


def test_format_dataset_alpaca_text(tmp_path: Path, tokenizer) -> None:
    path = write_rows(tmp_path / "rows.jsonl", ROWS)
    config = data_config({"path": str(path)})
    texts = format_dataset(load_raw(config), config, tokenizer)["train"]["text"]
    assert list(texts) == [format_alpaca(row, EOS) for row in ROWS]


def test_format_dataset_chat(tmp_path: Path, tokenizer) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Write 5 in words."},
                {"role": "assistant", "content": "five"},
            ]
        }
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    config = data_config({"path": str(path)}, format="chat")
    splits = format_dataset(load_raw(config), config, tokenizer)
    assert list(splits["train"]["text"]) == [
        "<|user|>\nWrite 5 in words.</s>\n<|assistant|>\nfive</s>"
    ]


def test_format_dataset_dpo(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": "Write 2 in words.", "chosen": "two", "rejected": "2", "score": 1}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    config = data_config({"path": str(path)}, format="dpo")
    train = format_dataset(load_raw(config), config, tokenizer)["train"]
    assert sorted(train.column_names) == ["chosen", "prompt", "rejected"]
    assert train[0] == format_dpo(rows[0], EOS)


def test_format_dataset_needs_an_eos_token(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", ROWS)
    config = data_config({"path": str(path)})
    with pytest.raises(UserError, match=r"^the tokenizer has no EOS token"):
        format_dataset(load_raw(config), config, SimpleNamespace(eos_token=None))
