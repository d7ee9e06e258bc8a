"""Prompt format and stop tokens: the merged folder's chat template, the GGUF's, the Ollama
files and the EOS ids all render and end a training row as training did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_finetune.data import alpaca_prompt, format_alpaca
from llm_finetune.demo import CHAT_TEMPLATE
from llm_finetune.errors import UserError
from llm_finetune.exports.ollama import ollama_files, ollama_render, read_modelfile
from llm_finetune.exports.prompt_format import (
    Shipped,
    alpaca_format,
    gguf_shipped,
    prompt_format_problems,
    shipped_by_folder,
    training_chat_template,
    write_prompt_format,
)
from llm_finetune.exports.turn_format import TurnFormat, jinja_render, turn_format

EOS = "</s>"
ALPACA_ROW = {"instruction": "Write the number 7 in words.", "input": "", "output": "seven"}
# Quotes, backslashes, braces and lines: what a literal-quoting slip would break.
ODD_ROW = {"instruction": "Say 'it' \\ \"so\"\n{{ x }} {% y %}", "output": "it's\n\\ done"}
CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "Answer in words."},
        {"role": "user", "content": "What is 7?"},
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": "And 8?"},
        {"role": "assistant", "content": "eight"},
    ]
}
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML with a system prompt of its own when the conversation has none, as Qwen2.5's has.
CHATML_DEFAULT_SYSTEM = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou help.<|im_end|>\n' }}{% endif %}" + CHATML
)
BOS_FIRST = "{{ bos_token }}" + CHAT_TEMPLATE
# Not linear: earlier answers are dropped from the history (as reasoning templates do).
DROPS_HISTORY = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '<|assistant|>\n' + eos_token }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "one"}],
    [{"role": "user", "content": "a 'b'"}, {"role": "assistant", "content": "c\nd"}],
    CHAT_ROW["messages"],
    CHAT_ROW["messages"][1:3],
]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory) -> Path:
    """The demo tokenizer as the trainer saves it (transformers 5: chat_template.jinja)."""
    from llm_finetune.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(folder)
    return folder


def load_tokenizer(folder: Path, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tokenizer(saved_tokenizer):
    return load_tokenizer(saved_tokenizer)


@pytest.fixture
def merged(tmp_path, saved_tokenizer) -> Path:
    """A merged folder's prompt-format files: the tokenizer as trained, generation_config."""
    folder = tmp_path / "merged"
    load_tokenizer(saved_tokenizer).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return folder


def gguf_of(folder: Path) -> dict:
    """The metadata llama.cpp's converter writes from `folder` (its own reader of the files),
    under the keys `gguf.gguf_metadata` gives them."""
    import gguf

    vocab = gguf.SpecialVocab(folder, load_merges=False)
    return {
        "chat_template": vocab.chat_template,
        "eos_token_id": vocab.special_token_ids.get("eos"),
    }


def everything_shipped(folder: Path, tokenizer) -> Shipped:
    template = load_tokenizer(folder).chat_template
    ollama = ollama_files(template, tokenizer.eos_token, "model-Q4_K_M.gguf")
    shipped = shipped_by_folder(folder).add(gguf_shipped(gguf_of(folder)))
    return shipped.add(Shipped(ollama=ollama.files))


# ---- The training format's chat template ----------------------------------------------------


@pytest.mark.parametrize("row", [ALPACA_ROW, ODD_ROW])
def test_alpaca_template_renders_the_training_text(tokenizer, row):
    template = training_chat_template("alpaca", tokenizer)
    user = [{"role": "user", "content": row["instruction"]}]
    answered = [*user, {"role": "assistant", "content": row["output"]}]
    render = tokenizer.apply_chat_template
    assert render(user, chat_template=template, tokenize=False, add_generation_prompt=True) == (
        alpaca_prompt(row["instruction"])
    )
    assert render(answered, chat_template=template, tokenize=False) == format_alpaca(row, EOS)


def test_alpaca_system_message_replaces_the_preamble(tokenizer):
    template = training_chat_template("dpo", tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = jinja_render(template, eos_token=EOS)(messages, True)
    assert text == "Be brief.\n\n" + alpaca_prompt("Hi").split("\n\n", 1)[1]


def test_chat_format_keeps_the_tokenizer_template(tokenizer):
    assert training_chat_template("chat", tokenizer) == CHAT_TEMPLATE
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        training_chat_template("chat", tokenizer)


def test_alpaca_format_is_read_back_from_its_template(tokenizer):
    template = training_chat_template("alpaca", tokenizer)
    assert turn_format(jinja_render(template, eos_token=EOS)) == alpaca_format(EOS)


@pytest.mark.parametrize(
    ("template", "begin", "default_system"),
    [
        (CHAT_TEMPLATE, "", None),
        (CHATML, "", None),
        (CHATML_DEFAULT_SYSTEM, "", "You help."),
        (BOS_FIRST, "<s>", None),
    ],
)
def test_role_header_templates_are_read_as_turn_formats(template, begin, default_system):
    render = jinja_render(template, eos_token=EOS, bos_token="<s>")
    found = turn_format(render)
    assert found is not None
    assert (found.begin, found.default_system) == (begin, default_system)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            assert found.render(messages, prompt) == render(messages, prompt)


def test_a_template_that_rewrites_history_is_not_read_as_one():
    assert turn_format(jinja_render(DROPS_HISTORY, eos_token=EOS)) is None


@pytest.mark.parametrize(
    "fmt",
    [
        alpaca_format(EOS),
        TurnFormat(
            prefix={"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
            suffix={"system": "</s>\n", "user": "</s>\n", "assistant": "</s>\n"},
            generation_prompt="<|assistant|>\n",
            begin="[start]",
            default_system="Be 'kind' \\ \"ok\"",
        ),
    ],
)
def test_jinja_and_go_templates_come_from_one_description(fmt):
    jinja, go = jinja_render(fmt.jinja(), eos_token=EOS), ollama_render(fmt.go_template())
    late_system = [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]
    for messages in [*CONVERSATIONS, [*late_system, *CONVERSATIONS[1]]]:
        assert jinja(messages, False) == fmt.render(messages, False)
        assert jinja(messages, True) == go(messages, True) == fmt.render(messages, True)


def test_a_literal_go_cannot_hold_is_refused():
    fmt = alpaca_format("{{eos}}")
    assert fmt.go_template() is None
    assert ollama_files(fmt.jinja(), "{{eos}}", "m.gguf").note


# ---- The merged folder --------------------------------------------------------------------------


def test_write_prompt_format_round_trips_through_auto_tokenizer(merged, tokenizer):
    changes = write_prompt_format(merged, "alpaca")
    assert changes == ["chat_template.jinja: the alpaca training format's chat template"]
    loaded = load_tokenizer(merged)
    assert loaded.chat_template == training_chat_template("alpaca", tokenizer)
    prompt = [{"role": "user", "content": ALPACA_ROW["instruction"]}]
    rendered = loaded.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == alpaca_prompt(ALPACA_ROW["instruction"])
    assert write_prompt_format(merged, "alpaca") == []  # nothing left to change


def test_a_stale_template_in_tokenizer_config_is_removed(merged):
    """An older tokenizer_config.json's template beside chat_template.jinja: transformers reads
    the file, llama.cpp's converter the stale copy, so the GGUF would carry the base's."""
    config_file = merged / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    (merged / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    (merged / "additional_chat_templates").mkdir()
    (merged / "additional_chat_templates" / "tool_use.jinja").write_text(CHATML)
    assert gguf_of(merged)["chat_template"] == CHAT_TEMPLATE

    changes = write_prompt_format(merged, "alpaca")

    assert len(changes) == 4
    assert "chat_template" not in json.loads(config_file.read_text())
    assert json.loads(config_file.read_text())["eos_token"] == EOS  # the rest is kept
    assert not (merged / "chat_template.json").exists()
    assert not (merged / "additional_chat_templates").exists()
    assert gguf_of(merged)["chat_template"] == (merged / "chat_template.jinja").read_text()


def test_an_old_layout_chat_tokenizer_keeps_its_template_in_one_place(merged):
    (merged / "chat_template.jinja").unlink()
    config_file = merged / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "chat_template": CHATML})
    )
    write_prompt_format(merged, "chat")
    assert (merged / "chat_template.jinja").read_text() == CHATML
    assert "chat_template" not in json.loads(config_file.read_text())
    assert load_tokenizer(merged).chat_template == CHATML


def test_write_prompt_format_refuses_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(UserError, match="does not load"):
        write_prompt_format(tmp_path, "alpaca")


# ---- The consistency check ------------------------------------------------------------------


@pytest.mark.parametrize("row", [ALPACA_ROW, ODD_ROW])
def test_an_alpaca_export_agrees_with_training(merged, tokenizer, row):
    write_prompt_format(merged, "alpaca")
    shipped = everything_shipped(merged, tokenizer)
    assert prompt_format_problems("alpaca", row, tokenizer, shipped) == []


def test_a_dpo_export_agrees_with_training(merged, tokenizer):
    write_prompt_format(merged, "dpo")
    row = {"prompt": "Write the number 2 in words.", "chosen": "two", "rejected": "too"}
    assert (
        prompt_format_problems("dpo", row, tokenizer, everything_shipped(merged, tokenizer)) == []
    )


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHATML, CHATML_DEFAULT_SYSTEM, BOS_FIRST])
def test_a_chat_export_agrees_with_training(tmp_path, saved_tokenizer, template):
    trained_with = load_tokenizer(saved_tokenizer, template)
    folder = tmp_path / "merged"
    trained_with.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    write_prompt_format(folder, "chat")
    shipped = everything_shipped(folder, trained_with)
    assert "TEMPLATE" in shipped.ollama["Modelfile"]
    assert prompt_format_problems("chat", CHAT_ROW, trained_with, shipped) == []
    row = {"messages": CHAT_ROW["messages"][1:3]}
    assert prompt_format_problems("chat", row, trained_with, shipped) == []


def test_the_handbooks_mistake_is_found(merged, tokenizer):
    """Alpaca training, the base's chat template kept: every rendering of it disagrees."""
    problems = prompt_format_problems(
        "alpaca", ALPACA_ROW, tokenizer, everything_shipped(merged, tokenizer)
    )
    joined = "\n".join(problems)
    renderings = ("merged folder's chat template", "GGUF's tokenizer.chat_template")
    for where in (*renderings, "Modelfile's TEMPLATE", "Ollama `template` file's TEMPLATE"):
        assert f"{where} renders the prompt otherwise than training" in joined
    assert "'<|user|>\\nWrite the number 7" in joined  # what it renders, quoted


def test_a_missing_chat_template_is_reported(tokenizer):
    shipped = Shipped(chat_templates={"the GGUF's tokenizer.chat_template": None})
    assert prompt_format_problems("alpaca", ALPACA_ROW, tokenizer, shipped) == [
        "the GGUF's tokenizer.chat_template is missing: runtimes would prompt in a format of "
        "their own"
    ]


def test_eos_ids_other_than_the_trained_one_are_reported(tokenizer):
    shipped = Shipped(eos_ids={"generation_config.json's eos_token_id": [1], "GGUF": [2]})
    problems = prompt_format_problems("alpaca", ALPACA_ROW, tokenizer, shipped)
    assert problems == [
        "generation_config.json's eos_token_id [1] lacks 2 ('</s>'), the EOS that ends every "
        "trained answer: generation would not stop there"
    ]


def test_a_chat_answer_rendered_differently_is_reported(tmp_path, saved_tokenizer):
    trained_with = load_tokenizer(saved_tokenizer, CHATML)
    other = CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'")
    shipped = Shipped(chat_templates={"the GGUF's tokenizer.chat_template": other})
    problems = prompt_format_problems("chat", CHAT_ROW, trained_with, shipped)
    assert problems and all("otherwise than training" in p for p in problems)


# ---- Ollama ---------------------------------------------------------------------------------


def test_modelfile_template_and_stops(tokenizer):
    files = ollama_files(training_chat_template("alpaca", tokenizer), EOS, "m-Q8_0.gguf").files
    assert sorted(files) == ["Modelfile", "params", "template"]
    commands = read_modelfile(files["Modelfile"])
    assert commands[0] == ("from", "./m-Q8_0.gguf")
    assert ("template", files["template"]) in commands
    assert [value for name, value in commands if name == "stop"] == [EOS]
    assert json.loads(files["params"]) == {"stop": [EOS]}  # no sampling parameter


def test_chatml_stops_at_the_turn_end_too():
    files = ollama_files(CHATML, "<|endoftext|>", "m.gguf").files
    assert json.loads(files["params"]) == {"stop": ["<|endoftext|>", "<|im_end|>"]}


def test_an_untranslatable_template_leaves_ollama_its_own():
    made = ollama_files(DROPS_HISTORY, EOS, "m.gguf", system="Be brief.")
    assert made.files == {
        "Modelfile": 'FROM ./m.gguf\nSYSTEM "Be brief."\n',
        "system": "Be brief.",
    }
    assert "tokenizer.chat_template" in made.note


def test_modelfile_stops_without_the_eos_are_reported(tokenizer, merged):
    write_prompt_format(merged, "alpaca")
    files = ollama_files(load_tokenizer(merged).chat_template, EOS, "m.gguf").files
    files["Modelfile"] = files["Modelfile"].replace('PARAMETER stop "</s>"', 'PARAMETER stop "ven"')
    problems = prompt_format_problems("alpaca", ALPACA_ROW, tokenizer, Shipped(ollama=files))
    assert problems == [
        "the Modelfile's stops ['ven'] lack the EOS '</s>'",
        "the Modelfile's stop 'ven' occurs in the trained answer: Ollama would cut it there",
    ]


def test_an_ollama_system_prompt_is_rendered_as_ollama_does(tokenizer, merged):
    """Ollama adds the default system prompt to a conversation without one: for Alpaca it
    replaces the trained preamble, which the check reports."""
    write_prompt_format(merged, "alpaca")
    template = load_tokenizer(merged).chat_template
    system = '"Hi",\nthen answer "so"'
    files = ollama_files(template, EOS, "m.gguf", system=system).files
    assert read_modelfile(files["Modelfile"])[1] == ("system", system)
    problems = prompt_format_problems("alpaca", ALPACA_ROW, tokenizer, Shipped(ollama=files))
    assert len(problems) == 2 and all(
        "TEMPLATE renders the prompt otherwise" in p for p in problems
    )


def test_an_unterminated_modelfile_template_is_reported(tokenizer):
    files = {"Modelfile": 'FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\n'}
    assert prompt_format_problems("alpaca", ALPACA_ROW, tokenizer, Shipped(ollama=files)) == [
        'the Modelfile\'s TEMPLATE value has no closing """'
    ]


def test_a_system_prompt_a_modelfile_cannot_quote_is_refused(tokenizer):
    with pytest.raises(UserError, match="cannot be quoted in a Modelfile"):
        ollama_files(CHATML, EOS, "m.gguf", system='a """ b')


def test_the_go_renderer_follows_ollamas_trims_and_collation():
    template = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
        '{{- range .Messages }}\n{{- if eq .Role "user" }}<|im_start|>user\n'
        '{{ .Content }}<|im_end|>\n{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
        "{{ .Content }}<|im_end|>\n{{ end }}\n{{- end }}<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    assert ollama_render(template)(messages, True) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\na\n\nb<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_the_go_renderer_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="not a construct"):
        ollama_render("{{ range .Messages }}{{ json .ToolCalls }}{{ end }}")
    with pytest.raises(ValueError, match="without `end`"):
        ollama_render("{{ if .System }}x")
