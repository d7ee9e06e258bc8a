"""The README, the pages under docs/, the configs' header comments and the CLI's examples
stay true: every command in them parses with the real CLI and names configs that exist and
validate, every `make` line is a real target (`make -n`, which prints and runs nothing), every
shipped config validates, every config key has a row in docs/configuration.md and every key
a page names is a real one, and every link between the pages leads somewhere. Commands nobody
runs drift (the alignment-handbook's README did); these tests run them, without loading any
model.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from llm_finetune import cli
from llm_finetune.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
DOC_PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = {"README.md": README} | {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in DOC_PAGES}
REFERENCE = PAGES["docs/configuration.md"]
CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*/*.yaml"))
# configs/<model>/<method>.yaml; configs/accelerate/ holds accelerate's own configs.
CONFIGS = [p for p in CONFIG_FILES if p.parent.name != "accelerate"]

# The placeholders the docs write, and what a reader would put there. A config placeholder
# becomes the config it stands for.
PLACEHOLDERS = {
    "configs/mine.yaml": "configs/llama-3.1-8b/sft.yaml",  # README: `cp` of that one
    "...": "configs/llama-3.1-8b/sft.yaml",  # README, scaling out: `CONFIG=...`
    "CONFIG": "configs/tiny-llama/sft.yaml",
    "key=value": "training.max_steps=20",
    "B": "meta-llama/Llama-3.1-8B",
    "A": "outputs/x/adapter",
    "O": "outputs/x/merged",
    "M": "outputs/x/merged",
    "FILE": "prompts.txt",
    "R": "main",
    "URL": "http://127.0.0.1:8765",
    "N": "8765",
    "DIR": "outputs/hub",
}


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# --- where the commands are written --------------------------------------------------------


def _fenced_lines(markdown: str) -> list[str]:
    """The lines of the fenced code blocks, a line ending in a backslash joined to the next."""
    lines: list[str] = []
    in_block = continued = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            if continued:
                lines[-1] = lines[-1][:-1] + " " + line
            else:
                lines.append(line)
            continued = line.endswith("\\")
    return lines


def _inline_commands(markdown: str) -> list[str]:
    """Inline code a reader pastes (`.venv/bin/...`, `make ...`) and the first column of the
    README's command table (`llm-finetune merge --base B ...`, placeholders filled in later)."""
    outside_blocks = re.sub(r"^\s*```.*?^\s*```", "", markdown, flags=re.S | re.M)
    commands = []
    for line in outside_blocks.splitlines():
        spans = re.findall(r"`([^`]+)`", line)
        if line.startswith("| `llm-finetune "):  # `[--option X]` and `[key=value ...]`
            commands.append(re.sub(r"[\[\]]| \.\.\.", "", spans[0]))
        commands += [s for s in spans if s.startswith((".venv/bin/", "make "))]
    return commands


def _header_commands(path: Path) -> list[str]:
    """The commands of a config's opening comment: lines `# [Label:] make|llm-finetune ...`."""
    commands = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        found = re.match(r"#\s*(?:[A-Za-z][^:`]*:\s+)?((?:make|llm-finetune) .*)", line)
        if found:
            commands.append(found.group(1))
    return commands


def _commands(texts: list[str]) -> list[list[str]]:
    """Each `make` or `llm-finetune` command as argv, `a && b` split, comments dropped."""
    found = []
    for text in texts:
        for part in re.split(r"\s(?:&&|\|\||;)\s", text):
            argv = shlex.split(part, comments=True)
            if argv and (argv[0] == "make" or argv[0].endswith("llm-finetune")):
                found.append(argv)
    return found


_SOURCES = [
    *((name, _fenced_lines(text) + _inline_commands(text)) for name, text in PAGES.items()),
    ("llm_finetune/cli.py", cli.__doc__.split("Examples:", 1)[1].splitlines()),  # and --help
] + [(_relative(p), _header_commands(p)) for p in CONFIG_FILES]
DOCUMENTED = [  # each command once per source
    (source, list(argv))
    for source, texts in _SOURCES
    for argv in dict.fromkeys(tuple(argv) for argv in _commands(texts))
]
CLI_COMMANDS = [(source, argv) for source, argv in DOCUMENTED if argv[0] != "make"]
MAKE_COMMANDS = [(source, argv) for source, argv in DOCUMENTED if argv[0] == "make"]


def _id(case: tuple[str, list[str]]) -> str:
    return f"{case[0]}: {shlex.join(case[1])}"


# --- what a command must satisfy -----------------------------------------------------------


def _fill(argv: list[str]) -> list[str]:
    """Placeholders replaced: whole words, and the values of `VAR=value` words."""
    filled = []
    for word in argv:
        name, equals, value = word.partition("=")
        if word in PLACEHOLDERS:
            word = PLACEHOLDERS[word]
        elif equals and value in PLACEHOLDERS:
            word = f"{name}={PLACEHOLDERS[value]}"
        filled.append(word)
    return filled


def _check_cli(args: list[str]) -> None:
    """The real parser takes `args`; a config it names exists and, with the command's
    overrides, passes `llm-finetune validate` (run for real: that is the command for validate
    lines, and the check for run and train)."""
    try:
        parsed = cli.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"llm-finetune {shlex.join(args)}: refused by the parser (its error above)")
    if getattr(parsed, "config", None):  # `export --merged DIR` names no config
        assert (REPO_ROOT / parsed.config).is_file(), f"{parsed.config} does not exist"
        assert cli.main(["validate", *args[1:]]) == 0, f"llm-finetune {shlex.join(args)}"


def _cli_args_in(recipe_line: str) -> list[str] | None:
    """The CLI arguments of a recipe line `make -n` printed, if it calls the CLI."""
    if "llm-finetune" not in recipe_line and "llm_finetune.cli" not in recipe_line:
        return None
    words = shlex.split(recipe_line)
    for i, word in enumerate(words):
        if word.endswith("llm-finetune"):
            return words[i + 1 :]
        if words[i : i + 2] == ["-m", "llm_finetune.cli"]:
            return words[i + 2 :]
    return None


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documented commands are run from the repository root, with the README's exports."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("HF_USERNAME", "you")
    monkeypatch.delenv("HF_DATASET_NAMESPACE", raising=False)


def test_the_docs_hold_the_commands_checked_here() -> None:
    readme = [argv for source, argv in DOCUMENTED if source == "README.md"]
    assert ["make", "finetune-and-publish"] in readme
    assert ["make", "test"] in readme
    assert any(argv[1:2] == ["validate"] for argv in readme)
    # The pages that show commands have theirs checked (the others describe, in prose).
    for page in ("docs/scaling-out.md", "docs/development.md", "docs/exports.md"):
        assert any(source == page for source, _ in DOCUMENTED), page
    for path in CONFIGS:
        assert any(source == _relative(path) for source, _ in DOCUMENTED), path


@pytest.mark.parametrize("case", CLI_COMMANDS, ids=_id)
def test_documented_llm_finetune_command(case: tuple[str, list[str]]) -> None:
    _, argv = case
    _check_cli(_fill(argv[1:]))


@pytest.mark.parametrize("case", MAKE_COMMANDS, ids=_id)
def test_documented_make_command(case: tuple[str, list[str]]) -> None:
    """`make -n` prints the recipe; the CLI commands in it are checked like documented ones."""
    _, argv = case
    args = _fill(argv[1:])
    for word in args:
        name, _, value = word.partition("=")
        if name.endswith("CONFIG"):  # CONFIG, ACCELERATE_CONFIG
            assert (REPO_ROOT / value).is_file(), f"{word}: no such file"
    result = subprocess.run(
        ["make", "-n", *args],
        cwd=REPO_ROOT,
        env={"PATH": os.environ["PATH"]},  # no CONFIG=... of the caller's shell
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    called = [cli for line in result.stdout.splitlines() if (cli := _cli_args_in(line))]
    if {"finetune-and-publish", "train"} & set(args):
        assert called, result.stdout
    for cli_args in called:
        _check_cli(cli_args)


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_header_gives_run_validate_and_override(path: Path) -> None:
    """Each config opens with the command that runs it, the one that validates it, and an
    override example, all naming the config itself."""
    config = _relative(path)
    commands = _commands(_header_commands(path))
    runs = [
        argv
        for argv in commands
        if argv[:3] == ["llm-finetune", "run", config]
        or (argv[:2] == ["make", "finetune-and-publish"] and f"CONFIG={config}" in argv)
    ]
    assert runs, f"{config}: no `make finetune-and-publish CONFIG=` or `llm-finetune run` line"
    assert ["llm-finetune", "validate", config] in commands
    assert any("training.max_steps=" in shlex.join(argv) for argv in runs)


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_shipped_config_passes_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", _relative(path)]) == 0, capsys.readouterr().err


# --- the config reference ------------------------------------------------------------------


def _config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of the schema (`training.save_steps`; `data.datasets[].path` for the
    fields of a list's items)."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        item = get_args(annotation)[0] if get_origin(annotation) is list else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _config_keys(annotation, f"{prefix}{name}.")
        elif isinstance(item, type) and issubclass(item, BaseModel):
            keys += _config_keys(item, f"{prefix}{name}[].")
        else:
            keys.append(prefix + name)
    return keys


def _key_rows(markdown: str, heading: str) -> dict[str, str]:
    """The key table under `heading`: each key of a row's first column, with the row.

    A row may name several keys of one section (`training.optim`, `weight_decay`): a bare
    name takes the section of the first.
    """
    section = markdown.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        prefix = names[0].rpartition(".")[0]
        for name in names:
            rows[name if "." in name or not prefix else f"{prefix}.{name}"] = row
    return rows


def _reference_rows() -> dict[str, str]:
    return _key_rows(REFERENCE, "## Every key")


def test_every_config_key_is_in_the_reference_table() -> None:
    rows = _reference_rows()
    missing = []
    for key in _config_keys(Config):
        listed, _, field = key.partition("[].")
        # A list's item fields are described in its row: `data.datasets[]` ... `path` ...
        if not (key in rows or (field and f"`{field}`" in rows.get(f"{listed}[]", ""))):
            missing.append(key)
    assert missing == []


@pytest.mark.parametrize(
    ("page", "heading"),
    [("docs/configuration.md", "## Every key"), ("README.md", "## Config keys in brief")],
)
def test_key_tables_name_only_config_keys(page: str, heading: str) -> None:
    keys = _config_keys(Config)
    stale = [
        name
        for name in _key_rows(PAGES[page], heading)
        if not any(key == name or key.startswith(f"{name}.") for key in keys)
    ]
    assert stale == []


# --- the links between the pages -----------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    outside_blocks = re.sub(r"^\s*```.*?^\s*```", "", markdown, flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", outside_blocks, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_links_lead_to_a_page_and_heading_that_exist(page: str) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", PAGES[page]):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        missing = linked not in PAGES and not (REPO_ROOT / linked).exists()
        if missing or (anchor and linked in PAGES and anchor not in _anchors(PAGES[linked])):
            broken.append(target)
    assert broken == []


def test_the_readme_leads_to_every_page() -> None:
    unlinked = [p.name for p in DOC_PAGES if f"](docs/{p.name})" not in README]
    assert unlinked == []
