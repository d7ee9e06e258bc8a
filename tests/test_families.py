"""Families whose GGUF needs config keys transformers 5 no longer writes (GPT-2's n_ctx, GPT-NeoX's
rotary_pct, multi-query Falcon's one key/value head) or spells differently (PhimoeForCausalLM),
and the fused-projection and Conv1D families, merged and checked against peft's forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm_finetune.exports import gguf
from llm_finetune.exports.convert_gguf import with_converter_keys
from llm_finetune.merge import merge
from tests.test_tokenizer_files import sentencepiece_model

# Distinct sizes: hidden 64, MLP 96 (each expert 48; GPT-2's 4 x 64, which its converter assumes).
PHI3 = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SIZES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),  # MLP 4 x 64, as GPT-2
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=False,
    ),
    "falcon": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
    ),
    "phi3": PHI3,
    "phimoe": dict(
        PHI3,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        # as Phi-3.5-MoE's config.json has them
        lm_head_bias=True,
        attention_bias=True,
        original_max_position_embeddings=4096,
        max_position_embeddings=4096,
    ),
}
SENTENCEPIECE = {"phi3", "phimoe"}  # their converter reads tokenizer.model


def save_model(folder: Path, family: str, tiny_base: str) -> AutoTokenizer:
    """A random `family` model with a tokenizer its converter takes: the demo's BPE one, or a
    SentencePiece tokenizer.model for the Phi families."""
    folder.mkdir()
    if family in SENTENCEPIECE:
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(True))
        flags = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(flags))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    specials = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **specials, **SIZES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.skipif(gguf.toolchain_problem() is not None, reason=str(gguf.toolchain_problem()))
@pytest.mark.parametrize("family", sorted(SIZES))
def test_the_gguf_of_a_transformers_5_config_runs_as_transformers_does(tmp_path, family, tiny_base):
    folder = tmp_path / "model"
    tokenizer = save_model(folder, family, tiny_base)
    config_json = (folder / "config.json").read_bytes()
    declared = None if family in SENTENCEPIECE else "qwen2"

    gguf.convert(folder, tmp_path / "model.gguf", "f32", pre_tokenizer=declared)

    assert (folder / "config.json").read_bytes() == config_json  # the published one unchanged
    ids = tokenizer("Write the number 47 in words.")["input_ids"]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        expected = model(torch.tensor([ids])).logits[0]
    runner = gguf.LlamaCppRunner(tmp_path / "model.gguf", n_ctx=64)
    try:
        logits = torch.as_tensor(runner.logits(ids))
    finally:
        runner.close()
    if family == "phimoe":  # llama.cpp routes with softmax top-k, transformers with sparsemixer
        assert torch.isfinite(logits).all() and logits.shape == expected.shape
    else:
        assert (logits - expected).abs().max().item() < 1e-3


def test_the_converter_keys_follow_transformers():
    """Derived as transformers reads the config; the rest is left alone."""
    assert with_converter_keys({"model_type": "gpt2", "n_positions": 1024})["n_ctx"] == 1024
    neox = {"model_type": "gpt_neox", "rope_parameters": {"partial_rotary_factor": 0.25}}
    assert with_converter_keys(neox)["rotary_pct"] == 0.25
    falcon = {"model_type": "falcon", "num_attention_heads": 8, "num_kv_heads": 8}
    assert with_converter_keys({**falcon, "multi_query": True})["num_kv_heads"] == 1
    assert with_converter_keys({**falcon, "multi_query": False})["num_kv_heads"] == 8
    falcon_40b = {**falcon, "new_decoder_architecture": True, "num_kv_heads": 2}
    assert with_converter_keys(falcon_40b)["num_kv_heads"] == 2
    phimoe = with_converter_keys({"architectures": ["PhimoeForCausalLM"]})
    assert phimoe["architectures"] == ["PhiMoEForCausalLM"]
    assert gguf.architecture_problem(["PhimoeForCausalLM"]) is None
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "n_ctx": None}
    assert with_converter_keys(llama) == llama


# family -> LoRA targets: GPT-2's Conv1D (fan_in_fan_out), Phi-3's fused projections
MERGED = {
    "gpt2": (["c_attn", "c_proj", "c_fc"], True),
    "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], False),
    "falcon": (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], False),
}


@pytest.mark.parametrize("family", sorted(MERGED))
def test_fused_and_conv1d_families_merge_as_peft_computes(tmp_path, family, tiny_base):
    targets, fan_in_fan_out = MERGED[family]
    base, adapter, merged = tmp_path / "model", tmp_path / "adapter", tmp_path / "merged"
    tokenizer = save_model(base, family, tiny_base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
    )
    get_peft_model(model, lora).save_pretrained(adapter)

    merge(str(base), adapter, merged, dtype="float32")

    ids = torch.tensor([tokenizer("Write the number 47 in words.")["input_ids"]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (reference(ids).logits - reloaded(ids).logits).abs().max().item()
    assert difference <= 1e-5
