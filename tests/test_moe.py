"""LoRA on MoE experts (peft's target_parameters on transformers 5's fused expert tensors),
merged into the checkpoint's own layout: per-expert tensors (Qwen-MoE, Qwen3.5-MoE, OLMoE,
DeepSeek-V3, GLM-4.5, Mixtral's w1/w3/w2) with gate_up_proj split back into gate and up, or
fused tensors (gpt-oss, Gemma 4, Llama 4, GraniteMoE's renamed ones),
the rank and alpha peft doubles for gate_up_proj honoured. Checked against peft's forward pass.

Sizes are distinct (hidden 64, each expert 48, gate_up 96, a dense MLP 80) so that a transposed
or mixed-up expert, or gate swapped with up, cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from llm_finetune.backends.hf import lora_config
from llm_finetune.errors import UserError
from llm_finetune.merge import merge, read_adapter_for
from llm_finetune.parameter_lora import check_foldable
from tests.conftest import tiny_config
from tests.test_command_inputs import assert_one_error, run_cli
from tests.test_lora_targets import DEFAULT

VOCAB = 128
ATTENTION = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2)
# DeepSeek-V3's and GLM-4.5's layout: a dense first layer, then a shared and 4 routed experts
DENSE_SHARED_ROUTED = dict(
    intermediate_size=80,
    moe_intermediate_size=48,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
# name -> (model_type, its config, lora.target_modules, what the adapter touches besides
# attention and the experts)
FAMILIES = {
    "qwen3_moe, a dense layer": (
        "qwen3_moe",
        dict(intermediate_size=80, moe_intermediate_size=48, mlp_only_layers=[1], **EXPERTS),
        DEFAULT,
        set(),
    ),
    "qwen2_moe, a shared expert": (
        "qwen2_moe",
        dict(
            intermediate_size=80,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            **EXPERTS,
        ),
        DEFAULT,
        set(),
    ),
    "olmoe": ("olmoe", dict(intermediate_size=48, **EXPERTS), DEFAULT, set()),
    "deepseek_v3, dense + shared + routed": (
        "deepseek_v3",
        dict(
            **DENSE_SHARED_ROUTED,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,  # its rotary part
        ),
        "all-linear",
        {"mlp"},  # the dense layer's and the shared expert's Linear layers
    ),
    "mixtral, all-linear": (
        "mixtral",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "all-linear",
        set(),  # the router left out
    ),
    "mixtral, the router named": (
        "mixtral",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        ["q_proj", "v_proj", "gate", "w1", "w2", "w3"],
        {"gate"},
    ),
    "phimoe, renamed on load": (
        "phimoe",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "all-linear",
        set(),
    ),
    "glm4_moe (GLM-4.5), dense + shared + routed": (
        "glm4_moe",
        DENSE_SHARED_ROUTED,
        "all-linear",
        {"mlp"},
    ),
    "qwen3_5_moe text, linear attention + shared expert": (
        "qwen3_5_moe_text",
        dict(
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            **EXPERTS,
        ),
        DEFAULT,
        set(),
    ),
    "gemma4 text, a dense MLP beside the experts": (
        "gemma4_text",
        dict(
            intermediate_size=80,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=48,
            layer_types=["sliding_attention", "full_attention"],
            num_global_key_value_heads=2,
            global_head_dim=32,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=16,
        ),
        DEFAULT,
        {"mlp"},
    ),
    "granitemoe, fused and renamed on disk": (
        "granitemoe",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        DEFAULT,
        set(),
    ),
    "llama4 text, a shared expert": (
        "llama4_text",
        dict(
            intermediate_size=48,
            intermediate_size_mlp=80,
            num_local_experts=4,
            num_experts_per_tok=1,
            moe_layers=[0, 1],
            layer_types=["chunked_attention", "full_attention"],
        ),
        DEFAULT,
        set(),
    ),
    "gpt_oss in bf16": (
        "gpt_oss",
        dict(
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
        DEFAULT,
        set(),
    ),
}


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def moe_base(folder: Path, family: str, dtype=torch.float32, **changes) -> None:
    """A random `family` base in several shards (an expert's tensors spread over them)."""
    model_type, sizes, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**ATTENTION, **sizes, **changes})
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(
        folder, max_shard_size="200KB"
    )


def trainable_moe_base(folder: Path, family: str, tiny_base: str, dtype=torch.float32, **changes):
    """A `family` base that the demo's config trains: the demo's tokenizer and chat template,
    the vocabulary and special tokens sized to them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    specials = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    moe_base(folder, family, dtype, vocab_size=len(tokenizer), **specials, **changes)
    tokenizer.save_pretrained(folder)
    for template in Path(tiny_base).glob("*.jinja"):
        (folder / template.name).write_bytes(template.read_bytes())


def moe_adapter(base: Path, folder: Path, family: str) -> dict:
    """LoRA as training makes it (the hf backend's settings), random B so it changes the
    model; returns its adapter_config.json."""
    _, _, targets, _ = FAMILIES[family]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = lora_config(tiny_config(folder, lora={"target_modules": targets}), model)
    settings.init_lora_weights = False
    get_peft_model(model, settings).save_pretrained(folder)
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_experts_merges_into_the_checkpoints_layout(tmp_path, family):
    model_type, _, _, also = FAMILIES[family]
    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    moe_base(base, family, torch.bfloat16 if model_type == "gpt_oss" else torch.float32)
    assert len(list(base.glob("*.safetensors"))) > 1
    saved = moe_adapter(base, adapter, family)
    assert {p.rsplit(".", 1)[-1] for p in saved["target_parameters"]} >= {
        "gate_up_proj",
        "down_proj",
    }

    report = merge(str(base), adapter, merged, dtype="float32")

    before, after = stored(base), stored(merged)
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    changed = {k for k in before if not torch.equal(before[k].float(), after[k])}
    granite = ("input_linear.weight", "output_linear.weight")  # its fused experts, on disk
    experts = {k for k in before if (".experts." in k or k.endswith(granite)) and "bias" not in k}
    assert experts and experts <= changed  # every expert, gate and up and down
    routers = {k for k in before if k.endswith((".gate.weight", ".router.weight"))}
    assert bool(routers & changed) == ("gate" in also)
    assert report.lora_modules_merged == report.lora_modules_found
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    unmerged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        difference = (expected - reloaded(input_ids=ids).logits).abs().max().item()
        moved = (expected - unmerged(input_ids=ids).logits).abs().max().item()
    assert difference <= 1e-5 and moved > 1e-2


def test_the_rank_and_alpha_peft_doubles_for_gate_up_are_used(tmp_path):
    """peft writes rank_pattern/alpha_pattern 2r/2α for the fused gate_up_proj: the same scale
    alpha/r, with twice the rank; merged at alpha/r, not 2α/r or α/2r."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    moe_base(base, "olmoe")
    saved = moe_adapter(base, adapter, "olmoe")
    r, alpha = saved["r"], saved["lora_alpha"]
    assert saved["rank_pattern"] == {r".*\.gate_up_proj": 2 * r}
    assert saved["alpha_pattern"] == {r".*\.gate_up_proj": 2 * alpha}
    loras = read_adapter_for(adapter, base).parameters
    gate_up = loras["model.layers.0.mlp.experts.gate_up_proj"]
    down = loras["model.layers.0.mlp.experts.down_proj"]
    assert gate_up.lora_a.shape == (2 * r * 4, 64) and down.lora_a.shape == (r * 4, 48)
    assert gate_up.wrapper.scale == down.wrapper.scale == alpha / r


def test_an_adapter_for_other_experts_is_one_line_and_writes_nothing(tmp_path, capsys):
    base, other, adapter = tmp_path / "base", tmp_path / "other", tmp_path / "adapter"
    moe_base(base, "olmoe")
    moe_base(other, "olmoe", num_experts=8)
    moe_adapter(other, adapter, "olmoe")
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--output"]

    code, _, err = run_cli([*argv, str(tmp_path / "merged")], capsys)

    assert code == 2
    assert_one_error(
        err,
        r"model.layers.0.mlp.experts(.base_layer)? has LoRA weights of shapes .* where peft "
        r"makes .* for model.layers.0.mlp.experts.(gate_up|down)_proj of this base",
    )
    assert not (tmp_path / "merged").exists()


def test_a_checkpoint_missing_an_expert_is_one_line(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    moe_base(base, "olmoe")
    moe_adapter(base, adapter, "olmoe")
    missing = "model.layers.1.mlp.experts.3.up_proj.weight"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"].pop(missing)
    tensors = {k: v for k, v in stored(base).items() if index["weight_map"].get(k) == shard.name}
    save_file(tensors, shard, metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(UserError, match=r"^LoRA on model.layers.1.mlp.experts.gate_up_proj: the "):
        merge(str(base), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_conversion_the_merge_cannot_read_backwards_is_refused_before_training(
    tmp_path, monkeypatch
):
    """Experts that transformers loads with, say, Interleave are refused in the preflight."""
    import importlib

    from transformers.core_model_loading import Interleave, WeightConverter

    def interleaved(model):
        return [WeightConverter("mlp.experts.w13", "mlp.experts.gate_up_proj", [Interleave(1)])]

    mapping = importlib.import_module("transformers.conversion_mapping")
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", interleaved)
    with pytest.raises(UserError) as refused:
        check_foldable(None, ["model.layers.0.mlp.experts.gate_up_proj"])
    assert str(refused.value) == (
        "LoRA on model.layers.0.mlp.experts.gate_up_proj: transformers loads it from the "
        "checkpoint with Interleave, which the merge cannot fold back; leave it out of "
        "lora.target_modules (train attention only)"
    )


@pytest.mark.slow
def test_a_qwen3_moe_runs_end_to_end_with_the_default_targets(tmp_path, tiny_base, capsys):
    """Trains attention and the experts, merges, verifies, exports (GGUF included), publishes."""
    folder, out = tmp_path / "qwen3_moe", tmp_path / "out"
    family = "qwen3_moe, a dense layer"
    trainable_moe_base(folder, family, tiny_base, torch.bfloat16, mlp_only_layers=[])

    code, out_text, err = run_cli(
        [
            "run",
            "configs/tiny-llama/sft.yaml",
            f"model.name={folder}",
            f"output_dir={out}",
            "training.max_steps=30",
            # The demo's former rate: at the demo's 3e-3 this tiny bf16 MoE's merge check
            # measures max |Δlogit| 0.0456 against a tolerance of 0.0285 (logit scale 1.4, the
            # tolerance's floor), a bf16 rounding margin the check has to be measured for.
            "training.learning_rate=5e-3",
        ],
        capsys,
    )

    assert code == 0, err[-3000:]
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["lora_targets"]["touched"]["experts"] == ["down_proj", "gate_up_proj"]
    assert [(e["format"], e["passed"]) for e in summary["exports"]] == [
        ("merged_16bit", True),
        ("lora", True),
        ("q8_0", True),
        ("q4_k_m", True),
    ]


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        (
            {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
            r"stores its experts in MXFP4, gpt-oss's release format; LoRA is merged into "
            r"16-bit weights: pass a bf16 copy \(unsloth/gpt-oss-20b-BF16",
        ),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            r"is a quantized checkpoint; .* pass the original 16-bit base model instead",
        ),
    ],
)
def test_a_quantized_base_is_refused_before_training(tmp_path, capsys, quantization, message):
    """gpt-oss as released (MXFP4), or a pre-quantized repo: one line, nothing trained."""
    base = tmp_path / "gpt-oss"
    moe_base(base, "gpt_oss in bf16", torch.bfloat16)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))

    code, _, err = run_cli(
        [
            "run",
            "configs/tiny-llama/sft.yaml",
            f"model.name={base}",
            f"output_dir={tmp_path / 'out'}",
            "publish.enabled=false",
            "export.formats=[merged_16bit]",
        ],
        capsys,
    )

    assert code == 2
    assert_one_error(err, message)
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("family", ["qwen3_moe, a dense layer", "gpt_oss in bf16"])
def test_both_verification_modes_agree_on_an_moe_merge(tmp_path, tiny_base, family):
    """Whole, and streamed block by block with peft's wrappers on the offloaded experts."""
    from transformers import AutoTokenizer

    from llm_finetune.verify import verify
    from tests.test_verify_bounded import PROMPTS, assert_same_check, least_memory

    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    moe_base(base, family, torch.bfloat16, vocab_size=len(tokenizer))
    moe_adapter(base, adapter, family)
    for folder in (base, adapter):
        tokenizer.save_pretrained(folder)
    merge(str(base), adapter, merged, dtype="bfloat16")

    whole = verify(str(base), adapter, merged, PROMPTS, max_new_tokens=4)
    least = least_memory(base, adapter, merged)
    bounded = verify(str(base), adapter, merged, PROMPTS, max_new_tokens=4, max_memory=least)

    assert whole.passed and whole.routing_agreement is not None  # the routing was recorded
    assert_same_check(whole, bounded)


def _rerouted_copy(base: Path, merged: Path, tokens: torch.Tensor) -> int:
    """`merged`: `base` with its last router nudged so that exactly one of `tokens` goes to
    another expert, as 16-bit rounding of a merge can flip a near-tie; returns that token."""
    import shutil

    shutil.copytree(base, merged)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    router = model.model.layers[-1].mlp.gate
    inputs = []
    router.register_forward_hook(lambda module, args, out: inputs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(input_ids=tokens)
    hidden = inputs[0]  # tokens x hidden, fewer tokens than dimensions
    logits = hidden @ router.weight.T
    ranked = logits.sort(dim=-1, descending=True)
    gaps = ranked.values[:, 1] - ranked.values[:, 2]  # top-2 of 4
    token = int(gaps.argmin())
    outside = int(ranked.indices[token, 2])
    only_this_token = torch.linalg.pinv(hidden)[:, token]  # h_s . v = 1 for s = token, else 0
    weights = stored(base)
    key = "model.layers.1.mlp.gate.weight"
    weights[key] = weights[key].clone()
    weights[key][outside] += (gaps[token] + 0.5) * only_this_token
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    return token


def test_verify_leaves_out_a_token_that_rounding_sends_to_other_experts(tmp_path, tiny_base):
    """A merged MoE differs from base+adapter by rounding, which can flip a near-tie between
    two experts: that token's logits jump by far more than the tolerance. verify compares the
    tokens routed alike and counts the others; a merge that reroutes most tokens fails."""
    from transformers import AutoTokenizer

    from llm_finetune.verify import VerificationFailed, verify

    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    sharded = tmp_path / "sharded"
    moe_base(
        sharded,
        "qwen3_moe, a dense layer",
        vocab_size=len(tokenizer),
        mlp_only_layers=[],
        initializer_range=0.2,  # experts that matter
    )
    AutoModelForCausalLM.from_pretrained(sharded).save_pretrained(base)  # one file to rewrite
    tokenizer.save_pretrained(base)
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = "Write 47."
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        sequence = reference.generate(ids, max_new_tokens=4, do_sample=False)
    token = _rerouted_copy(base, merged, sequence)
    adapter_model = get_peft_model(reference, lora_config(tiny_config(tmp_path), reference))
    adapter_model.save_pretrained(adapter)  # B = 0: base+adapter is the base
    with torch.no_grad():
        rerouted = AutoModelForCausalLM.from_pretrained(merged).eval()(sequence).logits[0]
        jump = (rerouted - reference(sequence).logits[0]).abs().max(dim=-1).values
    assert token < ids.shape[1]  # a prompt token, which verify compares
    assert jump[token] > 0.05 and jump.max() == jump[token]

    report = verify(str(base), adapter, merged, [prompt], max_new_tokens=4)

    assert report.passed and report.rerouted_tokens == 1
    assert report.max_abs_logit_diff <= report.tolerance < jump[token]
    assert report.routing_agreement == 1 - 1 / (2 * ids.shape[1])
    weights = stored(merged)
    key = "model.layers.1.mlp.gate.weight"
    weights[key] = weights[key].roll(1, dims=0)  # a broken router: every token elsewhere
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationFailed, match="^merged model differs from base"):
        verify(str(base), adapter, merged, [prompt], max_new_tokens=4)
