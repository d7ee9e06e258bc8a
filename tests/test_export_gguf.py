"""GGUF exports made by llama.cpp's own converter and quantizer and run in llama.cpp itself,
compared with transformers on a tiny Llama whose rows (256) let K-quants really apply."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llm_finetune.errors import UserError
from llm_finetune.exports import gguf
from llm_finetune.exports.convert_gguf import (
    UNRECOGNISED,
    PreTokenizerMismatch,
    choose_pre_tokenizer,
)

needs_toolchain = pytest.mark.skipif(
    gguf.toolchain_problem() is not None, reason=str(gguf.toolchain_problem())
)

SEQUENCES = [
    "<s>Write the number 47 in words.",
    "<s><|user|>\nWrite the number 1203 in words.\n<|assistant|>\none thousand",
    "<s>ninety-nine, twelve, three hundred and six",
]
PROMPT = "<s>Write the number 8 in words."
GENERATED_BEFORE_EOS = 3  # the tiny model is made to say EOS as its fourth new token


def softmax_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean per-position KL(reference || other) of the next-token distributions, in nats."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == model.config.eos_token_id:
                break
    return new


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 2-layer Llama, hidden 256, intermediate 768, saved in bf16 as a merge would be, whose
    greedy answer to PROMPT ends with EOS; and transformers' float32 results on it."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from llm_finetune.demo import build_tokenizer, tiny_llama_config

    tokenizer = build_tokenizer()
    config = tiny_llama_config(tokenizer)
    config.initializer_range = 0.1  # logits far apart: a greedy answer with no repeated token
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).float().eval()
    # Swap the output rows of EOS and the fourth greedy token: the model now says EOS there.
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    fourth = greedy(model, prompt, GENERATED_BEFORE_EOS + 1)[-1]
    rows = model.lm_head.weight.data
    rows[[fourth, config.eos_token_id]] = rows[[config.eos_token_id, fourth]]

    folder = tmp_path_factory.mktemp("gguf") / "merged"
    model.to(torch.bfloat16).save_pretrained(folder)
    model.float()
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    ).save_pretrained(folder)

    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in SEQUENCES]
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0].numpy() for ids in sequences]
    return {
        "folder": folder,
        "tokenizer": tokenizer,
        "sequences": sequences,
        "logits": logits,
        "prompt": prompt,
        "answer": greedy(model, prompt, 20),
    }


@pytest.fixture(scope="module")
def f16_file(tiny) -> Path:
    target = tiny["folder"].parent / "model-F16.gguf"
    gguf.convert(tiny["folder"], target, "f16", pre_tokenizer="qwen2")
    return target


def compare(runner, tiny) -> tuple[float, float, float]:
    """(max |Δlogit|, mean KL, top-1 agreement) of a runner against transformers."""
    diffs, kls, agree = [], [], []
    for ids, reference in zip(tiny["sequences"], tiny["logits"], strict=True):
        logits = runner.logits(ids)
        assert logits.shape == reference.shape and logits.dtype == np.float32
        diffs.append(float(np.abs(logits - reference).max()))
        kls.append(softmax_kl(reference, logits))
        agree.append(float((logits.argmax(-1) == reference.argmax(-1)).mean()))
    return max(diffs), float(np.mean(kls)), float(np.mean(agree))


@needs_toolchain
def test_f16_runs_in_llama_cpp_as_in_transformers(tiny, f16_file, capfd):
    meta = gguf.gguf_metadata(f16_file)
    tokenizer = tiny["tokenizer"]
    assert meta["architecture"] == "llama"
    assert meta["file_type"] == "MOSTLY_F16"
    assert meta["pre_tokenizer"] == "qwen2"  # declared: llama.cpp does not know this tokenizer
    assert meta["bos_token_id"] == tokenizer.bos_token_id
    assert meta["eos_token_id"] == tokenizer.eos_token_id
    assert meta["chat_template"] == tokenizer.chat_template
    assert meta["tensor_types"] == {"F16": 16, "F32": 5}
    assert not list(f16_file.parent.glob(".*partial*"))

    runner = gguf.LlamaCppRunner(f16_file, n_ctx=128)
    try:
        max_diff, kl, top1 = compare(runner, tiny)
        assert max_diff < 0.1 and kl < 1e-4 and top1 > 0.9  # f16 activations in llama.cpp
        first = runner.logits(tiny["sequences"][0])
        assert np.array_equal(first, runner.logits(tiny["sequences"][0]))  # deterministic
        answer = runner.generate(tiny["prompt"], 20)
        assert answer == tiny["answer"]
        assert len(answer) == GENERATED_BEFORE_EOS + 1 and answer[-1] == tokenizer.eos_token_id
        assert runner.generate(tiny["prompt"], 2) == answer[:2]  # the budget also stops it
        text = SEQUENCES[1].removeprefix("<s>")
        assert runner.tokenize(text) == tokenizer(text)["input_ids"]
    finally:
        runner.close()
    assert capfd.readouterr().err == ""  # llama.cpp's log kept off stderr


@needs_toolchain
def test_q8_0_by_the_converter_and_q4_k_m_by_the_quantizer(tiny, f16_file):
    folder = f16_file.parent
    q8 = folder / "model-Q8_0.gguf"
    gguf.convert(tiny["folder"], q8, "q8_0", pre_tokenizer="qwen2")
    assert gguf.gguf_metadata(q8)["tensor_types"] == {"Q8_0": 16, "F32": 5}

    q4 = folder / "model-Q4_K_M.gguf"
    gguf.quantize(f16_file, q4, "q4_k_m")
    meta = gguf.gguf_metadata(q4)
    assert meta["file_type"] == "MOSTLY_Q4_K_M"
    assert meta["tensor_types"]["Q4_K"] >= 10 and meta["tensor_types"]["Q6_K"] >= 1
    assert sum(meta["tensor_types"].values()) == 21
    assert q4.stat().st_size < q8.stat().st_size < f16_file.stat().st_size
    assert not list(folder.glob(".*partial*"))

    results = {}
    for file in (q8, q4):
        runner = gguf.LlamaCppRunner(file, n_ctx=128)
        try:
            results[file.name] = compare(runner, tiny)
        finally:
            runner.close()
    q8_diff, q8_kl, q8_top1 = results[q8.name]
    q4_diff, q4_kl, q4_top1 = results[q4.name]
    # A random model is far more sensitive to rounding than a trained one: loose bounds, and
    # the order of the types' errors.
    assert q8_kl < 0.01 and q8_diff < 1.0 and q8_top1 > 0.75
    assert 10 * q8_kl < q4_kl < 1.0 and q8_diff < q4_diff


@needs_toolchain
def test_an_unrecognised_pre_tokenizer_is_refused_without_a_declared_name(tiny):
    target = tiny["folder"].parent / "refused.gguf"
    with pytest.raises(UserError, match=r"set export\.gguf_pre_tokenizer") as caught:
        gguf.convert(tiny["folder"], target, "f16")
    assert "\n" not in str(caught.value) and "does not recognise" in str(caught.value)
    assert not target.exists() and not list(target.parent.glob(".refused*"))


@needs_toolchain
def test_a_declared_pre_tokenizer_llama_cpp_does_not_know_is_refused(tiny):
    target = tiny["folder"].parent / "unknown-pre.gguf"
    with pytest.raises(UserError, match="'no-such-pre'.*unknown pre-tokenizer"):
        gguf.convert(tiny["folder"], target, "f16", pre_tokenizer="no-such-pre")
    assert not target.exists() and not list(target.parent.glob(".unknown-pre*"))


def test_the_declared_name_is_used_only_where_the_converter_would_stop():
    def unrecognised() -> str:
        raise NotImplementedError(f"{UNRECOGNISED} - update get_vocab_base_pre()")

    def other_failure() -> str:
        raise NotImplementedError("something else")

    assert choose_pre_tokenizer(unrecognised, "qwen2") == "qwen2"
    assert choose_pre_tokenizer(lambda: "qwen2", "qwen2") == "qwen2"
    with pytest.raises(PreTokenizerMismatch, match="recognises .* as 'llama-bpe'"):
        choose_pre_tokenizer(lambda: "llama-bpe", "qwen2")
    with pytest.raises(NotImplementedError, match="something else"):
        choose_pre_tokenizer(other_failure, "qwen2")


FAKE_CONVERTER = """
    import os
    import signal
    import sys
    from pathlib import Path
    from conversion.base import TextModel

    def main():
        outfile = Path(sys.argv[sys.argv.index("--outfile") + 1])
        outfile.write_text(TextModel().get_vocab_base_pre(None))
        if "killed" in outfile.name:
            os.kill(os.getpid(), signal.SIGKILL)
"""
FAKE_BASE = """
    class ModelBase:
        @staticmethod
        def load_hparams(dir_model, is_mistral_format):
            return {}

    class TextModel(ModelBase):
        def get_vocab_base_pre(self, tokenizer):
            return "llama-bpe"
"""


@pytest.fixture
def fake_converter(tmp_path, monkeypatch) -> Path:
    """A converter that recognises the tokenizer as llama-bpe, run through the real wrapper."""
    converter = tmp_path / "llama.cpp"
    (converter / "conversion").mkdir(parents=True)
    (converter / "convert_hf_to_gguf.py").write_text(textwrap.dedent(FAKE_CONVERTER))
    (converter / "conversion" / "__init__.py").write_text("")
    (converter / "conversion" / "base.py").write_text(textwrap.dedent(FAKE_BASE))
    monkeypatch.setattr(gguf, "CONVERTER_DIR", converter)
    monkeypatch.setattr(gguf, "_check_pre_tokenizer_known", lambda *args: None)
    return converter


def test_a_recognised_tokenizer_keeps_its_name_and_a_contradicting_one_is_refused(
    fake_converter, tmp_path
):
    kept = tmp_path / "kept.gguf"
    gguf.convert(tmp_path, kept, "f16")
    assert kept.read_text() == "llama-bpe"
    gguf.convert(tmp_path, kept, "f16", pre_tokenizer="llama-bpe")
    assert kept.read_text() == "llama-bpe"

    refused = tmp_path / "refused.gguf"
    with pytest.raises(UserError, match="recognises .* as 'llama-bpe' but .* is 'qwen2'"):
        gguf.convert(tmp_path, refused, "f16", pre_tokenizer="qwen2")
    assert not refused.exists()


def test_a_killed_converter_leaves_no_file_and_says_so(fake_converter, tmp_path):
    target = tmp_path / "out" / "killed.gguf"
    with pytest.raises(UserError, match="converter failed: killed by SIGKILL .out of memory"):
        gguf.convert(tmp_path, target, "f16")
    assert list(target.parent.iterdir()) == []


@needs_toolchain
def test_an_architecture_the_converter_does_not_support_is_named(tiny, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny["folder"], merged)
    config = json.loads((merged / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (merged / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not support the architecture NoSuchModelForCausalLM"):
        gguf.convert(merged, tmp_path / "model.gguf", "f16", pre_tokenizer="qwen2")
    assert list(tmp_path.iterdir()) == [merged]


@needs_toolchain
def test_a_failed_conversion_leaves_no_file_and_says_why(tiny, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny["folder"], merged)
    weights = merged / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4)  # fails while the GGUF is being written
    target = tmp_path / "model.gguf"
    with pytest.raises(UserError, match="llama.cpp's converter failed: ValueError: .+") as caught:
        gguf.convert(merged, target, "q8_0", pre_tokenizer="qwen2")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [merged]


@needs_toolchain
def test_a_failed_quantization_or_load_says_why_in_one_line(f16_file, tmp_path):
    source = tmp_path / "not.gguf"
    source.write_bytes(b"not a gguf file")
    target = tmp_path / "model-Q4_K_M.gguf"
    with pytest.raises(UserError, match="could not quantize it to q4_k_m: invalid magic"):
        gguf.quantize(source, target, "q4_k_m")
    # A type llama.cpp knows beyond formats.GGUF_TYPES is passed through to its quantizer.
    with pytest.raises(UserError, match="to iq2_xxs: this quantization requires an importance"):
        gguf.quantize(f16_file, target, "iq2_xxs")
    with pytest.raises(UserError, match="has no quant type 'q9_z'"):
        gguf.quantize(f16_file, target, "q9_z")
    assert list(tmp_path.iterdir()) == [source]
    with pytest.raises(UserError, match="not.gguf: llama.cpp cannot load it: invalid magic"):
        gguf.LlamaCppRunner(source, n_ctx=64)


def test_a_missing_toolchain_is_one_line_with_the_command_that_fixes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    problem = gguf.toolchain_problem()
    assert problem and "llama-cpp-python" in problem and "`make setup-gguf`" in problem
    monkeypatch.undo()

    if gguf.toolchain_problem() is not None:
        pytest.skip("the rest needs llama-cpp-python installed")
    monkeypatch.setattr(gguf, "CONVERTER_DIR", tmp_path)
    problem = gguf.toolchain_problem()
    assert problem and "converter, not found" in problem and "`make setup-gguf`" in problem
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    problem = gguf.toolchain_problem()
    assert problem and "not the one of the installed" in problem and "\n" not in problem
