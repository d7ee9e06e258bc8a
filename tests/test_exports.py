"""The export stage: formats asked for, written, checked, rejected, reused and published."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm_finetune.errors import UserError
from tests.conftest import REPO_ROOT, tiny_config

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_finetune.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- the config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("export.formats=[q4_km]", "unknown format 'q4_km'; valid: lora, merged_16bit"),
        ("export.formats=[q4_k_m,q4_k_m]", "lists a format twice"),
        ("export.limits={q6_k: {kl: 0.1}}", "'q6_k' is not in export.formats"),
        ("export.gguf_repo_id=nonamespace", "export.gguf_repo_id must look like"),
    ],
)
def test_a_bad_export_section_is_one_line_before_anything_loads(tmp_path, override, said):
    done = cli("validate", str(DEMO), override, cwd=tmp_path)
    assert done.returncode == 2
    assert said in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_16bit_merge_is_always_in_the_table_and_repos_follow_the_model_repo(tmp_path):
    from llm_finetune.config import load_config

    config = load_config(DEMO, ["export.formats=[q4_k_m,merged_4bit]"])
    assert config.export.formats == ["merged_16bit", "q4_k_m", "merged_4bit"]
    assert config.export_repos() == {
        "gguf": "demo/tiny-llama-number-words-GGUF",
        "merged_4bit": "demo/tiny-llama-number-words-bnb-4bit",
    }
    mine = load_config(DEMO, ["export.formats=[fp32]", "export.fp32_repo_id=me/full"])
    assert mine.export_repos() == {"fp32": "me/full"}
    assert load_config(DEMO, ["publish.enabled=false"]).export_repos() == {}


def test_limits_from_the_config_replace_only_what_they_name():
    from llm_finetune.config import load_config
    from llm_finetune.exports.formats import DEFAULT_LIMITS
    from llm_finetune.exports.stage import limits_for

    config = load_config(DEMO, ["export.limits={q4_k_m: {kl: 0.5}}"])
    limits = limits_for("q4_k_m", config.export)
    assert limits.kl == 0.5 and limits.top1 == DEFAULT_LIMITS["q4_k_m"].top1
    assert limits_for("q8_0", config.export) == DEFAULT_LIMITS["q8_0"]


# --- the set-up a config needs, asked before training ---------------------------------


def test_a_missing_toolchain_is_named_in_the_preflight_before_training(tmp_path, monkeypatch):
    from llm_finetune.exports import gguf
    from llm_finetune.pipeline import run

    said = "GGUF exports need llama-cpp-python ...: run `make setup-gguf`"
    monkeypatch.setattr(gguf, "toolchain_problem", lambda: said)
    config = tiny_config(tmp_path, export={"formats": ["q4_k_m"]})
    with pytest.raises(UserError, match="run `make setup-gguf`"):
        run(config)
    assert not (tmp_path / "out" / "adapter").exists()


def test_the_makefile_is_told_which_setup_targets_a_config_needs(tmp_path, monkeypatch):
    from llm_finetune.config import load_config
    from llm_finetune.exports import gguf, safetensors_exports
    from llm_finetune.exports.stage import setup_targets

    config = load_config(DEMO, ["export.formats=[q8_0,merged_4bit]"])
    assert setup_targets(config) == []  # this machine has both
    monkeypatch.setattr(gguf, "toolchain_problem", lambda: "missing")
    monkeypatch.setattr(safetensors_exports, "bitsandbytes_problem", lambda: "missing")
    assert setup_targets(config) == ["setup-gguf", "setup-export"]
    assert setup_targets(load_config(DEMO, ["export.formats=[lora]"])) == []
    module = subprocess.run(
        [sys.executable, "-m", "llm_finetune.exports", str(DEMO), "export.formats=[bogus]"],
        capture_output=True,
        text=True,
    )
    assert module.returncode == 2 and "unknown format 'bogus'" in module.stderr


# --- writing, checking, rejecting, reusing ----------------------------------------------


@pytest.fixture(scope="module")
def finished_run(trained_adapter, tmp_path_factory):
    """A run's outputs as the pipeline leaves them before the export stage: adapter, merged."""
    from llm_finetune.exports.prompt_format import write_prompt_format
    from llm_finetune.merge import merge

    config, base, adapter, _ = trained_adapter
    out = tmp_path_factory.mktemp("run")
    shutil.copytree(adapter, out / "adapter")
    merge(base, out / "adapter", out / "merged", dtype="bfloat16")
    write_prompt_format(out / "merged", "alpaca")
    return base, out


def _export(config, base: str, out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from llm_finetune.base_model import BaseModel
    from llm_finetune.exports.stage import export_all

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    return export_all(config, BaseModel(base, base), out / "merged", out, tokenizer)


def _config(tmp_path: Path, out: Path, **export):
    config = tiny_config(
        tmp_path,
        export={"check_rows": 6, "gguf_pre_tokenizer": "qwen2", **export},
        verify={"prompts": ["Write the number 47 in words."], "max_new_tokens": 6},
    )
    config.output_dir = str(out)
    return config


@pytest.mark.slow
def test_every_format_is_written_checked_and_sealed(finished_run, tmp_path):
    base, out = finished_run
    config = _config(tmp_path, out, formats=["lora", "fp32", "q8_0", "q4_k_m"])
    rows = {row["format"]: row for row in _export(config, base, out)}
    assert list(rows) == ["merged_16bit", "lora", "fp32", "q8_0", "q4_k_m"]
    assert all(row["passed"] for row in rows.values()), rows
    assert rows["merged_16bit"]["measured"]["kl"] == 0
    assert rows["q4_k_m"]["measured"]["kl"] > rows["q8_0"]["measured"]["kl"] > 0
    assert rows["q4_k_m"]["bytes"] < rows["q8_0"]["bytes"] < rows["merged_16bit"]["bytes"]
    gguf = out / "exports" / "gguf"
    assert sorted(p.name for p in gguf.glob("*.gguf")) == ["test-Q4_K_M.gguf", "test-Q8_0.gguf"]
    assert "FROM ./test-Q4_K_M.gguf" in (gguf / "Modelfile").read_text()
    assert json.loads((gguf / "params").read_text())["stop"] == ["</s>"]
    from llm_finetune.manifest import check_manifest

    check_manifest(gguf)  # sealed: publish sends exactly the checked files
    check_manifest(out / "exports" / "fp32")
    assert not (gguf / "test-BF16.gguf").exists()  # the quantizer's source is not kept


def test_an_export_beyond_its_limits_is_rejected_and_kept_out_of_the_repo_folder(
    finished_run, tmp_path
):
    base, out = finished_run
    strict = {"q4_k_m": {"kl": 1e-9}}  # no 4-bit quantization is this close
    config = _config(tmp_path, out, formats=["q8_0", "q4_k_m"], limits=strict)
    rows = {row["format"]: row for row in _export(config, base, out)}
    assert rows["q8_0"]["passed"]
    assert not rows["q4_k_m"]["passed"]
    assert rows["q4_k_m"]["problems"][0].startswith("KL ")
    assert rows["q4_k_m"]["problems"][0].endswith("> limit 1e-09")
    assert rows["q4_k_m"]["files"] == ["exports/rejected/test-Q4_K_M.gguf"]
    assert not (out / "exports" / "gguf" / "test-Q4_K_M.gguf").exists()
    assert (out / "exports" / "rejected" / "test-Q4_K_M.gguf").is_file()


def test_the_same_exports_are_reused_and_others_start_from_an_empty_folder(
    finished_run, tmp_path, monkeypatch
):
    from llm_finetune.exports import gguf

    base, out = finished_run
    config = _config(tmp_path, out, formats=["q8_0"])
    first = _export(config, base, out)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert", no_conversion)
    assert _export(config, base, out) == first
    monkeypatch.undo()
    other = _config(tmp_path, out, formats=["q4_0"])
    assert [r["format"] for r in _export(other, base, out)] == ["merged_16bit", "q4_0"]
    assert [p.name for p in (out / "exports" / "gguf").glob("*.gguf")] == ["test-Q4_0.gguf"]


def test_a_wrong_pre_tokenizer_is_caught_by_the_tokenizer_comparison(finished_run, tmp_path):
    base, out = finished_run
    config = _config(tmp_path, out, formats=["f16"], gguf_pre_tokenizer="gpt-2")
    (row,) = [r for r in _export(config, base, out) if r["format"] == "f16"]
    assert not row["passed"]
    assert any("llama.cpp tokenizes the training text otherwise" in p for p in row["problems"])


# --- the standalone command ------------------------------------------------------------


def test_export_of_any_merged_folder(finished_run, tmp_path):
    _, out = finished_run
    done = cli(
        "export",
        "--merged",
        str(out / "merged"),
        "--format",
        "q8_0",
        "--data",
        "builtin:number-words",
        "--gguf-pre-tokenizer",
        "qwen2",
        "--output",
        str(tmp_path / "standalone"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GGUF Q8_0" in done.stdout and "passed" in done.stdout
    assert (tmp_path / "standalone" / "exports" / "gguf" / "merged-Q8_0.gguf").is_file()


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["--format", "lora", "--data", "d.jsonl", "--output", "o"], "lora are made from"),
        (["--format", "q8_0"], "needs --format (repeatable), --data and --output"),
        (["--format", "q9", "--data", "d.jsonl", "--output", "o"], "unknown format 'q9'"),
    ],
)
def test_export_refusals_are_one_line(finished_run, tmp_path, arguments, said):
    _, out = finished_run
    done = cli("export", "--merged", str(out / "merged"), *arguments, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_export_of_a_run_that_has_no_merge_yet(tmp_path):
    done = cli("export", str(DEMO), f"output_dir={tmp_path / 'none'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "holds no merged model: run `llm-finetune run" in done.stderr


def test_a_damaged_gguf_is_refused_before_publishing(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "m-Q4_K_M.gguf").write_bytes(b"<html>proxy error</html>")
    done = cli("publish", "--folder", str(folder), "--repo-id", "me/m-GGUF", cwd=tmp_path)
    assert done.returncode == 2
    assert "m-Q4_K_M.gguf is not a GGUF file (damaged or truncated)" in done.stderr


def test_an_architecture_the_converter_does_not_know_is_refused_before_training(
    tmp_path, monkeypatch
):
    from llm_finetune.exports import gguf
    from llm_finetune.pipeline import run

    assert gguf.architecture_problem(["LlamaForCausalLM"]) is None
    monkeypatch.setattr(gguf, "supported_architectures", lambda: {"MistralForCausalLM"})
    config = tiny_config(tmp_path, export={"formats": ["q4_k_m"]})
    with pytest.raises(UserError, match=r"does not support the model's architecture \(Llama"):
        run(config)
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_failed_conversion_rejects_the_gguf_rows_and_keeps_the_rest(
    finished_run, tmp_path, monkeypatch
):
    from llm_finetune.exports import gguf
    from llm_finetune.exports.formats import table

    def converter_fails(*args, **kwargs):
        raise UserError("merged: llama.cpp's converter failed: KeyError: 'rope_theta'")

    monkeypatch.setattr(gguf, "convert", converter_fails)
    base, out = finished_run
    rows = _export(_config(tmp_path, out, formats=["lora", "q8_0", "q4_k_m"]), base, out)
    verdicts = {r["format"]: r["passed"] for r in rows}
    assert verdicts == {"merged_16bit": True, "lora": True, "q8_0": False, "q4_k_m": False}
    assert rows[-1]["problems"] == ["merged: llama.cpp's converter failed: KeyError: 'rope_theta'"]
    assert table(rows)[-1][1:7] == ["-", "0.00 MB", "-", "-", "-", "-"]
