"""The streaming merge against peft's own forward pass, for every adapter layout peft writes.

Each case builds a tiny float32 base, attaches LoRA with peft, randomises every adapter
weight (peft initialises B to zero, which would hide mistakes), saves the adapter, merges
with our engine in float32 and compares logits with the unmerged peft model: within 1e-4.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from llm_finetune.errors import UserError
from llm_finetune.merge import merge

VOCAB = 96


def llama(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def gpt2() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def save_tokenizer(folder) -> None:
    """A character-level tokenizer of VOCAB tokens (the merge copies it, verify needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {"</s>": 0, **{chr(32 + i): 1 + i for i in range(VOCAB - 1)}}
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(folder)


def build(tmp_path, model_config, lora_config: LoraConfig, shard_size: str | None = None):
    """Save a base and a randomised adapter; return (base dir, adapter dir, peft model)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config).float()
    base.save_pretrained(tmp_path / "base", max_shard_size=shard_size or "50GB")
    save_tokenizer(tmp_path / "base")
    peft_model = get_peft_model(base, lora_config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # LoRA A/B, DoRA magnitudes, lora_bias, modules_to_save
                scale = 1.0 if "magnitude" in name else 0.2
                parameter.copy_(
                    torch.randn_like(parameter) * scale + (scale if "magnitude" in name else 0)
                )
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", peft_model.eval()


def assert_merge_matches(tmp_path, peft_model, base_dir, adapter_dir, **merge_kwargs):
    report = merge(str(base_dir), adapter_dir, tmp_path / "merged", dtype="float32", **merge_kwargs)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = peft_model(input_ids=input_ids).logits
        actual = merged(input_ids=input_ids).logits
    assert float((expected - actual).abs().max()) < 1e-4
    # The adapter really changes the model: the comparison is not between two copies of the base.
    with torch.inference_mode(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=input_ids).logits
    assert float((expected - base_logits).abs().max()) > 1e-2
    assert_both_checks_pass(base_dir, adapter_dir, tmp_path / "merged")
    return report


def assert_both_checks_pass(base_dir, adapter_dir, merged) -> None:
    """`verify` passes the merge whole and block by block (the least memory it accepts),
    with the same figures."""
    from llm_finetune.verify import verify
    from tests.test_verify_bounded import assert_same_check, least_memory

    whole, bounded = (
        verify(str(base_dir), adapter_dir, merged, ["Write 47 in words."], 3, max_memory=cap)
        for cap in (None, least_memory(base_dir, adapter_dir, merged))
    )
    assert_same_check(whole, bounded)
    assert whole.passed and whole.adapter_effect_max_abs_logit_diff > 1e-2


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_plain_lora_on_a_sharded_base(tmp_path):
    base, adapter, model = build(
        tmp_path, llama(), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR), "20KB"
    )
    assert len(list(base.glob("*.safetensors"))) > 2
    report = assert_merge_matches(tmp_path, model, base, adapter)
    assert report.lora_modules_found == report.lora_modules_merged == 2 * 7
    assert report.shards == len(list(base.glob("*.safetensors")))
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in base.glob("*.safetensors")}


def test_rslora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])
    base, adapter, model = build(tmp_path, llama(), config)
    assert_merge_matches(tmp_path, model, base, adapter)


def test_rank_and_alpha_patterns_and_layers_to_transform(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32},
        layers_to_transform=[1],
    )
    base, adapter, model = build(tmp_path, llama(), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    assert report.lora_modules_merged == 3  # one layer only


def test_dora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    base, adapter, model = build(tmp_path, llama(), config)
    assert_merge_matches(tmp_path, model, base, adapter)


def test_embedding_lora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    base, adapter, model = build(tmp_path, llama(), config)
    assert_merge_matches(tmp_path, model, base, adapter)


def test_modules_to_save_replace_the_base_tensor(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base, adapter, model = build(tmp_path, llama(), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    assert report.tensors_replaced == 1


def test_lora_bias(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    base, adapter, model = build(tmp_path, llama(attention_bias=True), config)
    assert_merge_matches(tmp_path, model, base, adapter)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_trained_whole(tmp_path, bias):
    """peft's `bias`: the base biases (all, or those of adapted layers) saved as trained."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias)
    base, adapter, model = build(tmp_path, llama(attention_bias=True), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    assert report.tensors_replaced == (2 * 4 if bias == "all" else 2 * 2)


def test_fan_in_fan_out_gpt2_conv1d_with_tied_embeddings(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    base, adapter, model = build(tmp_path, gpt2(), config)
    assert_merge_matches(tmp_path, model, base, adapter)


def test_tied_embeddings_stay_tied_when_the_adapter_keeps_them_tied(tmp_path):
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True)
    base, adapter, model = build(tmp_path, llama(tie_word_embeddings=True), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is True and not report.untied_embeddings


def test_embedding_lora_on_a_tied_model_unties_to_stay_correct(tmp_path):
    """peft adapts the input embedding only; the head keeps the base weight (peft#2777)."""
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    base, adapter, model = build(tmp_path, llama(tie_word_embeddings=True), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is False and report.untied_embeddings


def test_lora_on_a_tied_head_only(tmp_path):
    config = LoraConfig(r=4, target_modules=["lm_head", "q_proj"])
    base, adapter, model = build(tmp_path, llama(tie_word_embeddings=True), config)
    assert_merge_matches(tmp_path, model, base, adapter)


def test_modules_to_save_on_a_tied_head_unties_it(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base, adapter, model = build(tmp_path, llama(tie_word_embeddings=True), config)
    report = assert_merge_matches(tmp_path, model, base, adapter)
    assert report.untied_embeddings
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is False


def test_bf16_base_stays_bf16_and_unchanged_tensors_are_byte_identical(tmp_path):
    from safetensors.torch import load_file

    config = LoraConfig(r=4, target_modules=["q_proj"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(llama()).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    merge(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16")
    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "merged" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == torch.bfloat16
        if "q_proj" not in name:
            assert torch.equal(tensor, after[name]), name


# ---------------------------------------------------------------------------------------
# Refusals: each is one clear UserError, and no output folder appears.


def _plain(tmp_path):
    return build(tmp_path, llama(), LoraConfig(r=4, target_modules=["q_proj"]))


def test_refuses_an_adapter_of_another_base(tmp_path):
    _, adapter, _ = _plain(tmp_path)
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(llama(num_hidden_layers=1)).save_pretrained(other)
    with pytest.raises(UserError, match="match no base tensor"):
        merge(str(other), adapter, tmp_path / "out")
    wider = tmp_path / "wider"
    AutoModelForCausalLM.from_config(llama(hidden_size=64)).save_pretrained(wider)
    with pytest.raises(UserError, match="does not fit the base weight"):
        merge(str(wider), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_resized_vocabulary_with_the_fix(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _, adapter, _ = build(tmp_path, llama(), config)
    resized = tmp_path / "resized"
    AutoModelForCausalLM.from_config(llama(vocab_size=VOCAB + 8)).save_pretrained(resized)
    with pytest.raises(UserError, match="resize_token_embeddings"):
        merge(str(resized), adapter, tmp_path / "out")


def test_refuses_a_quantized_base(tmp_path):
    base, adapter, _ = _plain(tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="original 16-bit base"):
        merge(str(base), adapter, tmp_path / "out")


def test_refuses_pickle_weights(tmp_path):
    base, adapter, _ = _plain(tmp_path)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        merge(str(base), adapter, tmp_path / "out")


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    from llm_finetune import fsutil

    base, adapter, _ = _plain(tmp_path)
    monkeypatch.setattr(
        fsutil.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000)
    )
    with pytest.raises(UserError, match="not enough disk.*GB are free"):
        merge(str(base), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_adapter_without_safetensors(tmp_path):
    _, adapter, _ = _plain(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        merge(str(tmp_path / "base"), adapter, tmp_path / "out")


# ---------------------------------------------------------------------------------------
# Memory: about one tensor, not the model.

# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a large pytest process would
# report the parent's size and the assertion could never fail.
PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch, tokenizers  # imported before the baseline is taken
from llm_finetune.merge import merge
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
baseline = hwm()
report = merge(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), dtype="bfloat16")
print(json.dumps({"baseline_kb": baseline, "peak_kb": hwm(), "shards": report.shards}))
"""


def test_peak_memory_is_about_one_block_not_the_model(tmp_path):
    config = llama(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="60MB")
    lora = LoraConfig(r=8, target_modules=ALL_LINEAR)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    del model
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "base").glob("*.safetensors"))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_SCRIPT,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    grown = (figures["peak_kb"] - figures["baseline_kb"]) * 1024
    assert figures["shards"] >= 5
    # ~340 MB of weights; the merge works on 16 MB float32 blocks plus the (small) adapter.
    assert grown < 0.2 * model_bytes, (grown, model_bytes)


# glibc's allocator is process-wide: the merge's setting must end with the merge, since the
# pipeline trains before it and verifies after it in the same process.

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


LIBC.malloc.restype, LIBC.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
LIBC.free.argtypes = [ctypes.c_void_p]
if hasattr(LIBC, "mallinfo2"):
    LIBC.mallinfo2.restype = _Mallinfo2


def _mmap(kib: int) -> bool:
    """Whether glibc's mmap threshold is at most `kib` KiB now (mallopt has no getter): blocks
    of that size are taken until one does not fit in the heap's free space; that one is either
    mmapped (hblks grows) or grows the heap (arena grows)."""
    size = kib << 10
    before = LIBC.mallinfo2()
    taken = []
    try:
        for _ in range(before.fordblks // size + 2):  # each block from free space uses >= size
            taken.append(LIBC.malloc(size))
            now = LIBC.mallinfo2()
            if now.hblks > before.hblks or now.arena > before.arena:
                return now.hblks > before.hblks
    finally:
        for block in taken:
            LIBC.free(block)
    raise AssertionError("neither an mmap nor a larger heap: the probe is wrong")


@pytest.mark.skipif(not hasattr(LIBC, "mallinfo2"), reason="glibc >= 2.33 only")
def test_the_merges_mmap_threshold_ends_with_the_merge(tmp_path):
    base, adapter, _ = _plain(tmp_path)
    during = []  # probed after each shard is written
    merge(str(base), adapter, tmp_path / "out", progress=lambda line: during.append(_mmap(512)))
    assert during == [False]  # the merge's 1 MiB threshold: 512 KiB blocks come from the heap
    assert _mmap(512)  # glibc's default again (128 KiB): 512 KiB blocks are mmapped
