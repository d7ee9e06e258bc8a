"""The command line: every subcommand's help, and user errors as one line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_finetune.cli import main

SUBCOMMAND_OPTIONS: dict[str, list[str]] = {
    "run": ["config", "key.path=value", "--overwrite"],
    "train": ["config", "key.path=value", "--overwrite"],
    "validate": ["config", "key.path=value", "--overwrite"],
    "merge": ["--base", "--adapter", "--output", "--dtype", "bfloat16,float16,float32"],
    "verify": ["--base", "--adapter", "--merged", "--prompts", "--format", "--max-new-tokens"],
    "publish": [
        "--folder",
        "--repo-id",
        "--endpoint",
        "--private",
        "--revision",
        "--replace-readme",
    ],
    "hub-server": ["--port", "--storage"],
    "runs": ["folder", "default: outputs"],
    "export": ["config", "--merged", "--format", "--data", "--output", "--gguf-pre-tokenizer"],
    "schema": ["--output", "default: configs/schema.json"],
}


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help text at the terminal width


def run_main(argv: list[str]) -> int:
    """main()'s return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm-finetune ")
    for command in SUBCOMMAND_OPTIONS:
        assert f"\n    {command} " in out, command


@pytest.mark.parametrize("command", list(SUBCOMMAND_OPTIONS))
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llm-finetune {command} ")
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in out, option


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main([]) == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_merge_without_adapter_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    output = tmp_path / "merged"
    code = run_main(
        [
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(adapter),
            "--output",
            str(output),
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"error: {str(adapter)!r} is not a LoRA adapter folder (no adapter_config.json); "
        "pass the folder that `save_pretrained` of a peft model wrote\n"
    )
    assert not output.exists()


def test_merge_rejects_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_main(
        [
            "merge",
            "--base",
            "b",
            "--adapter",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--dtype",
            "int8",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'int8'" in err
    assert not (tmp_path / "out").exists()


def test_validate_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "run_name: t\nmodel:\n  name: m\ndata:\n  datasets:\n    - path: d.jsonl\nlora:\n  rr: 1\n"
    )
    assert run_main(["validate", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: config error: lora.rr: unknown key (check the spelling; "
        "see docs/configuration.md)\n"
    )
    assert run_main(["validate", str(config), "lora={}", "training.max_steps=3"]) == 0
    assert capsys.readouterr().out.startswith(f"{config}: ok (run_name=t, method=sft, ")


def test_bad_override_through_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("run_name: t\nmodel:\n  name: m\ndata:\n  datasets:\n    - path: d.jsonl\n")
    assert run_main(["validate", str(config), "lora.r"]) == 2
    assert capsys.readouterr().err == "error: override 'lora.r' must look like key.path=value\n"


def test_verify_takes_a_memory_cap_accelerate_understands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llm_finetune.cli import build_parser

    argv = ["verify", "--base", "b", "--adapter", "a", "--merged", "m", "--max-memory", "1.5GiB"]
    assert build_parser().parse_args(argv).max_memory == "1.5GiB"
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([*argv[:-1], "12"])
    assert refused.value.code == 2
    assert "'12' is not a memory size such as '24GB'" in capsys.readouterr().err
