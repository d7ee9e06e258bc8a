"""The Ollama files for a GGUF (Modelfile, template, params, system), and the renderer of
Ollama's Go templates that checks them.

The template is the merged folder's chat template translated to Go through its `TurnFormat`;
`ollama_render` renders a Go template as Ollama does, for the translation's own check and
for the consistency check of what ships.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_finetune.errors import UserError, abbreviated
from llm_finetune.exports.turn_format import (
    Message,
    Render,
    TurnFormat,
    jinja_render,
    renders_alike,
    turn_format,
)

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
    return renders_alike(ollama_render(template), found.render, prompts_only=True)


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
