"""A linear chat format (`TurnFormat`): the Jinja and Go templates made from one, and reading
one off a Jinja template.

Ollama's template and llama.cpp's are two languages (Go templates, Jinja): both are generated
from one `TurnFormat`, a linear description (each message is prefix + content + suffix of its
role), read off the Jinja template by rendering it, and only used when it renders every probe
conversation exactly as the template does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Message = dict[str, str]
Render = Callable[[Sequence[Message], bool], str]  # (messages, add_generation_prompt) -> text

ROLES = ("system", "user", "assistant")


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


def chat_message(role: str, content: str) -> Message:
    """One message as chat templates take it."""
    return {"role": role, "content": content}


def turn_format(render: Render) -> TurnFormat | None:
    """The linear format `render` follows, read off renderings of probe conversations; None
    when it follows none (a template that rewrites earlier turns, folds the system message
    into the first user turn, refuses a role...)."""
    s, u1, a1, u2, a2 = "Sq1", "Uq1", "Aq1", "Uq2", "Aq2"
    try:
        user_only = render([chat_message("user", u1)], False)
        prompted = render([chat_message("user", u1)], True)
        pair = render([chat_message("user", u1), chat_message("assistant", a1)], False)
        pairs = render(
            [
                chat_message("user", u1),
                chat_message("assistant", a1),
                chat_message("user", u2),
                chat_message("assistant", a2),
            ],
            False,
        )
        with_system = render([chat_message("system", s), chat_message("user", u1)], False)
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
        if renders_alike(found.render, render):
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
    ([chat_message("user", "one")], True),
    ([chat_message("user", "one")], False),
    ([chat_message("user", "one two"), chat_message("assistant", "three\nfour")], False),
    (
        [chat_message("user", "a"), chat_message("assistant", "b"), chat_message("user", "c d")],
        True,
    ),
    ([chat_message("system", "be brief"), chat_message("user", "one")], True),
    (
        [
            chat_message("system", "be\nbrief"),
            chat_message("user", "a"),
            chat_message("assistant", "b"),
            chat_message("user", "c"),
            chat_message("assistant", "d e"),
        ],
        False,
    ),
]


def renders_alike(ours: Render, theirs: Render, prompts_only: bool = False) -> bool:
    """Whether both render the probes alike (only those ending in a generation prompt: all
    that Ollama renders)."""
    probes = [(m, g) for m, g in _PROBES if g or not prompts_only]
    try:
        return all(ours(m, g) == theirs(m, g) for m, g in probes)
    except Exception:
        return False
