"""configs/schema.json, the JSON schema editors complete and check the configs with: the
committed file is the one the models generate, every shipped config points to it on its first
line and is valid under it, and `llm-finetune schema` fails in one line. Nothing heavy loads."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_finetune.cli import main
from llm_finetune.config import load_config
from llm_finetune.errors import UserError
from llm_finetune.schema import HEADER, SCHEMA_PATH, config_schema, schema_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO_ROOT / SCHEMA_PATH
# configs/<model>/<method>.yaml; configs/accelerate/ holds accelerate's own configs.
CONFIGS = [
    p for p in sorted((REPO_ROOT / "configs").glob("*/*.yaml")) if p.parent.name != "accelerate"
]


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _document(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A property's schema with its `$ref` (also one inside `anyOf`) followed."""
    for option in [node, *node.get("anyOf", [])]:
        if "$ref" in option:
            return schema["$defs"][option["$ref"].rsplit("/", 1)[1]]
    return node


def _unknown_keys(
    top: dict[str, Any], schema: dict[str, Any], data: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Keys of `data` (top level and sections, list items included) the schema does not list."""
    unknown = []
    for key, value in data.items():
        properties = schema.get("properties", {})
        if key not in properties:
            unknown.append(prefix + key)
            continue
        node = properties[key]
        section = _resolve(top, node)
        items = _resolve(top, node.get("items", {}))
        if isinstance(value, dict) and "properties" in section:
            unknown += _unknown_keys(top, section, value, f"{prefix}{key}.")
        elif isinstance(value, list) and "properties" in items:
            for i, item in enumerate(value):
                unknown += _unknown_keys(top, items, item, f"{prefix}{key}[{i}].")
    return unknown


def test_committed_schema_is_the_generated_one() -> None:
    committed = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.is_file() else ""
    assert committed == schema_text(), (
        f"{SCHEMA_PATH} is stale: run `llm-finetune schema` and commit the file"
    )


def test_schema_is_what_an_editor_needs() -> None:
    schema = config_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    models = [schema, *schema["$defs"].values()]
    # extra="forbid" on every model: a misspelt key is underlined.
    assert all(model.get("additionalProperties") is False for model in models)
    training = schema["$defs"]["TrainingConfig"]["properties"]
    assert training["learning_rate"]["default"] == 3e-4
    assert training["report_to"]["default"] == ["tensorboard"]  # a default_factory's
    assert "description" in training["save_steps"]  # the field's docstring
    assert "q4_k_m" in schema["$defs"]["ExportConfig"]["properties"]["formats"]["items"]["enum"]
    assert schema_text().endswith("}\n") and schema_text() == schema_text()


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_starts_with_the_schema_line(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == HEADER, f"{_relative(path)}: the first line must be {HEADER!r}"
    target = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first).group(1)
    assert (path.parent / target).resolve() == SCHEMA_FILE.resolve()


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_keys_are_in_the_schema(path: Path) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert _unknown_keys(schema, schema, _document(path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_is_valid_under_the_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator(schema).iter_errors(_document(path))]
    assert errors == []


def _tiny() -> dict[str, Any]:
    return _document(REPO_ROOT / "configs/tiny-llama/sft.yaml")


def _changed(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_tiny())
    *sections, key = path.split(".")
    node = data
    for section in sections:
        node = node[section]
    node[key] = value
    return data


@pytest.mark.parametrize(
    ("data", "valid"),
    [
        (_changed("lora", None), True),  # a section whose keys are all commented out
        (_changed("training.report_to", "wandb"), True),  # one tracker
        (_changed("training.report_to", ["tensorboard", "wandb"]), True),
        (_changed("export.limits", {"q4_k_m": {"kl": 0.2}}), True),
        (_changed("training.learning_rte", 1e-4), False),  # misspelt key
        (_changed("training.max_steps", "many"), False),  # wrong type
        (_changed("lora.dropout", 1.5), False),  # out of bounds
        (_changed("data.format", "sharegpt"), False),  # not an enum value
        (_changed("export.formats", ["q4_k_n"]), False),  # not a format
        (_changed("data", None), False),  # a required section
    ],
    ids=lambda case: json.dumps(case)[:60] if not isinstance(case, bool) else str(case),
)
def test_schema_agrees_with_the_loader(
    data: dict[str, Any], valid: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the schema can tell, it says what `llm-finetune validate` says."""
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.chdir(REPO_ROOT)
    schema = config_schema()
    assert jsonschema.validators.validator_for(schema)(schema).is_valid(data) is valid
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    if valid:
        load_config(path)
    else:
        with pytest.raises(UserError):
            load_config(path)


def test_schema_command_writes_the_file_and_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "schema.json"
    assert main(["schema", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == schema_text()
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temporary left
    capsys.readouterr()
    assert main(["schema", "--output", "-"]) == 0
    assert capsys.readouterr().out == schema_text()


@pytest.mark.parametrize("where", ["missing/schema.json", "a-file/schema.json", "."])
def test_schema_command_unwritable_output_is_one_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    assert main(["schema", "--output", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1, err
    assert "Traceback" not in err
