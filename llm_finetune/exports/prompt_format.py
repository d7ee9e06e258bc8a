"""The prompt format and stop tokens a model was trained with, carried by everything that ships it.

A fine-tuned model knows one prompt format and one end-of-sequence token: the ones in its
training text. Generation that never stops, or answers in the wrong voice, is what happens
when an export loses either. The LLM Engineer's Handbook's script trains Alpaca text and
publishes the base model's chat template; a GGUF converted from such a folder copies the wrong
template into `tokenizer.chat_template`, and Ollama picks its template from that one.

Here: the chat template that renders exactly the training text (`training_chat_template`),
written into the merged folder (`write_prompt_format`) from which llama.cpp's converter copies
it into the GGUF; the Ollama files made from it (`ollama_files`); and the check that renders one
training row through each of them and compares with what training saw
(`prompt_format_problems`).

Ollama's template and llama.cpp's are two languages (Go templates, Jinja): both are generated
from one `TurnFormat`, a linear description (each message is prefix + content + suffix of its
role), read off the Jinja template by rendering it, and only used when it renders every probe
conversation exactly as the template does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_finetune.data import alpaca_prompt, format_alpaca, format_chat, format_dpo
from llm_finetune.errors import UserError, abbreviated, first_line
from llm_finetune.fsutil import read_json_object

Message = dict[str, str]
Render = Callable[[Sequence[Message], bool], str]  # (messages, add_generation_prompt) -> text

ROLES = ("system", "user", "assistant")
DATA_FORMATS = ("alpaca", "chat", "dpo")
# Where transformers 5 saves a tokenizer's chat template; tokenizer_config.json's
# "chat_template" is the older place, and llama.cpp's converter PREFERS it to this file.
TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"


@dataclass(frozen=True)
class TurnFormat:
    """A linear chat format: `begin`, then each message as its role's prefix + content +
    suffix in order, then `generation_prompt` when asked; a conversation without a system
    message gets `default_system` as one (Alpaca's fixed preamble).

    The one description the Jinja and the Go template are both generated from."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    begin: str = ""
    default_system: str | None = None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        parts = [self.begin]
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            parts.append(self._default_turn())
        for message in messages:
            if message["role"] in ROLES:
                role = message["role"]
                parts.append(self.prefix[role] + message["content"] + self.suffix[role])
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def _default_turn(self) -> str:
        return self.prefix["system"] + (self.default_system or "") + self.suffix["system"]

    def jinja(self) -> str:
        """The Jinja chat template (transformers, llama.cpp) that renders as `render` does."""
        q = _jinja_literal
        lines = []
        if self.begin:
            lines.append("{{- " + q(self.begin) + " -}}")
        if self.default_system is not None:
            lines += [
                "{%- set ns = namespace(has_system=false) -%}",
                "{%- for message in messages -%}",
                "{%- if message['role'] == 'system' -%}",
                "{%- set ns.has_system = true -%}",
                "{%- endif -%}",
                "{%- endfor -%}",
                "{%- if not ns.has_system -%}{{- " + q(self._default_turn()) + " -}}{%- endif -%}",
            ]
        lines.append("{%- for message in messages -%}")
        for index, role in enumerate(ROLES):
            keyword = "if" if index == 0 else "elif"
            pieces = [q(self.prefix[role]), "message['content']", q(self.suffix[role])]
            text = " + ".join(piece for piece in pieces if piece != "''")
            lines.append(f"{{%- {keyword} message['role'] == '{role}' -%}}{{{{- {text} -}}}}")
        lines += [
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- "
            + q(self.generation_prompt)
            + " -}}{%- endif -%}",
        ]
        return "\n".join(lines) + "\n"

    def go_template(self) -> str | None:
        """The Ollama template (Go `text/template`, over `.Messages`) that renders as `render`
        does; None when a literal holds `{{`, which raw template text cannot."""
        pieces = [self.begin]
        if self.default_system is not None:
            pieces += ["{{ if not .System }}", self._default_turn(), "{{ end }}"]
        pieces.append("{{ range .Messages }}")
        for index, role in enumerate(ROLES):
            keyword = "if" if index == 0 else "else if"
            pieces += [f'{{{{ {keyword} eq .Role "{role}" }}}}', self.prefix[role]]
            pieces += ["{{ .Content }}", self.suffix[role]]
        pieces += ["{{ end }}{{ end }}", self.generation_prompt]
        literals = [self.begin, self.generation_prompt, self._default_turn()]
        if any("{{" in text for text in [*literals, *self.prefix.values(), *self.suffix.values()]):
            return None
        return "".join(pieces)

    def stops(self, eos_token: str) -> list[str]:
        """Where Ollama stops: the EOS, and the end of an assistant turn when that is another
        text (ChatML's `<|im_end|>` with `<|endoftext|>` as the EOS)."""
        stops = [eos_token]
        turn_end = self.suffix["assistant"].strip()
        if turn_end and turn_end != eos_token:
            stops.append(turn_end)
        return stops


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal that jinja2 and llama.cpp's Jinja engine both read."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


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


# ---- Reading a format off a Jinja template -------------------------------------------------


def jinja_render(chat_template: str, **special_tokens: str) -> Render:
    """Render `chat_template` as transformers' apply_chat_template does (its Jinja environment),
    with the special-token variables given (`eos_token=...`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        rendered, _ = render_jinja_template(
            [list(messages)],
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
        return rendered[0]

    return render


def _m(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def turn_format(render: Render) -> TurnFormat | None:
    """The linear format `render` follows, read off renderings of probe conversations; None
    when it follows none (a template that rewrites earlier turns, folds the system message
    into the first user turn, refuses a role...)."""
    s, u1, a1, u2, a2 = "Sq1", "Uq1", "Aq1", "Uq2", "Aq2"
    try:
        user_only = render([_m("user", u1)], False)
        prompted = render([_m("user", u1)], True)
        pair = render([_m("user", u1), _m("assistant", a1)], False)
        pairs = render(
            [_m("user", u1), _m("assistant", a1), _m("user", u2), _m("assistant", a2)], False
        )
        with_system = render([_m("system", s), _m("user", u1)], False)
        before_user, user_suffix = _split_once(user_only, u1)
        after_user, assistant_suffix = _split_once(pair[len(before_user + u1) :], a1)
        user_prefix, _ = _split_once(pairs[len(pair) :], u2)
        before_system, after_system = _split_once(with_system, s)
    except Exception:  # a template that raises on a role, or renders a message twice
        return None
    user_turn = user_prefix + u1 + user_suffix
    if not (
        prompted.startswith(user_only)
        and pair.startswith(before_user + u1)
        and pairs.startswith(pair)
        and after_user.startswith(user_suffix)
        and before_user.endswith(user_prefix)
        and after_system.endswith(user_turn)
    ):
        return None
    system_suffix = after_system[: len(after_system) - len(user_turn)]
    head = before_user[: len(before_user) - len(user_prefix)]  # begin + any default system
    # `begin` and the system prefix are told apart by trying the shortest `begin` first.
    for cut in range(len(os.path.commonprefix([head, before_system])) + 1):
        system_prefix, added = before_system[cut:], head[cut:]
        default_system = None
        if added:
            if len(added) < len(system_prefix + system_suffix) or not (
                added.startswith(system_prefix) and added.endswith(system_suffix)
            ):
                continue
            default_system = added[len(system_prefix) : len(added) - len(system_suffix)]
        found = TurnFormat(
            prefix={
                "system": system_prefix,
                "user": user_prefix,
                "assistant": after_user[len(user_suffix) :],
            },
            suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
            generation_prompt=prompted[len(user_only) :],
            begin=head[:cut],
            default_system=default_system,
        )
        if _renders_alike(found.render, render):
            return found
    return None


def _split_once(text: str, marker: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ValueError(f"{marker!r} rendered {text.count(marker)} times")
    before, _, after = text.partition(marker)
    return before, after


# Conversations every use of a format meets: one turn, a history, a system message, contents
# with spaces and lines.
_PROBES: list[tuple[list[Message], bool]] = [
    ([_m("user", "one")], True),
    ([_m("user", "one")], False),
    ([_m("user", "one two"), _m("assistant", "three\nfour")], False),
    ([_m("user", "a"), _m("assistant", "b"), _m("user", "c d")], True),
    ([_m("system", "be brief"), _m("user", "one")], True),
    (
        [
            _m("system", "be\nbrief"),
            _m("user", "a"),
            _m("assistant", "b"),
            _m("user", "c"),
            _m("assistant", "d e"),
        ],
        False,
    ),
]


def _renders_alike(ours: Render, theirs: Render, prompts_only: bool = False) -> bool:
    """Whether both render the probes alike (only those ending in a generation prompt: all
    that Ollama renders)."""
    probes = [(m, g) for m, g in _PROBES if g or not prompts_only]
    try:
        return all(ours(m, g) == theirs(m, g) for m, g in probes)
    except Exception:
        return False


# ---- Ollama ---------------------------------------------------------------------------------


@dataclass
class OllamaFiles:
    """What Ollama reads: `Modelfile` for `ollama create`, and the `template` (Go template),
    `params` (JSON) and `system` files it reads from the root of a Hugging Face GGUF repo for
    `ollama run hf.co/<user>/<repo>:<quant>` (huggingface.co/docs/hub/ollama, "Custom Chat
    Template and Parameters"). `note` says what could not be made, or None."""

    files: dict[str, str]
    note: str | None = None


def ollama_files(
    chat_template: str, eos_token: str, gguf_file_name: str, system: str | None = None
) -> OllamaFiles:
    """The Ollama files for a GGUF whose chat template is `chat_template` (the merged folder's,
    which `write_prompt_format` made the training format's): the template translated to Go,
    the EOS and the turn terminator as stops, no sampling parameter (none was measured).

    A template that is not a linear role-header format gets no TEMPLATE and no stop, so that
    Ollama renders the GGUF's own `tokenizer.chat_template`; `note` says so."""
    if not gguf_file_name or any(c in gguf_file_name for c in '/\\" \n'):
        raise ValueError(f"a GGUF file name without folders, spaces or quotes: {gguf_file_name!r}")
    modelfile = [f"FROM ./{gguf_file_name}"]
    files: dict[str, str] = {}
    note = None
    # Ollama adds the BOS as a token (the GGUF's add_bos_token): the template must not.
    found = turn_format(jinja_render(chat_template, eos_token=eos_token, bos_token=""))
    template = found.go_template() if found else None
    quoted = _modelfile_value(template) if template else None
    if found and template and quoted and _go_renders_as(template, found):
        stops = found.stops(eos_token)
        modelfile.append(f"TEMPLATE {quoted}")
        modelfile += [f"PARAMETER stop {_modelfile_value(stop)}" for stop in stops]
        files["template"] = template
        files["params"] = json.dumps({"stop": stops}, indent=2, ensure_ascii=False) + "\n"
    else:
        note = (
            "the chat template is not a linear role-header format that this export translates "
            "to an Ollama Go template: no TEMPLATE or stop written, so Ollama renders the "
            "GGUF's tokenizer.chat_template (with llama.cpp since Ollama 0.30; older versions "
            "pick the closest template of their own: check `ollama show --template`)"
        )
    if system is not None:
        quoted_system = _modelfile_value(system)
        if quoted_system is None:
            raise UserError(
                f"the system prompt {abbreviated(system)} cannot be quoted in a Modelfile "
                '(it holds \'"""\' or an unprintable character): reword it'
            )
        modelfile.insert(1, f"SYSTEM {quoted_system}")
        files["system"] = system
    files["Modelfile"] = "\n".join(modelfile) + "\n"
    return OllamaFiles(files=files, note=note)


def _go_renders_as(template: str, found: TurnFormat) -> bool:
    """A last check of the translation, by the renderer the consistency check uses."""
    return _renders_alike(ollama_render(template), found.render, prompts_only=True)


def _modelfile_value(text: str) -> str | None:
    """`text` quoted for a Modelfile the way Ollama's parser reads it back unchanged (it
    unquotes "..." and \"\"\"...\"\"\" and processes no escapes, and drops unprintable
    characters); None when it cannot be."""
    if any(not (c.isprintable() or c in "\n\t") for c in text) or '"""' in text:
        return None
    if '"' not in text and "\n" not in text:
        return f'"{text}"'
    return f'"""{text}"""'


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """The (command, value) pairs of a Modelfile, as Ollama's parser reads the forms
    `ollama_files` writes: `PARAMETER name value` becomes (name, value)."""
    commands = []
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, _, value = stripped.partition(" ")
        value = value.lstrip(" \t")
        if name.lower() == "parameter":
            name, _, value = value.partition(" ")
            value = value.lstrip(" \t")
        if value.startswith('"""'):
            while len(value) < 6 or not value.rstrip().endswith('"""'):
                line = next(lines, None)
                if line is None:
                    raise ValueError(f'the Modelfile\'s {name} value has no closing """')
                value += "\n" + line
            value = value.rstrip()[3:-3]
        elif value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        commands.append((name.lower(), value))
    return commands


_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.DOTALL)


def ollama_render(template: str) -> Render:
    """Render an Ollama Go template for a conversation as Ollama does on its `.Messages` path
    (consecutive messages of one role joined by a blank line, `.System` all system messages).

    Covers the constructs `TurnFormat.go_template` and Ollama's own role-header templates use:
    text, `{{ .Field }}`, `if`/`else if`/`else` on a field, `not`, `eq .Field "text"`,
    `range .Messages`, and the `{{-`/`-}}` trims; anything else raises ValueError. Ollama
    renders only prompts: the template's generation prompt comes whatever the flag says."""
    tree = _parse_go(template)

    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        collated: list[Message] = []
        for message in messages:
            if collated and collated[-1]["role"] == message["role"]:
                collated[-1]["content"] += "\n\n" + message["content"]
            else:
                collated.append(dict(message))
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        root = {"System": system, "Messages": collated, "Response": "", "Prompt": ""}
        out: list[str] = []
        _execute(tree, root, root, out)
        return "".join(out)

    return render


def _parse_go(template: str) -> list[Any]:
    """The template as nested nodes: text, ("value", expression), ("if", [(condition, body)],
    else body), ("range", body)."""
    texts, actions = [], []
    position = 0
    for match in _ACTION.finditer(template):
        texts.append(template[position : match.start()])
        actions.append(match)
        position = match.end()
    texts.append(template[position:])
    for index, match in enumerate(actions):  # `{{- ` and ` -}}` trim the text beside them
        if match.group(1):
            texts[index] = texts[index].rstrip(" \t\r\n")
        if match.group(3):
            texts[index + 1] = texts[index + 1].lstrip(" \t\r\n")
    tokens: list[Any] = []
    for text, match in zip(texts, [*actions, None], strict=True):
        if text:
            tokens.append(text)
        if match is not None:
            tokens.append(("action", match.group(2)))
    body, stop = _parse_body(tokens, 0)
    if stop is not None:
        raise ValueError(f"unexpected {{{{ {stop[1]} }}}} in the Ollama template")
    return body


def _parse_body(tokens: list[Any], index: int) -> tuple[list[Any], tuple[int, str] | None]:
    """Nodes until an `end`/`else...` action; returns them and (index after it, its text)."""
    nodes: list[Any] = []
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if isinstance(token, str):
            nodes.append(token)
            continue
        action = token[1]
        if action == "end" or action == "else" or action.startswith("else if "):
            return nodes, (index, action)
        if action.startswith("if "):
            branches, otherwise = [], []
            condition = action[3:]
            while True:
                body, stop = _parse_body(tokens, index)
                if stop is None:
                    raise ValueError("an `if` without `end` in the Ollama template")
                branches.append((_known(condition), body))
                index, closing = stop
                if closing == "end":
                    break
                if closing == "else":
                    otherwise, stop = _parse_body(tokens, index)
                    if stop is None or stop[1] != "end":
                        raise ValueError("an `else` without `end` in the Ollama template")
                    index = stop[0]
                    break
                condition = closing[len("else if ") :]
            nodes.append(("if", branches, otherwise))
        elif action == "range .Messages":
            body, stop = _parse_body(tokens, index)
            if stop is None or stop[1] != "end":
                raise ValueError("a `range` without `end` in the Ollama template")
            index = stop[0]
            nodes.append(("range", body))
        else:
            nodes.append(("value", _known(action)))
    return nodes, None


def _execute(nodes: list[Any], dot: dict[str, Any], root: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "value":
            out.append(str(_evaluate(node[1], dot, root)))
        elif node[0] == "if":
            for condition, body in node[1]:
                if _evaluate(condition, dot, root):
                    _execute(body, dot, root, out)
                    break
            else:
                _execute(node[2], dot, root, out)
        else:  # range .Messages
            for message in root["Messages"]:
                _execute(
                    node[1], {"Role": message["role"], "Content": message["content"]}, root, out
                )


_FIELD = r"\$?\.\w+"
_EXPRESSION = re.compile(rf'\(?(not )?({_FIELD}|eq {_FIELD} "[^"\\]*")\)?')


def _known(expression: str) -> str:
    """`expression` if it is one this renderer evaluates; refused when the template is read,
    not when a conversation happens to reach it."""
    if not _EXPRESSION.fullmatch(expression.strip()):
        raise ValueError(f"{{{{ {expression} }}}} is not a construct this check renders")
    return expression


def _evaluate(expression: str, dot: dict[str, Any], root: dict[str, Any]) -> Any:
    expression = expression.strip()
    if expression.startswith("(") and expression.endswith(")"):
        return _evaluate(expression[1:-1], dot, root)
    if expression.startswith("not "):
        return not _evaluate(expression[4:], dot, root)
    if match := re.fullmatch(r'eq (\S+) "([^"\\]*)"', expression):
        return _evaluate(match.group(1), dot, root) == match.group(2)
    if match := re.fullmatch(r"(\$?)\.(\w+)", expression):
        scope = root if match.group(1) else dot
        if match.group(2) in scope:
            return scope[match.group(2)]
    raise ValueError(f"{{{{ {expression} }}}} is not a construct this check renders")


# ---- The check --------------------------------------------------------------------------------


def conversation(data_format: str, row: dict[str, Any]) -> list[Message]:
    """A training row as the conversation a runtime renders: Alpaca's instruction and output
    (an `input` has no place in a chat message: inference prompts have none), DPO's prompt and
    chosen answer, chat's messages."""
    if data_format == "chat":
        return [_m(m["role"], m["content"]) for m in row["messages"]]
    if data_format == "dpo":
        return [_m("user", row["prompt"]), _m("assistant", row["chosen"])]
    return [_m("user", row["instruction"]), _m("assistant", row["output"] or "")]


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
            prompt = [_m("system", system), *prompt]
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
