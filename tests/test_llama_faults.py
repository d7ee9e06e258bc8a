"""llama.cpp dying in every way it can (through the child's test hook, on real GGUF files):
each death is one line naming the signal and the file, that format is rejected, and the run
goes on. The preflight's self-test refuses a broken toolchain before training."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from llm_finetune.errors import UserError
from llm_finetune.exports import gguf, gguf_selftest
from llm_finetune.exports.llama_child import FAULT_ENV, TIMEOUT_ENV, LlamaCppFailed
from tests.conftest import tiny_config
from tests.test_pipeline import DEMO, cli

pytestmark = pytest.mark.skipif(
    gguf.toolchain_problem() is not None, reason=str(gguf.toolchain_problem())
)

DEATHS = {
    "segv": r"llama\.cpp crashed \(SIGSEGV\)",
    "abort": r"llama\.cpp crashed \(SIGABRT: terminate called after throwing an instance of "
    r"'std::out_of_range'\)",
    "kill": r"llama\.cpp was killed \(SIGKILL: out of memory\?\)",
    "hang": r"llama\.cpp gave no answer in 3 s",
}
VERBS = {"load": "loading", "tokenize": "tokenizing with", "eval": "running"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, list[int]]:
    """The self-test's one-layer model as an f32 GGUF, and the ids of its text."""
    work = tmp_path_factory.mktemp("faults")
    folder, ids, _ = gguf_selftest._tiny_model(work / "model")
    file = work / "tiny-F32.gguf"
    gguf.convert(folder, file, "f32", pre_tokenizer="qwen2")
    return file, ids


@pytest.mark.parametrize("op", list(VERBS))
@pytest.mark.parametrize("kind", list(DEATHS))
def test_each_death_of_llama_cpp_is_one_line_naming_it_and_the_file(
    tiny_gguf, monkeypatch, kind, op
):
    file, ids = tiny_gguf
    monkeypatch.setenv(FAULT_ENV, f"{kind}:{op}")
    monkeypatch.setenv(TIMEOUT_ENV, "3")
    started = time.monotonic()
    with pytest.raises(LlamaCppFailed) as failed:
        runner = gguf.LlamaCppRunner(file, n_ctx=64)
        try:
            runner.tokenize("forty-seven") if op == "tokenize" else runner.logits(ids)
        finally:
            runner.close()
    message = str(failed.value)
    assert "\n" not in message
    assert re.fullmatch(f"{DEATHS[kind]} {VERBS[op]} tiny-F32\\.gguf.*", message), message
    assert time.monotonic() - started < 30  # a hang is stopped at its timeout, not waited out


def test_the_child_is_reused_for_a_files_checks_and_answers_after_a_refusal(tiny_gguf):
    file, ids = tiny_gguf
    runner = gguf.LlamaCppRunner(file, n_ctx=64)
    try:
        pid = runner._child._process.pid
        assert runner.tokenize("forty-seven")[:1] == ids[:1]
        first = runner.logits(ids)
        assert (runner.logits(ids) == first).all()  # greedy and fixed threads: the same
        assert runner._child._process.pid == pid
    finally:
        runner.close()
    assert runner._child._process.poll() == 0  # closed politely
    runner.close()  # twice is fine


def test_a_crash_while_quantizing_leaves_no_file_and_names_the_type(tiny_gguf, monkeypatch):
    file, _ = tiny_gguf
    target = file.with_name("tiny-Q4_K_M.gguf")
    monkeypatch.setenv(FAULT_ENV, "segv:quantize")
    with pytest.raises(LlamaCppFailed, match=r"^llama\.cpp crashed \(SIGSEGV\) quantizing "):
        gguf.quantize(file, target, "q4_k_m")
    assert not list(file.parent.glob("*Q4_K_M*"))


# --- the self-test, before training -------------------------------------------------------


@pytest.fixture
def no_remembered_pass(tmp_path, monkeypatch):
    """The self-test runs, whatever passed on this machine before."""
    monkeypatch.setattr(gguf_selftest, "STAMPS", tmp_path / "stamps")


def test_the_self_test_refuses_a_toolchain_that_crashes(no_remembered_pass, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "segv:eval:selftest-Q8_0")
    problem = gguf_selftest.selftest_problem(["q8_0"])
    assert problem == (
        "the GGUF toolchain failed its self-test: llama.cpp crashed (SIGSEGV) running "
        "selftest-Q8_0.gguf: run `make setup-gguf` (it builds llama.cpp for any x86-64 CPU, "
        "AMX kernels off)"
    )


def test_the_self_test_refuses_wrong_logits(no_remembered_pass, monkeypatch):
    made = gguf_selftest._tiny_model

    def with_other_reference(folder):
        folder, ids, reference = made(folder)
        return folder, ids, reference[:, ::-1].copy()  # what a kernel of garbage would give

    monkeypatch.setattr(gguf_selftest, "_tiny_model", with_other_reference)
    problem = gguf_selftest.selftest_problem()
    assert problem is not None
    assert problem.startswith("the GGUF toolchain failed its self-test: llama.cpp's f32 logits ")
    assert "(relative; expected at most 0.005)" in problem


def test_the_self_test_refuses_a_build_with_amx_kernels(no_remembered_pass, monkeypatch):
    call = gguf_selftest.LlamaCppChild.call

    def amx_on(self, op, *args):
        value = call(self, op, *args)
        return value + " | AMX_INT8 = 1 |" if op == "system_info" else value

    monkeypatch.setattr(gguf_selftest.LlamaCppChild, "call", amx_on)
    problem = gguf_selftest.selftest_problem()
    assert problem is not None and "runs ggml's AMX kernels" in problem


def test_a_passed_self_test_is_remembered_on_this_machine(no_remembered_pass, monkeypatch):
    assert gguf_selftest.selftest_problem(["q8_0"]) is None

    def not_again(*args):
        raise AssertionError("the self-test ran again")

    monkeypatch.setattr(gguf_selftest, "_selftest", not_again)
    assert gguf_selftest.selftest_problem(["q8_0"]) is None


def test_the_preflight_refuses_a_broken_toolchain_before_training(
    no_remembered_pass, tmp_path, monkeypatch
):
    from llm_finetune.pipeline import run

    monkeypatch.setenv(FAULT_ENV, "abort:eval:selftest-F32")
    config = tiny_config(tmp_path, export={"formats": ["merged_16bit", "q8_0"]})
    with pytest.raises(UserError, match=r"^the GGUF toolchain failed its self-test: .*SIGABRT"):
        run(config)
    assert not (tmp_path / "out" / "adapter").exists()


# --- the commands: the format is rejected, the rest goes on -------------------------------


def chat_rows(folder: Path) -> Path:
    """Held-out rows in the chat format, so the tiny base's chat template renders them."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Write the number {n} in words."},
                {"role": "assistant", "content": word},
            ]
        }
        for n, word in enumerate(words * 2)
    ]
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "fault", ["segv:eval", "abort:tokenize", "kill:load", "hang:eval"], ids=lambda f: f
)
def test_the_export_command_rejects_the_format_whose_llama_cpp_died(tiny_base, tmp_path, fault):
    kind, op = fault.split(":")
    name = Path(tiny_base).name
    exports = tmp_path / "out" / "exports"
    done = cli(
        *("export", "--merged", tiny_base, "--format", "q8_0", "--format", "f16"),
        *("--data", str(chat_rows(tmp_path)), "--data-format", "chat"),
        *("--output", str(tmp_path / "out"), "--gguf-pre-tokenizer", "qwen2"),
        cwd=tmp_path,
        **{FAULT_ENV: f"{fault}:{name}-Q8_0", TIMEOUT_ENV: "3" if kind == "hang" else "120"},
    )
    assert done.returncode == 1, done.stderr[-2000:]  # documented: 1 when one is rejected
    assert "Traceback" not in done.stdout + done.stderr
    rows = {
        row["format"]: row for row in json.loads((exports / "results.json").read_text())["rows"]
    }
    assert rows["f16"]["passed"], rows["f16"]["problems"]
    assert not rows["q8_0"]["passed"]
    (reason,) = rows["q8_0"]["problems"]
    assert re.fullmatch(f"{DEATHS[kind]} {VERBS[op]} {name}-Q8_0\\.gguf.*", reason), reason
    assert (exports / "gguf" / f"{name}-F16.gguf").is_file()
    assert not (exports / "gguf" / f"{name}-Q8_0.gguf").exists()


@pytest.mark.slow
def test_a_run_whose_llama_cpp_crashes_publishes_what_passed_and_says_why(tmp_path):
    out = tmp_path / "out"
    done = cli(
        "run",
        str(DEMO),
        f"output_dir={out}",
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
        **{FAULT_ENV: "segv:eval:tiny-demo-Q8_0"},
    )
    assert done.returncode == 0, done.stderr[
        -3000:
    ]  # documented: a rejected export is not a failed run
    assert (
        "GGUF Q8_0 REJECTED: llama.cpp crashed (SIGSEGV) running tiny-demo-Q8_0.gguf "
        "(not published)" in done.stdout
    )
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert "model.safetensors" in summary["published"]["files"]
    exports = {row["format"]: row for row in summary["exports"]}
    assert exports["merged_16bit"]["passed"] and exports["q4_k_m"]["passed"]
    assert not exports["q8_0"]["passed"]
    files = summary["published_exports"]["gguf"]["files"]
    assert "tiny-demo-Q4_K_M.gguf" in files and "tiny-demo-Q8_0.gguf" not in files
    assert (out / "exports" / "rejected" / "tiny-demo-Q8_0.gguf").is_file()
