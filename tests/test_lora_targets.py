"""What LoRA lands on, worked out in the preflight from config.json alone (the model built on
the meta device): the families whose targets peft rewrites or the default list misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from llm_finetune.base_model import BaseModel
from llm_finetune.config import Config
from llm_finetune.errors import UserError
from llm_finetune.lora_targets import check_lora_targets, kind_of, plan_lora_targets
from tests.conftest import tiny_config

DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = dict(num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
# Distinct sizes: hidden 64, dense MLP 96, each expert 48.
FAMILIES = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, pad_token_id=0),
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        head_dim=32,
    ),
    "mixtral": dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_hidden_layers=2),
    "gpt_oss": dict(
        hidden_size=64,
        intermediate_size=48,
        num_local_experts=4,
        num_hidden_layers=2,
        head_dim=32,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


def base_config(tmp_path, family: str) -> BaseModel:
    """A base folder with only config.json: the plan reads no weights."""
    folder = tmp_path / family
    AutoConfig.for_model(family, **ATTENTION, **FAMILIES[family]).save_pretrained(folder)
    return BaseModel(name=str(folder), path=str(folder))


def run_config(target_modules) -> Config:
    return tiny_config(Path("unused"), lora={"target_modules": target_modules})


def test_a_dense_family_is_described_by_kind(tmp_path):
    targets, lines = check_lora_targets(run_config(DEFAULT), base_config(tmp_path, "llama"))
    assert targets.touched == {
        "attention": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "MLP": ["down_proj", "gate_proj", "up_proj"],
    }
    assert targets.modules == 14 and not targets.parameters and not targets.warnings
    assert lines == [
        "LoRA on this llama: 14 modules: attention k_proj, o_proj, q_proj, v_proj; "
        "MLP down_proj, gate_proj, up_proj"
    ]


def test_fused_projections_the_default_list_misses_are_a_warning(tmp_path):
    """Phi-3: the default list reaches o_proj and down_proj only."""
    targets, lines = check_lora_targets(run_config(DEFAULT), base_config(tmp_path, "phi3"))
    assert targets.touched == {"attention": ["o_proj"], "MLP": ["down_proj"]}
    assert targets.missed == {"attention": ["qkv_proj"], "MLP": ["gate_up_proj"]}
    assert lines[1] == (
        "warning: lora.target_modules names gate_proj, k_proj, q_proj, up_proj, v_proj, which "
        "this phi3 does not have, and its qkv_proj, gate_up_proj get no LoRA: add them to "
        "lora.target_modules, or use all-linear"
    )
    fixed = run_config(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    assert not plan_lora_targets(fixed, base_config(tmp_path, "phi3")).warnings


@pytest.mark.parametrize(
    ("family", "target_modules", "touched"),
    [
        ("qwen3_moe", DEFAULT, {"attention", "experts"}),
        ("mixtral", "all-linear", {"attention", "experts"}),  # the router left out
        ("mixtral", ["q_proj", "gate", "w1", "w2", "w3"], {"attention", "experts", "router"}),
        ("gpt_oss", DEFAULT, {"attention", "experts"}),  # as Unsloth maps the MLP names
        ("gpt_oss", "all-linear", {"attention", "experts"}),
    ],
)
def test_lora_on_fused_experts_is_described_and_merges(tmp_path, family, target_modules, touched):
    targets = plan_lora_targets(run_config(target_modules), base_config(tmp_path, family))
    assert set(targets.touched) == touched and not targets.warnings
    assert targets.touched["experts"] == ["down_proj", "gate_up_proj"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in targets.parameters


def test_the_dense_layers_peft_leaves_out_of_an_moe_are_a_warning(tmp_path):
    folder = tmp_path / "qwen3_moe"
    sizes = {**FAMILIES["qwen3_moe"], "mlp_only_layers": [1]}
    AutoConfig.for_model("qwen3_moe", **ATTENTION, **sizes).save_pretrained(folder)
    base = BaseModel(name=str(folder), path=str(folder))
    targets = plan_lora_targets(run_config(DEFAULT), base)
    assert targets.warnings == [
        "peft moves the MLP names of this qwen3_moe onto its experts' fused tensors, so its "
        "dense MLP layers and shared experts (down_proj, gate_proj, up_proj) get no LoRA and "
        "keep their base weights"
    ]


def test_experts_no_target_reaches_are_a_warning(tmp_path):
    """gpt-oss: an MLP name that is not one of its experts' reaches attention only."""
    targets = plan_lora_targets(run_config(["q_proj", "w1"]), base_config(tmp_path, "gpt_oss"))
    assert "experts" not in targets.touched
    assert targets.warnings[-1] == (
        "the experts of this gpt_oss are fused tensors, which lora.target_modules does not "
        "reach: only attention and the dense layers are trained"
    )


def test_a_list_that_matches_nothing_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^lora.target_modules: Target modules \{'nope'\}"):
        plan_lora_targets(run_config(["nope"]), base_config(tmp_path, "llama"))


def test_a_model_that_cannot_be_built_here_is_left_to_training(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    targets, [line] = check_lora_targets(
        run_config(DEFAULT), BaseModel(name=str(folder), path=str(folder))
    )
    assert targets is None and line.startswith("LoRA targets not worked out before training (")


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("model.layers.0.self_attn.q_proj", "attention"),
        ("model.layers.0.mlp.gate_proj", "MLP"),
        ("model.layers.0.mlp.experts.gate_up_proj", "experts"),
        ("model.layers.0.block_sparse_moe.experts.3.w1", "experts"),
        ("model.layers.0.mlp.gate", "router"),
        ("model.layers.0.mlp.shared_expert_gate", "router"),
        ("model.layers.0.mlp.shared_expert.up_proj", "MLP"),
        ("model.embed_tokens", "embeddings"),
        ("lm_head", "head"),
        ("transformer.h.0.attn.c_attn", "attention"),
    ],
)
def test_kinds(path, kind):
    assert kind_of(path) == kind


# Each shipped config -> its family and what its target list must train there.
SHIPPED = {
    "llama-3.1-8b": ("llama", {"attention", "MLP"}),
    "qwen3-8b": ("qwen3", {"attention", "MLP"}),
    "qwen3-30b-a3b": ("qwen3_moe", {"attention", "experts"}),
    "gemma-3-4b": ("gemma3", {"attention", "MLP"}),
    "mistral-7b": ("mistral", {"attention", "MLP"}),
    "phi-4": ("phi3", {"attention", "MLP"}),
    "gpt-oss-20b": ("gpt_oss", {"attention", "experts"}),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_configs_targets_train_its_family(tmp_path, monkeypatch, name):
    """On a tiny model of the family: nothing missed, no warning, the kinds it should train."""
    from llm_finetune.config import load_config

    family, kinds = SHIPPED[name]
    monkeypatch.setenv("HF_USERNAME", "you")
    config = load_config(Path(f"configs/{name}/sft.yaml"))
    folder = tmp_path / family
    if family == "gemma3":  # an image-text checkpoint, as google/gemma-3-4b-it
        from tests.test_image_text import family_config

        family_config("gemma3").save_pretrained(folder)
    else:
        sizes = FAMILIES.get(family, FAMILIES["llama"])
        AutoConfig.for_model(family, **ATTENTION, **sizes).save_pretrained(folder)
    targets = plan_lora_targets(config, BaseModel(name=str(folder), path=str(folder)))
    assert set(targets.touched) == kinds
    assert not targets.missed and not targets.warnings and not targets.unmatched
