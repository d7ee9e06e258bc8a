"""The prompt format and stop tokens a model was trained with, carried by everything that ships it.

A fine-tuned model knows one prompt format and one end-of-sequence token: the ones in its
training text. Generation that never stops, or answers in the wrong voice, is what happens
when an export loses either. The LLM Engineer's Handbook's script trains Alpaca text and
publishes the base model's chat template; a GGUF converted from such a folder copies the wrong
template into `tokenizer.chat_template`, and Ollama picks its template from that one.

Here: the chat template that renders exactly the training text (`training_chat_template`),
written into the merged folder (`write_prompt_format`) from which llama.cpp's converter copies
it into the GGUF; and the check that renders one training row through it, the GGUF's and the
Ollama files (`ollama.ollama_files`) and compares with what training saw
(`prompt_format_problems`). The chat formats themselves are `turn_format`'s.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_finetune.data import alpaca_prompt, format_alpaca, format_chat, format_dpo
from llm_finetune.errors import UserError, abbreviated, first_line
from llm_finetune.exports.ollama import ollama_render, read_modelfile
from llm_finetune.exports.turn_format import (
    Message,
    Render,
    TurnFormat,
    chat_message,
    jinja_render,
)
from llm_finetune.fsutil import read_json_object

DATA_FORMATS = ("alpaca", "chat", "dpo")
# Where transformers 5 saves a tokenizer's chat template; tokenizer_config.json's
# "chat_template" is the older place, and llama.cpp's converter PREFERS it to this file.
TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"


def alpaca_format(eos_token: str) -> TurnFormat:
    """data.py's Alpaca text as a chat format: the preamble is the system message (Ollama's
    own Alpaca template treats it so), an instruction is a user turn, a response the
    assistant's, ended by the EOS as in training. Read off `alpaca_prompt` itself."""
    marker = "\x00instruction\x00"
    head, response_header = alpaca_prompt(marker).split(marker)
    preamble, separator, instruction_header = head.partition("\n\n")
    return TurnFormat(
        prefix={"system": "", "user": instruction_header, "assistant": response_header},
        suffix={"system": separator, "user": "", "assistant": eos_token},
        generation_prompt=response_header,
        default_system=preamble,
    )


def training_chat_template(data_format: str, tokenizer: Any) -> str:
    """The Jinja chat template that renders exactly what training used: for alpaca and dpo
    (whose prompts are Alpaca prompts) the Alpaca text ending in the tokenizer's EOS; for chat
    the tokenizer's own template, the one training rendered with."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; known: {DATA_FORMATS}")
    if data_format == "chat":
        template = default_template(tokenizer.chat_template)
        if not template:
            raise UserError(
                "data.format is 'chat' but the tokenizer has no chat template "
                "(use data.format: alpaca, or a model whose tokenizer has one)"
            )
        return template
    if not tokenizer.eos_token:
        raise UserError("the tokenizer has no EOS token; set one in the base model's tokenizer")
    return alpaca_format(tokenizer.eos_token).jinja()


def default_template(chat_template: str | dict[str, str] | None) -> str | None:
    """The template `apply_chat_template` uses without arguments (a tokenizer may hold several
    named ones: "default" is it)."""
    if isinstance(chat_template, dict):
        return chat_template.get("default")
    return chat_template


def write_prompt_format(folder: Path, data_format: str) -> list[str]:
    """Make the model folder carry the training format's chat template, in the one place
    transformers 5 and llama.cpp's converter both read (`chat_template.jinja`), with no other
    copy left (the converter would take tokenizer_config.json's first); return what changed."""
    folder = Path(folder)
    template = training_chat_template(data_format, _load_tokenizer(folder))
    changes = []
    template_file = folder / TEMPLATE_FILE
    if not template_file.is_file() or template_file.read_text(encoding="utf-8") != template:
        _replace_text(template_file, template)
        changes.append(f"{TEMPLATE_FILE}: the {data_format} training format's chat template")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = read_json_object(config_file, f"copy the tokenizer files into {folder} again")
        if "chat_template" in config:
            del config["chat_template"]
            _replace_text(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            changes.append("tokenizer_config.json: its copy of a chat template removed")
    if (folder / PROCESSOR_TEMPLATE_FILE).is_file():
        (folder / PROCESSOR_TEMPLATE_FILE).unlink()
        changes.append(f"{PROCESSOR_TEMPLATE_FILE}: removed (another copy of a chat template)")
    extras = folder / EXTRA_TEMPLATES_DIR
    if data_format != "chat" and extras.is_dir():
        shutil.rmtree(extras)
        changes.append(f"{EXTRA_TEMPLATES_DIR}/: removed (formats the model was not trained on)")
    return changes


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a missing or damaged tokenizer file, in the loader's words
        raise UserError(
            f"the tokenizer in {folder} does not load ({first_line(exc)}); copy the tokenizer "
            f"files into {folder} again"
        ) from None


def _replace_text(path: Path, text: str) -> None:
    """Write `path` by rename: never half-written, and never through a link into a cache."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---- The check --------------------------------------------------------------------------------


def conversation(data_format: str, row: dict[str, Any]) -> list[Message]:
    """A training row as the conversation a runtime renders: Alpaca's instruction and output
    (an `input` has no place in a chat message: inference prompts have none), DPO's prompt and
    chosen answer, chat's messages."""
    if data_format == "chat":
        return [chat_message(m["role"], m["content"]) for m in row["messages"]]
    if data_format == "dpo":
        return [chat_message("user", row["prompt"]), chat_message("assistant", row["chosen"])]
    return [
        chat_message("user", row["instruction"]),
        chat_message("assistant", row["output"] or ""),
    ]


def training_text(data_format: str, row: dict[str, Any], tokenizer: Any) -> str:
    """The text training made of `row`'s conversation, by data.py's own formatters."""
    if data_format == "chat":
        return format_chat(row, tokenizer)
    if data_format == "dpo":
        pair = format_dpo(row, tokenizer.eos_token)
        return pair["prompt"] + pair["chosen"]
    return format_alpaca(
        {"instruction": row["instruction"], "output": row["output"]}, tokenizer.eos_token
    )


@dataclass
class Shipped:
    """What exports carry that decides how a prompt is rendered and where generation stops."""

    chat_templates: dict[str, str | None] = field(default_factory=dict)  # where -> Jinja
    eos_ids: dict[str, list[int]] = field(default_factory=dict)  # where -> EOS ids
    ollama: dict[str, str] = field(default_factory=dict)  # ollama_files(...).files

    def add(self, other: Shipped) -> Shipped:
        return Shipped(
            {**self.chat_templates, **other.chat_templates},
            {**self.eos_ids, **other.eos_ids},
            {**self.ollama, **other.ollama},
        )


def _ids(value: Any) -> list[int]:
    """An `eos_token_id` field (absent, one id or several) as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def shipped_by_folder(folder: Path) -> Shipped:
    """The merged folder's part: its chat template as AutoTokenizer loads it, and the EOS ids
    of its tokenizer and its generation_config."""
    tokenizer = _load_tokenizer(folder)
    generation_file = folder / "generation_config.json"
    source = generation_file if generation_file.is_file() else folder / "config.json"
    eos = read_json_object(source, f"re-save the model in {folder}").get("eos_token_id")
    return Shipped(
        chat_templates={
            "the merged folder's chat template": default_template(tokenizer.chat_template)
        },
        eos_ids={
            f"{source.name}'s eos_token_id": _ids(eos),
            "the merged folder's tokenizer EOS": _ids(tokenizer.eos_token_id),
        },
    )


def gguf_shipped(metadata: dict[str, Any]) -> Shipped:
    """The GGUF's part, from `gguf.gguf_metadata` (llama.cpp's `tokenizer.chat_template` and
    `tokenizer.ggml.eos_token_id`)."""
    return Shipped(
        chat_templates={"the GGUF's tokenizer.chat_template": metadata.get("chat_template")},
        eos_ids={"the GGUF's eos_token_id": _ids(metadata.get("eos_token_id"))},
    )


def prompt_format_problems(
    data_format: str, row: dict[str, Any], tokenizer: Any, shipped: Shipped
) -> list[str]:
    """One line per place where what ships disagrees with training on `row`: a chat template
    or Ollama template that renders the row otherwise than training did, an EOS id other than
    the trained EOS, Ollama stops that miss the EOS or would cut the trained answer.

    `tokenizer` is the training tokenizer: its EOS, and for chat the template training used.
    Jinja templates are rendered as transformers' apply_chat_template renders (its environment
    and the tokenizer's special tokens), as llama-cpp-python renders a GGUF's."""
    messages = conversation(data_format, row)
    trained = training_text(data_format, row, tokenizer)
    problems = []
    for where, template in shipped.chat_templates.items():
        if not template:
            problems.append(f"{where} is missing: runtimes would prompt in a format of their own")
            continue
        render = jinja_render(template, **tokenizer.special_tokens_map)
        problems += _prompt_problems(where, render, messages, trained)
        problems += _whole_text_problems(where, render, data_format, row, trained, tokenizer)
    problems += _ollama_problems(shipped.ollama, messages, trained, tokenizer)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    problems += [
        f"{where} {ids} lacks {eos_id} ({eos!r}), the EOS that ends every trained answer: "
        "generation would not stop there"
        for where, ids in shipped.eos_ids.items()
        if eos_id not in ids
    ]
    return problems


def _prompt_problems(
    where: str, render: Render, messages: list[Message], trained: str
) -> list[str]:
    """The prompt a runtime renders (all but the last answer, then the generation prompt)
    must be the start of the training text: what the model learned to continue."""
    try:
        prompt = render(messages[:-1], True)
    except Exception as exc:  # a template error, in its own words
        return [f"{where} does not render the row ({first_line(exc)})"]
    if trained.startswith(prompt):
        return []
    return [f"{where} renders the prompt otherwise than training: {_difference(prompt, trained)}"]


def _whole_text_problems(
    where: str, render: Render, data_format: str, row: dict[str, Any], trained: str, tokenizer: Any
) -> list[str]:
    """The whole conversation rendered (the history of a later prompt) must be the training
    text, made by data.py's own formatter with `render` as the chat template."""
    as_template = _TemplateTokenizer(render, tokenizer.eos_token)
    try:
        if data_format == "chat":
            whole = format_chat(row, as_template)
        else:
            whole = render(conversation(data_format, row), False)
    except Exception as exc:
        return [f"{where} does not render the row ({first_line(exc)})"]
    if whole == trained:
        return []
    return [
        f"{where} renders the conversation otherwise than training: {_difference(whole, trained)}"
    ]


@dataclass
class _TemplateTokenizer:
    """What data.format_chat uses of a tokenizer, rendering through `render`."""

    render: Render
    eos_token: str
    chat_template: str = "(rendered by a function)"

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str:
        return self.render(messages, add_generation_prompt)


def _ollama_problems(
    files: dict[str, str], messages: list[Message], trained: str, tokenizer: Any
) -> list[str]:
    """The Modelfile's TEMPLATE and the repo's `template` file, each with its stops and the
    default system prompt Ollama adds to a conversation that has none."""
    places = []
    if "Modelfile" in files:
        try:
            commands = read_modelfile(files["Modelfile"])
        except ValueError as exc:
            return [first_line(exc)]
        values = {name: value for name, value in commands}
        stops = [value for name, value in commands if name == "stop"]
        places.append(("the Modelfile", values.get("template"), stops, values.get("system")))
    if "template" in files:
        stops = json.loads(files.get("params") or "{}").get("stop", [])
        places.append(("the Ollama `template` file", files["template"], stops, files.get("system")))
    # Ollama adds the BOS as a token, as training's tokenizer did: its text is not the template's.
    bos = tokenizer.bos_token
    unbegun = trained[len(bos) :] if bos and trained.startswith(bos) else trained
    eos, answer = tokenizer.eos_token, messages[-1]["content"]
    problems = []
    for where, template, stops, system in places:
        if template is None:
            continue  # Ollama renders the GGUF's chat template, checked as such
        try:
            render = ollama_render(template)
        except ValueError as exc:
            problems.append(f"{where}'s TEMPLATE: {first_line(exc)}")
            continue
        prompt = messages[:-1]
        if system and not (prompt and prompt[0]["role"] == "system"):
            prompt = [chat_message("system", system), *prompt]
        problems += _prompt_problems(
            f"{where}'s TEMPLATE", render, [*prompt, messages[-1]], unbegun
        )
        if eos not in stops:
            problems.append(f"{where}'s stops {stops} lack the EOS {eos!r}")
        problems += [
            f"{where}'s stop {stop!r} occurs in the trained answer: Ollama would cut it there"
            for stop in stops
            if stop and stop in answer
        ]
    return problems


def _difference(rendered: str, trained: str) -> str:
    """Where two texts part, both quoted from a little before."""
    at = len(os.path.commonprefix([rendered, trained]))
    start = max(0, at - 10)
    return (
        f"from character {start}, {abbreviated(rendered[start : start + 40])} where training "
        f"has {abbreviated(trained[start : start + 40])}"
    )
