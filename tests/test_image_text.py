"""Checkpoints whose files name their tensors otherwise than transformers does in memory:
image-text checkpoints (Gemma 3 4B+, Mistral 3, Qwen3.5 loaded as a causal LM) and GPT-NeoX's
head. The adapter is keyed by the in-memory names; the merge writes into the file's names,
copies the towers byte for byte, and agrees with peft's forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from llm_finetune.backends.hf import lora_config
from llm_finetune.base_model import BaseModel
from llm_finetune.checkpoint_names import load_pretrained, model_class
from llm_finetune.exports import gguf
from llm_finetune.lora_targets import plan_lora_targets
from llm_finetune.merge import merge
from tests.conftest import tiny_config
from tests.test_lora_targets import DEFAULT
from tests.test_merge_layouts import save_tokenizer

VOCAB = 96
# Distinct sizes: hidden 64, MLP 96, the towers 32 / 48.
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)


def family_config(family: str):
    if family == "gemma3":
        return transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**TEXT, query_pre_attn_scalar=16),
            vision_config=transformers.SiglipVisionConfig(**TOWER, image_size=28, patch_size=14),
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
        )
    if family == "mistral3":
        return transformers.Mistral3Config(
            text_config=transformers.MistralConfig(**TEXT),
            vision_config=transformers.PixtralVisionConfig(
                **TOWER, image_size=28, patch_size=14, head_dim=16
            ),
            image_token_index=VOCAB - 1,
        )
    if family == "qwen3_5":
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14)
        # Its rotary sections sized for head_dim 16 (llama.cpp's default fits 256 only).
        rope = dict(rope_type="default", partial_rotary_factor=0.25, mrope_section=[1, 1, 0])
        return transformers.Qwen3_5Config(
            text_config=dict(
                **TEXT,
                layer_types=["linear_attention", "full_attention"],
                rope_parameters=dict(rope, rope_theta=1e4, mrope_interleaved=True),
            ),
            vision_config=dict(vision, out_hidden_size=64, spatial_merge_size=2),
            image_token_id=VOCAB - 1,
            video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3,
        )
    experts = dict(num_experts=4, moe_intermediate_size=48)  # hidden 64, a dense MLP 80
    if family == "qwen3_5_moe":  # Qwen3.5-35B-A3B's shape: linear attention, a shared expert
        config = family_config("qwen3_5")
        text = {k: v for k, v in config.text_config.to_dict().items() if k != "intermediate_size"}
        return transformers.Qwen3_5MoeConfig(
            text_config=dict(
                text, **experts, num_experts_per_tok=2, shared_expert_intermediate_size=80
            ),
            vision_config=config.vision_config.to_dict(),
            image_token_id=VOCAB - 1,
            video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3,
        )
    if family == "gemma4":  # Gemma 4 26B-A4B's shape: a dense MLP beside the experts
        text = dict(TEXT, intermediate_size=80, layer_types=["sliding_attention", "full_attention"])
        return transformers.Gemma4Config(
            text_config=dict(
                text,
                **experts,
                enable_moe_block=True,
                top_k_experts=2,
                num_global_key_value_heads=2,
                global_head_dim=32,
                vocab_size_per_layer_input=VOCAB,
                hidden_size_per_layer_input=16,
            ),
            vision_config=dict(TOWER, head_dim=16),
            audio_config=None,
            image_token_id=VOCAB - 1,
        )
    assert family == "gpt_neox"
    sizes = {k: TEXT[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    return transformers.GPTNeoXConfig(
        **sizes, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False
    )


# family -> (the class it is trained with, the class it is stored from, LoRA targets)
FAMILIES = {
    "gemma3": ("AutoModelForCausalLM", "AutoModelForImageTextToText", DEFAULT),
    "mistral3": ("AutoModelForImageTextToText", "AutoModelForImageTextToText", DEFAULT),
    "qwen3_5": ("AutoModelForCausalLM", "AutoModelForImageTextToText", DEFAULT),
    "gpt_neox": ("AutoModelForCausalLM", "AutoModelForCausalLM", ["query_key_value", "lm_head"]),
}


def stored_tensors(folder) -> dict[str, bytes]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k).flatten().view(torch.uint8).numpy().tobytes() for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


@pytest.mark.parametrize("family", FAMILIES)
def test_the_merge_writes_into_the_checkpoints_own_names(tmp_path, family):
    trained_with, stored_from, targets = FAMILIES[family]
    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    torch.manual_seed(0)
    getattr(transformers, stored_from).from_config(family_config(family)).save_pretrained(base)
    save_tokenizer(base)
    model = getattr(transformers, trained_with).from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = [k.removeprefix("base_model.model.") for k in f.keys() if ".lora_A." in k]  # noqa: SIM118
    adapted = {k.split(".lora_A.")[0] + ".weight" for k in keys}
    assert adapted - stored_tensors(base).keys()  # stored under other names

    report = merge(str(base), adapter, merged, dtype="float32")

    before, after = stored_tensors(base), stored_tensors(merged)
    assert before.keys() == after.keys()  # the file's names, the towers included
    changed = {k for k in before if before[k] != after[k]}
    assert len(changed) == report.lora_modules_merged == len(adapted)
    ids = torch.randint(0, VOCAB - 4, (2, 12))
    reference = PeftModel.from_pretrained(
        getattr(transformers, trained_with).from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    reloaded = load_pretrained(str(merged), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == type(reference.base_model.model).__name__
    with torch.no_grad():
        difference = (reference(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs()
    assert difference.max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_5_moe", "gemma4"])
@pytest.mark.parametrize("trained_with", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_lora_on_the_experts_of_an_image_text_checkpoint_merges(tmp_path, family, trained_with):
    """Experts under the language model, the adapter from either class (ours trains with the
    causal-LM one; Unsloth's vision path and others with the image-text one): merged into the
    file's names, towers untouched, equal to peft's forward pass."""
    from tests.test_moe import stored

    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(family_config(family)).save_pretrained(
        base, max_shard_size="300KB"
    )
    save_tokenizer(base)
    model = getattr(transformers, trained_with).from_pretrained(base, dtype=torch.float32)
    settings = lora_config(tiny_config(adapter, lora={"target_modules": DEFAULT}), model)
    settings.init_lora_weights = False
    get_peft_model(model, settings).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]

    report = merge(str(base), adapter, merged, dtype="float32")

    before, after = stored(base), stored(merged)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k].float(), after[k])}
    experts = {k for k in before if ".experts." in k}
    assert experts and experts <= changed
    assert all(k.startswith("model.language_model.") for k in changed)
    assert report.lora_modules_merged == report.lora_modules_found
    ids = torch.randint(0, VOCAB - 4, (2, 12))
    reference = PeftModel.from_pretrained(
        getattr(transformers, trained_with).from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    reloaded = load_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (reference(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs()
    assert difference.max().item() <= 1e-5


def test_mistral3_has_no_causal_lm_class_and_loads_as_image_text():
    assert model_class("mistral3").__name__ == "AutoModelForImageTextToText"
    assert model_class("gemma3").__name__ == "AutoModelForCausalLM"
    assert model_class("llama").__name__ == "AutoModelForCausalLM"


@pytest.mark.parametrize("family", ["gemma3", "mistral3"])
def test_training_puts_no_lora_on_the_vision_tower(tmp_path, family):
    """The default list names q_proj..down_proj, which the towers have too; text training
    never runs them, so their LoRA would stay untrained."""
    folder = tmp_path / family
    family_config(family).save_pretrained(folder)
    config = tiny_config(tmp_path, lora={"target_modules": DEFAULT})
    targets = plan_lora_targets(config, BaseModel(name=str(folder), path=str(folder)))
    assert targets.modules == 14  # 2 layers x 7 projections of the language model
    assert not targets.missed and not targets.warnings  # the towers are not "missed"
    model = model_class(family).from_config(family_config(family))
    model = get_peft_model(model, lora_config(config, model))
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    saved = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=str))
    assert "vision_tower" in saved["exclude_modules"]


def save_with_demo_tokenizer(folder: Path, family: str, tiny_base: str, dtype) -> Any:
    """A base of `family` that the demo's config trains: its tokenizer, chat template and
    vocabulary (llama.cpp's converter needs a real BPE tokenizer); return the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    config = family_config(family)
    config.text_config.vocab_size = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    for template in Path(tiny_base).glob("*.jinja"):
        shutil.copy2(template, folder)
    return tokenizer


@pytest.mark.slow
def test_a_mistral3_checkpoint_runs_end_to_end(tmp_path, tiny_base):
    """Mistral 3 has only an image-text class: it trains, merges, verifies, exports to GGUF,
    publishes and loads back with it; the vision tower and projector arrive unchanged."""
    from tests.test_pipeline import DEMO, cli

    base, out = tmp_path / "base", tmp_path / "out"
    save_with_demo_tokenizer(base, "mistral3", tiny_base, torch.bfloat16)  # bf16, as released

    done = cli(
        "run",
        str(DEMO),
        f"model.name={base}",
        f"output_dir={out}",
        "training.max_steps=30",
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["lora_targets"]["modules"] == 14 and not summary["lora_targets"]["missed"]
    assert [(e["format"], e["passed"]) for e in summary["exports"]] == [
        ("merged_16bit", True),
        ("lora", True),
        ("q8_0", True),
        ("q4_k_m", True),
    ]
    before, after = stored_tensors(base), stored_tensors(out / "merged")
    towers = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert towers and all(before[k] == after[k] for k in towers)
    assert (
        "AutoModelForImageTextToText.from_pretrained(" in (out / "merged" / "README.md").read_text()
    )


@pytest.mark.skipif(gguf.toolchain_problem() is not None, reason=str(gguf.toolchain_problem()))
@pytest.mark.parametrize("family", ["gemma3", "mistral3", "qwen3_5"])
def test_the_gguf_of_an_image_text_checkpoint_is_its_text_model(tmp_path, family, tiny_base):
    """llama.cpp converts the language model and leaves the towers out; Qwen3.5's converter
    wants its MTP layers, which transformers does not save: converted with --no-mtp."""
    tokenizer = save_with_demo_tokenizer(tmp_path / "model", family, tiny_base, torch.float32)
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "mtp" in k]  # noqa: SIM118

    gguf.convert(tmp_path / "model", tmp_path / "model.gguf", "f32", pre_tokenizer="qwen2")

    ids = tokenizer("Write the number 47 in words.")["input_ids"]
    with torch.no_grad():
        expected = load_pretrained(str(tmp_path / "model")).eval()(torch.tensor([ids])).logits[0]
    runner = gguf.LlamaCppRunner(tmp_path / "model.gguf", n_ctx=64)
    try:
        logits = torch.as_tensor(runner.logits(ids))
    finally:
        runner.close()
    assert (logits - expected).abs().max().item() < 1e-3
