"""The merged folder carries the tokenizer as trained, completed with what transformers 5 no
longer saves and llama.cpp's converter reads: the base's `tokenizer.model` (Gemma and Phi-3
get no GGUF without it) and `add_bos_token`/`add_eos_token` as the tokenizer behaves.

The SentencePiece families are built here as their Hub repos are: a `tokenizer.model` (the
sentencepiece trainer makes one in a second), its tokenizer.json, and a tokenizer_config.json
that names the class and the flags; the adapter folder holds what training saved,
`tokenizer.save_pretrained`.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm_finetune.errors import UserError
from llm_finetune.exports import gguf
from llm_finetune.merge import merge
from llm_finetune.tokenizer_files import complete_tokenizer

TEXTS = ["Write the number 47 in words.", "forty-seven, 12 and 306 are numbers", "a"]
# The Hub's tokenizer_config.json of each family (the keys the loader and the converter read).
FAMILIES = {
    "mistral": {"tokenizer_class": "LlamaTokenizer", "legacy": False},
    "gemma": {"tokenizer_class": "GemmaTokenizer"},
    "gemma2": {"tokenizer_class": "GemmaTokenizer"},
    "gemma3_text": {"tokenizer_class": "GemmaTokenizer"},
}


def sentencepiece_model(add_dummy_prefix: bool) -> bytes:
    """A 300-piece BPE tokenizer.model with byte fallback, as Llama 2, Mistral and Gemma use
    (Gemma's adds no dummy prefix); <unk> 0, <s> 1, </s> 2."""
    import sentencepiece

    sentences = [
        f"Write the number {i} in words: {i} is a number, and words are words." for i in range(300)
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def build(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A tiny base of `family` as its Hub repo stores it, and a randomised LoRA adapter whose
    tokenizer is what training saves; return (base, adapter)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    (base / "tokenizer.model").write_bytes(sentencepiece_model(not family.startswith("gemma")))
    hub_config = {
        **FAMILIES[family],
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (base / "tokenizer_config.json").write_text(json.dumps(hub_config))
    # The Hub's repos carry tokenizer.json too: converted once, as their authors did.
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "converted")
    shutil.copy2(tmp_path / "converted" / "tokenizer.json", base)
    tokenizer = AutoTokenizer.from_pretrained(base)  # what training loads
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, head_dim=32)
    config = AutoConfig.for_model(
        family,
        **sizes,
        vocab_size=len(tokenizer),
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    assert not (adapter / "tokenizer.model").exists()  # transformers 5 writes tokenizer.json
    assert "add_bos_token" not in json.loads((adapter / "tokenizer_config.json").read_text())
    return base, adapter


def ids(folder: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_merge_carries_the_base_vocabulary_and_the_flags_as_trained(tmp_path, family):
    base, adapter = build(tmp_path, family)
    report = merge(str(base), adapter, tmp_path / "merged", dtype="float32")
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    flags = json.loads((merged / "tokenizer_config.json").read_text())
    assert (flags["add_bos_token"], flags["add_eos_token"]) == (True, False)
    assert report.tokenizer_from_base == [
        "tokenizer.model",
        "add_bos_token=true",
        "add_eos_token=false",
    ]
    assert ids(merged) == ids(adapter) == ids(base)
    assert all(row[0] == 1 for row in ids(merged))  # BOS, as training had it


def test_what_the_folder_has_is_never_replaced(tmp_path):
    base, adapter = build(tmp_path, "mistral")
    (base / "tekken.json").write_text("{}")
    (base / "cl100k.tiktoken").write_text("")
    (adapter / "tokenizer.model").write_bytes(b"the adapter's own")
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": False}))

    added = complete_tokenizer(base, adapter)

    assert added == ["cl100k.tiktoken", "tekken.json", "add_bos_token=true"]
    assert (adapter / "tokenizer.model").read_bytes() == b"the adapter's own"
    pinned = json.loads((adapter / "tokenizer_config.json").read_text())
    assert pinned == {**config, "add_eos_token": False, "add_bos_token": True}


def test_a_tokenizer_that_does_not_load_here_is_left_as_it_is(tmp_path):
    base, adapter = build(tmp_path, "mistral")
    (adapter / "tokenizer.model").write_bytes(b"")  # nothing to copy from the base
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    remote_code = {"tokenizer_class": "Custom", "auto_map": {"AutoTokenizer": ["t.Custom", None]}}
    custom = json.dumps({**config, **remote_code})  # loads only with trust_remote_code
    (adapter / "tokenizer_config.json").write_text(custom)

    [added] = complete_tokenizer(base, adapter)

    assert added.startswith("flags not pinned (") and "\n" not in added
    assert (adapter / "tokenizer_config.json").read_text() == custom


def test_nothing_is_added_that_changes_how_it_tokenizes(tmp_path, monkeypatch):
    """Were the base's tokenizer.model or a flag to change transformers' tokenization of the
    trained tokenizer, the folder is left as it was."""
    import transformers

    base, adapter = build(tmp_path, "mistral")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    load = transformers.AutoTokenizer.from_pretrained
    loads = []

    def load_then_split_otherwise(folder, *args, **kwargs):
        tokenizer = load(folder, *args, **kwargs)
        loads.append(folder)
        if len(loads) > 1:  # the folder as completed
            tokenizer.add_tokens(["Hello"])
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_then_split_otherwise)
    [added] = complete_tokenizer(base, adapter)

    assert added == (
        "not added: tokenizer.model, add_bos_token=true, add_eos_token=false "
        "(they change how transformers tokenizes)"
    )
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


@pytest.mark.skipif(gguf.toolchain_problem() is not None, reason=str(gguf.toolchain_problem()))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_gguf_of_the_merge_tokenizes_as_training_did(tmp_path, family):
    """Gemma's converter stops without tokenizer.model (what the merged folder held before);
    with it, llama.cpp splits text and adds BOS exactly as transformers did in training."""
    base, adapter = build(tmp_path, family)
    merge(str(base), adapter, tmp_path / "merged", dtype="float32")
    gguf.convert(tmp_path / "merged", tmp_path / "model.gguf", "f32")
    runner = gguf.LlamaCppRunner(tmp_path / "model.gguf", n_ctx=64)
    try:
        assert [runner.tokenize(text) for text in TEXTS] == ids(adapter)
    finally:
        runner.close()
    if family.startswith(
        "gemma"
    ):  # what the merged folder held before: the adapter's tokenizer files
        shutil.copytree(adapter, tmp_path / "as-saved")
        for file in (tmp_path / "merged").glob("*.safetensors"):
            shutil.copy2(file, tmp_path / "as-saved")
        shutil.copy2(tmp_path / "merged" / "config.json", tmp_path / "as-saved")
        # Gemma 1 and 2 need tokenizer.model; Gemma 3 falls to the BPE path and its hash.
        before = "pre-tokenizer" if family == "gemma3_text" else "not found: .*tokenizer.model"
        with pytest.raises(UserError, match=before):
            gguf.convert(tmp_path / "as-saved", tmp_path / "before.gguf", "f32")
