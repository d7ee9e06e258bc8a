"""The export check: held-out data as trained, the 16-bit reference, measure and judge; the
fp32, merged_4bit and lora exports measured against the merged model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from llm_finetune.backends.hf import load_tokenizer
from llm_finetune.errors import UserError
from llm_finetune.exports import safetensors_exports
from llm_finetune.exports.checks import Measured, held_out, judge, measure, reference
from llm_finetune.exports.formats import DEFAULT_LIMITS, FP32, LORA, MERGED_4BIT, MERGED_16BIT
from llm_finetune.exports.safetensors_exports import (
    TransformersRunner,
    bitsandbytes_problem,
    write_fp32,
    write_merged_4bit,
)
from tests.conftest import dpo_pairs, tiny_config

CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Write the number {n} in words."},
            {"role": "assistant", "content": word},
        ]
    }
    for n, word in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven"] * 2)
]


def _data_config(tmp_path, data_format):
    if data_format == "alpaca":
        return tiny_config(tmp_path, data={"datasets": [{"path": "builtin:number-words"}]})
    if data_format == "chat":
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
        return tiny_config(tmp_path, data={"datasets": [{"path": str(path)}], "format": "chat"})
    path = dpo_pairs(tmp_path)
    return tiny_config(
        tmp_path, method="dpo", data={"datasets": [{"path": str(path)}], "format": "dpo"}
    )


@pytest.mark.parametrize("data_format", ["alpaca", "chat", "dpo"])
def test_held_out_is_the_test_split_training_held_out(tmp_path, tiny_base, data_format):
    from llm_finetune.data import format_dataset, load_raw

    config = _data_config(tmp_path, data_format)
    config.data.test_size = 0.25
    tokenizer = load_tokenizer(tiny_base)
    held = held_out(config, tokenizer, rows=3, max_tokens=1000, merged=tiny_base)

    test = format_dataset(load_raw(config.data), config.data, tokenizer)["test"]
    texts = [r["text"] if "text" in r else r["prompt"] + r["chosen"] for r in test][:3]
    assert held.sequences == [tokenizer(t)["input_ids"] for t in texts]
    assert held.source.startswith("3 rows of the test split")
    # each row's prompt is where its answer starts, then the verify prompts
    assert len(held.prompts) == 3 + len(config.verify.prompts)
    for prompt, sequence in zip(held.prompts, held.sequences, strict=False):
        assert sequence[: len(prompt)] == prompt and len(sequence) > len(prompt)
    assert held.eos_ids == (tokenizer.eos_token_id,)
    assert held.max_new_tokens == config.verify.max_new_tokens
    # Short answers are scored per format (exact match); DPO's are not, nor verify prompts'.
    raw_test = load_raw(config.data).train_test_split(test_size=0.25, seed=0)["test"]
    answers = {"alpaca": "output", "dpo": None, "chat": "messages"}[data_format]
    if answers is None:
        assert held.expected == (None,) * len(held.prompts)
    else:
        wanted = [
            r["output"] if answers == "output" else r["messages"][-1]["content"] for r in raw_test
        ]
        assert held.expected == (*wanted[:3], *[None] * len(config.verify.prompts))


def test_held_out_without_a_test_split_is_a_seeded_sample_of_the_training_rows(tmp_path, tiny_base):
    from llm_finetune.data import format_dataset, load_raw

    config = _data_config(tmp_path, "alpaca")
    tokenizer = load_tokenizer(tiny_base)
    held = held_out(config, tokenizer, rows=5, max_tokens=1000, merged=tiny_base)

    training = format_dataset(load_raw(config.data), config.data, tokenizer)["train"]
    whole = [tokenizer(t)["input_ids"] for t in training["text"]]
    assert len(held.sequences) == 5 and all(s in whole for s in held.sequences)
    assert len(held.prompts) == 5 + 1
    assert "no test split" in held.source
    assert held_out(config, tokenizer, rows=5, max_tokens=1000, merged=tiny_base) == held
    config.data.shuffle_seed = 1
    other = held_out(config, tokenizer, rows=5, max_tokens=1000, merged=tiny_base)
    assert other.sequences != held.sequences

    config.data.shuffle_seed = 0
    cut = held_out(config, tokenizer, rows=5, max_tokens=20, merged=tiny_base)
    assert cut.sequences == [s[:20] for s in held.sequences]
    assert cut.prompts == held.prompts  # whole: a cut prompt would be another prompt


# ---------------------------------------------------------------------------------------
# Measuring exports of the trained tiny model


@pytest.fixture(scope="module")
def merged(trained_adapter, tmp_path_factory):
    from llm_finetune.merge import merge

    _, base, adapter, _ = trained_adapter
    out = tmp_path_factory.mktemp("exports") / "merged"
    merge(base, adapter, out, dtype="bfloat16")
    return out


@pytest.fixture(scope="module")
def ref(trained_adapter, merged, tmp_path_factory):
    config = trained_adapter[0]
    held = held_out(config, load_tokenizer(str(merged)), rows=6, max_tokens=48, merged=merged)
    held = dataclasses.replace(held, max_new_tokens=8)  # the answers are 3 tokens and EOS
    return reference(merged, held, tmp_path_factory.mktemp("reference"))


def _measured(ref, runner):
    try:
        return measure(ref, runner)
    finally:
        runner.close()


def test_the_merged_model_against_itself_is_exact(ref, merged):
    assert ref.logits_file.is_file()
    assert len(ref.held_out.sequences) == 6 and len(ref.generations) == 6 + 1
    measured = _measured(ref, TransformersRunner(merged))
    assert (measured.kl, measured.kl_max, measured.top1) == (0.0, 0.0, 1.0)
    assert measured.max_abs_logit_diff == 0.0
    assert measured.perplexity == measured.reference_perplexity < 10
    # the trained model answers the rows' prompts and stops
    assert (
        measured.eos_expected >= 6
        and measured.stops_at_eos == f"{measured.eos_expected}/{measured.eos_expected}"
    )
    assert measured.same_generations == measured.generations == 7
    assert measured.answers_expected == 6 and 0 <= measured.answers_right <= 6
    assert len(measured.sample_answers) == 5
    assert judge(measured, DEFAULT_LIMITS[MERGED_16BIT]) == []


def test_each_formats_answers_are_scored_and_shown_beside_the_expected_ones():
    from llm_finetune.exports.checks import HeldOut
    from llm_finetune.exports.formats import answers_table

    texts = {5: "Forty-seven.", 6: "x", 7: "three"}
    held = HeldOut(
        sequences=[],
        prompts=[[1], [2], [3]],
        eos_ids=(0,),
        max_new_tokens=4,
        source="",
        expected=("forty-seven", None, "two"),
        decode=lambda ids: texts[ids[0]],
    )
    assert held.answers_expected == 2
    right, samples = held.answers([[5, 0], [6, 0], [7, 0]])
    assert (right, samples) == (1, [["forty-seven", "Forty-seven."], ["two", "three"]])
    assert HeldOut([], [[1]], (0,), 4, "").answers([[5]]) == (None, [])
    rows = [
        {"format": "merged_16bit", "measured": {"sample_answers": samples}},
        {"format": "q8_0", "measured": {"sample_answers": [["forty-seven", "a|b"], ["two", ""]]}},
        {"format": "q4_k_m", "measured": None},
    ]
    assert answers_table(rows).splitlines() == [
        "| expected | merged_16bit | GGUF Q8_0 |",
        "|---|---|---|",
        "| forty-seven | Forty-seven. | a\\|b |",
        "| two | three | (empty) |",
    ]
    assert answers_table(rows[2:]) == ""


def test_a_damaged_export_fails_with_the_numbers(ref, merged):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            weight += 0.5 * weight.std() * torch.randn(weight.shape, generator=generator)
    measured = _measured(ref, TransformersRunner(model))
    reasons = judge(measured, DEFAULT_LIMITS[FP32])
    assert reasons[0] == f"KL {measured.kl:.3g} > limit 0.001" and measured.kl > 1e-3
    assert measured.max_abs_logit_diff > 0.1


def test_fp32_export_is_the_float32_merge_and_passes(ref, trained_adapter, tmp_path):
    _, base, adapter, _ = trained_adapter
    report = write_fp32(base, None, adapter, tmp_path / "fp32")
    assert report.dtype == "float32"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    measured = _measured(ref, TransformersRunner(tmp_path / "fp32"))
    print("fp32", measured.as_dict())
    assert 0 < measured.kl < 1e-4 and measured.top1 == 1.0
    assert judge(measured, DEFAULT_LIMITS[FP32]) == []


def test_lora_runner_matches_the_merged_model(ref, trained_adapter):
    _, base, adapter, _ = trained_adapter
    measured = _measured(ref, TransformersRunner(base, adapter=adapter))
    print("lora", measured.as_dict())
    assert measured.kl < 1e-4 and measured.top1 == 1.0
    assert judge(measured, DEFAULT_LIMITS[LORA]) == []


def test_merged_4bit_writes_reloads_and_is_measured(ref, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "merged_4bit"
    write_merged_4bit(merged, target)
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (target / name).read_bytes() == (merged / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(target)  # plain loading
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    del model
    assert [p.name for p in tmp_path.iterdir()] == ["merged_4bit"]  # staged, then renamed
    measured = _measured(ref, TransformersRunner(target))
    print("merged_4bit", measured.as_dict())
    assert 0 < measured.kl < math.inf and 0 <= measured.top1 <= 1
    with pytest.raises(UserError, match="already exists"):
        write_merged_4bit(merged, target)


@pytest.mark.parametrize(
    ("installed", "said"),
    [(None, "which is not installed"), ("0.45.0", ">= 0.49 (it runs on the CPU from then on)")],
)
def test_merged_4bit_without_a_usable_bitsandbytes(monkeypatch, tmp_path, installed, said):
    monkeypatch.setattr(safetensors_exports, "_installed_version", lambda package: installed)
    problem = bitsandbytes_problem()
    assert said in problem and "pip install -U 'bitsandbytes>=0.49'" in problem
    assert "\n" not in problem
    with pytest.raises(UserError) as raised:
        write_merged_4bit(tmp_path / "merged", tmp_path / "merged_4bit")
    assert str(raised.value) == problem
    assert not (tmp_path / "merged_4bit").exists()


def test_bitsandbytes_installed_is_no_problem():
    assert bitsandbytes_problem() is None


# ---------------------------------------------------------------------------------------
# judge and measure on made-up numbers


def _numbers(**changes):
    fields = dict(
        kl=0.01,
        kl_max=0.1,
        top1=0.97,
        perplexity=3.0,
        reference_perplexity=2.9,
        max_abs_logit_diff=0.5,
        eos_stops=3,
        eos_expected=3,
        same_generations=3,
        generations=4,
        positions=100,
        seconds=1.0,
    )
    return Measured(**(fields | changes))


def test_judge_names_each_limit_exceeded_with_the_numbers():
    limits = DEFAULT_LIMITS["q8_0"]  # kl 0.01, top1 0.95
    assert judge(_numbers(), limits) == []
    assert judge(_numbers(kl=0.31, top1=0.5, eos_stops=2), limits) == [
        "KL 0.31 > limit 0.01",
        "top-1 agreement 0.500 < limit 0.95",
        "stops at EOS on 2/3 of the prompts the 16-bit model stops on (given its answer)",
    ]
    assert judge(_numbers(kl=math.nan), limits) == ["KL nan > limit 0.01"]
    assert _numbers().as_dict()["stops_at_eos"] == "3/3"


def test_judge_of_the_4bit_limits():
    assert judge(_numbers(kl=0.2, top1=0.9), DEFAULT_LIMITS[MERGED_4BIT]) == ["KL 0.2 > limit 0.1"]


class _WrongVocabulary:
    def logits(self, ids):
        return np.zeros((len(ids), 7), dtype=np.float32)

    def generate(self, ids, max_new_tokens):
        return []

    def close(self):
        pass


def test_an_export_with_another_vocabulary_is_refused(ref):
    with pytest.raises(UserError, match=r"logits of shape \[\d+, 7\]"):
        measure(ref, _WrongVocabulary())
