"""The YAML schema: shipped configs validate; every bad input is one line naming key and rule."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_finetune.config import Config, load_config
from llm_finetune.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
# configs/<model>/<method>.yaml; configs/accelerate/ holds accelerate's own configs.
CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs").glob("*/*.yaml") if p.parent.name != "accelerate"
)

BASE: dict[str, Any] = {
    "run_name": "t",
    "model": {"name": "builtin:tiny-llama"},
    "data": {"datasets": [{"path": "builtin:number-words"}], "test_size": 0.1},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(tmp_path: Path, changes: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_merge(BASE, changes or {}), sort_keys=False))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_USERNAME", "HF_DATASET_NAMESPACE", "LLMFT_TEST_VAR"):
        monkeypatch.delenv(name, raising=False)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}


# --- shipped configs -------------------------------------------------------------------


def test_configs_are_found() -> None:
    assert {str(p.relative_to(REPO_ROOT / "configs")) for p in CONFIGS} >= {
        "tiny-llama/sft.yaml",
        "llama-3.1-8b/sft.yaml",
        "llama-3.1-8b/dpo.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_USERNAME", "someone")
    config = load_config(path)
    assert isinstance(config, Config)
    assert "${" not in json.dumps(config.model_dump(mode="json"))


def test_tiny_demo_values() -> None:
    config = load_config(REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml")
    assert config.run_name == "tiny-demo"
    assert config.model.name == "builtin:tiny-llama"
    assert [d.path for d in config.data.datasets] == ["builtin:number-words"]
    assert config.method == "sft" and config.data.format == "alpaca"
    assert config.publish.enabled and config.publish.endpoint == "local"
    assert config.output_path == Path("outputs/tiny-demo")


def test_handbook_configs_interpolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_USERNAME", "someone")
    sft = load_config(REPO_ROOT / "configs" / "llama-3.1-8b" / "sft.yaml")
    assert sft.publish.repo_id == "someone/TwinLlama-3.1-8B"
    assert [d.path for d in sft.data.datasets] == [
        "mlabonne/FineTome-Alpaca-100k",
        "mlabonne/llmtwin",
    ]
    assert sft.training.learning_rate == 3e-4
    dpo = load_config(REPO_ROOT / "configs" / "llama-3.1-8b" / "dpo.yaml")
    assert dpo.method == "dpo" and dpo.data.format == "dpo"
    assert dpo.model.name == "someone/TwinLlama-3.1-8B"
    assert dpo.publish.repo_id == "someone/TwinLlama-3.1-8B-DPO"
    monkeypatch.setenv("HF_DATASET_NAMESPACE", "me")
    dpo = load_config(REPO_ROOT / "configs" / "llama-3.1-8b" / "dpo.yaml")
    assert dpo.data.datasets[0].path == "me/llmtwin-dpo"


def test_handbook_config_without_hf_username() -> None:
    message = error_of(REPO_ROOT / "configs" / "llama-3.1-8b" / "sft.yaml")
    assert message == (
        "config error: publish.repo_id: environment variable HF_USERNAME is not set "
        "(export HF_USERNAME=... or write the value into the config)"
    )


# --- bad input: one line, key path, what is allowed ------------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown nested key",
        {"lora": {"rr": 8}},
        "lora.rr: unknown key (check the spelling; see docs/configuration.md)",
    ),
    (
        "unknown top-level key",
        {"learning_rate": 1e-4},
        "learning_rate: unknown key (check the spelling; see docs/configuration.md)",
    ),
    (
        "wrong type int",
        {"lora": {"r": "abc"}},
        "lora.r: Input should be a valid integer, unable to parse string as an integer (got 'abc')",
    ),
    (
        "wrong type bool",
        {"training": {"packing": "maybe"}},
        "training.packing: Input should be a valid boolean, unable to interpret input "
        "(got 'maybe')",
    ),
    (
        "choice",
        {"model": {"dtype": "fp8"}},
        "model.dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32' (got 'fp8')",
    ),
    (
        "negative learning rate",
        {"training": {"learning_rate": -0.001}},
        "training.learning_rate: Input should be greater than 0 (got -0.001)",
    ),
    (
        "dropout 1.0",
        {"lora": {"dropout": 1.0}},
        "lora.dropout: Input should be less than 1 (got 1.0)",
    ),
    (
        "r = 0",
        {"lora": {"r": 0}},
        "lora.r: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "null where a string is needed",
        {"model": {"dtype": "auto", "name": None}},
        "model.name: Input should be a valid string (got None)",
    ),
    (
        "bad run_name",
        {"run_name": "a b"},
        "run_name: String should match pattern '^[\\w.-]+$' (got 'a b')",
    ),
    (
        "dpo with alpaca data",
        {"method": "dpo"},
        "method 'dpo' needs data.format dpo, got 'alpaca'",
    ),
    (
        "sft with dpo data",
        {"data": {"format": "dpo"}},
        "method 'sft' needs data.format alpaca or chat, got 'dpo'",
    ),
    (
        "publish without repo_id",
        {"publish": {"enabled": True}},
        "publish.repo_id is required when publish.enabled is true",
    ),
    (
        "repo_id with two slashes",
        {"publish": {"enabled": True, "repo_id": "a/b/c"}},
        "publish.repo_id must look like 'namespace/name', got 'a/b/c'",
    ),
    (
        "repo_id without namespace",
        {"publish": {"enabled": True, "repo_id": "model"}},
        "publish.repo_id must look like 'namespace/name', got 'model'",
    ),
    (
        "repo_id with a space",
        {"publish": {"enabled": True, "repo_id": "me/my model"}},
        "publish.repo_id must look like 'namespace/name', got 'me/my model'",
    ),
    (
        "endpoint not a URL",
        {"publish": {"endpoint": "localhost:8000"}},
        "publish.endpoint must be 'local' or an http(s):// URL, got 'localhost:8000'",
    ),
    (
        "endpoint wrong scheme",
        {"publish": {"endpoint": "ftp://hub.example"}},
        "publish.endpoint must be 'local' or an http(s):// URL, got 'ftp://hub.example'",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(c, e) for _, c, e in BAD_INPUTS],
    ids=[name for name, _, _ in BAD_INPUTS],
)
def test_bad_input_is_one_line_user_error(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    assert error_of(write_config(tmp_path, changes)) == "config error: " + expected


def test_several_errors_reported_together(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {"lora": {"r": 0, "dropout": 1.0}, "training": {"learning_rate": -1}, "epochs": 3},
    )
    assert error_of(path) == (
        "config error: "
        "lora.r: Input should be greater than or equal to 1 (got 0); "
        "lora.dropout: Input should be less than 1 (got 1.0); "
        "training.learning_rate: Input should be greater than 0 (got -1); "
        "epochs: unknown key (check the spelling; see docs/configuration.md)"
    )


def test_empty_file_names_every_required_key(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert error_of(path) == (
        "config error: run_name: required key is missing; model: required key is missing; "
        "data: required key is missing"
    )


def test_valid_publish_settings(tmp_path: Path) -> None:
    for endpoint in (None, "local", "http://127.0.0.1:8765", "https://hub.example"):
        path = write_config(
            tmp_path, {"publish": {"enabled": True, "repo_id": "me/m.v1_2", "endpoint": endpoint}}
        )
        assert load_config(path).publish.endpoint == endpoint


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config.method == "sft" and config.backend == "auto" and config.overwrite is False
    assert config.lora.r == 16 and config.lora.alpha == 32 and config.lora.dropout == 0.0
    assert config.training.learning_rate == 3e-4
    assert config.merge.dtype == "bfloat16"
    assert config.publish.enabled is False
    assert config.output_path == Path("outputs/t")


# --- ${ENV} interpolation ----------------------------------------------------------------


def test_unset_env_var_names_variable_and_key_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"data": {"datasets": [{"path": "${LLMFT_TEST_VAR}/data"}]}})
    assert error_of(path) == (
        "config error: data.datasets[0].path: environment variable LLMFT_TEST_VAR is not set "
        "(export LLMFT_TEST_VAR=... or write the value into the config)"
    )


def test_env_var_default_used_when_unset(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"model": {"name": "${LLMFT_TEST_VAR:-org}/model"}})
    assert load_config(path).model.name == "org/model"


def test_env_var_default_used_when_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFT_TEST_VAR", "")
    path = write_config(tmp_path, {"model": {"name": "${LLMFT_TEST_VAR:-org}/model"}})
    assert load_config(path).model.name == "org/model"


def test_env_var_value_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFT_TEST_VAR", "me")
    path = write_config(
        tmp_path,
        {
            "model": {"name": "${LLMFT_TEST_VAR:-org}/model"},
            "publish": {"enabled": True, "repo_id": "${LLMFT_TEST_VAR}/${run_name}-merged"},
        },
    )
    config = load_config(path)
    assert config.model.name == "me/model"
    assert config.publish.repo_id == "me/t-merged"


def test_env_var_in_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFT_TEST_VAR", "me")
    config = load_config(write_config(tmp_path), ["model.name=${LLMFT_TEST_VAR}/base"])
    assert config.model.name == "me/base"


# --- overrides ---------------------------------------------------------------------------


def test_override_types(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path),
        [
            "training.learning_rate=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "overwrite=true",
            "training.max_steps=7",
            "publish.commit_message=",
        ],
    )
    assert isinstance(config.training.learning_rate, float)
    assert config.training.learning_rate == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.overwrite is True
    assert config.training.max_steps == 7
    assert config.publish.commit_message == ""


def test_override_replaces_file_value_and_adds_sections(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"lora": {"r": 4, "alpha": 8}})
    config = load_config(path, ["lora.r=32", "merge.dtype=float16", "data.test_size=0.1"])
    assert (config.lora.r, config.lora.alpha) == (32, 8)
    assert config.merge.dtype == "float16"
    assert config.data.test_size == 0.1


def test_override_value_with_equals_sign(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), ["verify.prompts=[a=b]"])
    assert config.verify.prompts == ["a=b"]


@pytest.mark.parametrize("override", ["overwrite", "=true", "lora..r=3", "lora.=3"])
def test_malformed_override_rejected(tmp_path: Path, override: str) -> None:
    assert error_of(write_config(tmp_path), [override]) == (
        f"override {override!r} must look like key.path=value"
    )


def test_override_into_a_value_rejected(tmp_path: Path) -> None:
    assert error_of(write_config(tmp_path), ["run_name.x=1"]) == (
        "override 'run_name.x=1': run_name is not a section"
    )


def test_override_is_validated(tmp_path: Path) -> None:
    assert error_of(write_config(tmp_path), ["lora.rr=3", "training.learning_rate=0"]) == (
        "config error: lora.rr: unknown key (check the spelling; see docs/configuration.md); "
        "training.learning_rate: Input should be greater than 0 (got 0)"
    )


# --- the file itself ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == (
        f"config file {str(path)!r} not found (the configs are under configs/)"
    )


def test_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00\xff\xfe binary")
    assert (
        error_of(path) == f"config file {str(path)!r} is not text (not UTF-8): pass the YAML file"
    )


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("run_name: t\nmodel:\n  name: m\n  dtype: [auto\ndata: {}\n")
    assert error_of(path) == f"config file {str(path)!r} is not valid YAML at line 5"


def test_bad_indentation_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("run_name: t\nmodel:\n  name: m\n   dtype: auto\n")
    assert error_of(path) == f"config file {str(path)!r} is not valid YAML at line 4"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    assert error_of(path) == (
        f"config file {str(path)!r} must hold a mapping of keys at the top level"
    )


# --- no heavy imports, and the real CLI ---------------------------------------------------


def test_load_config_imports_no_heavy_library(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    code = (
        "import sys, json\n"
        "from llm_finetune.config import load_config\n"
        f"load_config({str(path)!r}, ['training.learning_rate=1e-4'])\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'trl')"
        " if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _cli_validate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_finetune.cli", "validate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("changes", "overrides", "expected"),
    [
        (
            {"lora": {"rr": 8}},
            [],
            "error: config error: lora.rr: unknown key (check the spelling; "
            "see docs/configuration.md)",
        ),
        (
            {},
            ["training.learning_rate=0"],
            "error: config error: training.learning_rate: Input should be greater than 0 (got 0)",
        ),
        (
            {"publish": {"enabled": True}},
            [],
            "error: config error: publish.repo_id is required when publish.enabled is true",
        ),
    ],
    ids=["unknown-key", "override", "publish"],
)
def test_cli_validate_reports_one_line(
    tmp_path: Path, changes: dict[str, Any], overrides: list[str], expected: str
) -> None:
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    path = write_config(config_dir, changes)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = _cli_validate(workdir, str(path.resolve()), *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""
    assert list(workdir.iterdir()) == []


def test_cli_validate_ok_writes_nothing(tmp_path: Path) -> None:
    config = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"
    result = _cli_validate(tmp_path, str(config), "training.max_steps=5", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{config}: ok (run_name=tiny-demo, method=sft, backend=auto, "
        "output_dir=outputs/tiny-demo)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_override_values_that_are_not_yaml_stay_strings(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    config = load_config(
        path,
        ["publish.commit_message=fix: typo", "model.revision=20240101", "run_name=a1"],
    )
    assert config.publish.commit_message == "fix: typo"
    assert config.model.revision == "20240101"


def test_a_section_left_empty_means_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    text = path.read_text() + "\nlora:\n"
    path.write_text(text)
    config = load_config(path, ["lora.r=4"])
    assert config.lora.r == 4 and config.lora.alpha == 32
