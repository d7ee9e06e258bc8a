"""The bounded check: peft's adapter on a model accelerate streams block by block gives the
whole model's logits and generations, the mode follows the memory there is, and it holds
about one layer."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from llm_finetune.errors import UserError
from llm_finetune.merge import merge
from llm_finetune.verify import verify, verify_in_fresh_process
from llm_finetune.verify_loading import load_bounded, load_whole
from llm_finetune.verify_memory import (
    WeightsLayout,
    adapter_parameters,
    bounded_memory_needed,
    check_layout,
    folder_shapes,
    layout_of,
    lora_parameters,
    memory_needed,
    plan_memory,
)

PROMPTS = ["Write the number 47 in words.", "Convert 21 to words."]


def least_memory(base, adapter, merged) -> str:
    """The smallest verify.max_memory accepted: every block streamed, none resident."""
    return f"{bounded_memory_needed(check_layout(Path(base), Path(adapter), Path(merged)))}B"


def assert_same_check(whole, bounded) -> None:
    """The two modes agree: the same verdict, generations and texts, and the same figures
    within 1e-6 (a tied head is computed apart from the embedding when streamed)."""
    assert (whole.mode, bounded.mode) == ("whole", "bounded")
    close = ("max_abs_logit_diff", "logit_scale", "tolerance", "adapter_effect_max_abs_logit_diff")
    for key in close:
        assert getattr(bounded, key) == pytest.approx(getattr(whole, key), abs=1e-6), key
    exact = {key: getattr(whole, key) for key in close} | {"mode": "whole"}
    assert replace(bounded, **exact) == whole


def randomised_adapter(base: str, folder: Path, config: LoraConfig) -> Path:
    """An adapter of `config` on `base` with every weight random (B is zero when made)."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                magnitude = "magnitude" in name
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if magnitude else 0.0))
    model.save_pretrained(folder)
    return folder


def outputs(model, device, input_ids):
    """Logits with and without the adapter, and a greedy generation."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device)).logits.cpu()
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=torch.ones_like(input_ids).to(device),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        ).cpu()
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids.to(device)).logits.cpu()
    return logits, generated, base_logits


ADAPTERS = {
    "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True),
    "modules_to_save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embedding": LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("layout", ADAPTERS)
def test_peft_on_a_streamed_model_gives_the_whole_models_outputs(tiny_base, tmp_path, layout):
    """The crux: peft's forward, disable_adapter() and generate() on a model whose weights
    accelerate's hooks read block by block are the same, bit for bit, as on the whole model;
    with every block streamed, and with some resident."""
    adapter = randomised_adapter(tiny_base, tmp_path / "adapter", ADAPTERS[layout])
    input_ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = outputs(*load_whole(tiny_base, adapter), input_ids)
    assert float((expected[0] - expected[2]).abs().max()) > 1.0  # the adapter matters
    layout_ = layout_of(folder_shapes(Path(tiny_base)), adapter_parameters(adapter))
    least = bounded_memory_needed(layout_)
    # Some resident: halfway to what the whole model needs (the demo's two layers are each
    # nearly half of it, so only the embedding fits beside the streamed blocks).
    some_resident = (least + memory_needed(layout_)) // 2
    streamed = {}
    for budget in (least, some_resident):  # none resident, some resident
        plan = plan_memory(layout_, [], 10**12, f"{budget}B")
        assert plan.mode == "bounded"
        model, device = load_bounded(tiny_base, adapter, plan, tmp_path)
        names = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        streamed[budget] = len(names)
        for got, want in zip(outputs(model, device, input_ids), expected, strict=True):
            assert torch.equal(got, want)
    in_layers = [n for n, _ in model.named_parameters() if ".layers." in n and "lora_" not in n]
    assert streamed[least] >= len(in_layers) > 0 and streamed[least] > streamed[budget]
    assert list(tmp_path.iterdir()) == [tmp_path / "adapter"]  # nothing written to offload


def test_a_checkpoint_named_otherwise_than_the_model_goes_through_transformers(
    tmp_path, monkeypatch
):
    """GPT-2 checkpoints without the `transformer.` prefix load in transformers, which maps
    the names: the bounded check then takes transformers' own offload index."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config

    from llm_finetune import verify_loading
    from tests.test_merge_layouts import save_tokenizer

    by_transformers = verify_loading._meta_model_by_transformers
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return by_transformers(*args, **kwargs)

    monkeypatch.setattr(verify_loading, "_meta_model_by_transformers", counted)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    adapter = randomised_adapter(
        str(tmp_path / "base"), tmp_path / "adapter", LoraConfig(r=4, target_modules=["c_attn"])
    )
    merge(str(tmp_path / "base"), adapter, tmp_path / "merged", dtype="float32")
    for folder in (tmp_path / "base", tmp_path / "merged"):
        weights = load_file(folder / "model.safetensors")
        renamed = {k.removeprefix("transformer."): v for k, v in weights.items()}
        save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    whole = verify(str(tmp_path / "base"), adapter, tmp_path / "merged", PROMPTS, 3)
    least = least_memory(tmp_path / "base", adapter, tmp_path / "merged")
    bounded = verify(
        str(tmp_path / "base"), adapter, tmp_path / "merged", PROMPTS, 3, None, False, least
    )
    assert_same_check(whole, bounded)
    assert whole.passed and whole.adapter_effect_max_abs_logit_diff > 10 * whole.tolerance
    assert len(calls) == 2  # base and merged
    assert not list(tmp_path.glob(".verify-offload-*"))  # its converted weights are removed


# ---------------------------------------------------------------------------------------
# Which mode runs


LAYOUT = WeightsLayout(parameters=8_000_000_000, largest_block=525_000_000, adapter=42_000_000)
GB = 10**9


def test_the_whole_model_where_it_fits_else_block_by_block():
    whole = memory_needed(LAYOUT)  # 8B: 35 GB
    assert plan_memory(LAYOUT, [], whole).mode == "whole"
    assert plan_memory(LAYOUT, [24 * GB], 30 * GB).mode == "whole"  # the handbook's A10G box
    # ... unless the backend keeps the trained model beside the check (16 GB), or RAM is used.
    plan = plan_memory(LAYOUT, [24 * GB], 26 * GB, beside=16 * GB)
    assert plan.mode == "bounded" and plan.needed == bounded_memory_needed(LAYOUT)
    streaming = plan.needed - 4 * LAYOUT.largest_block  # beyond the block accelerate keeps free
    assert plan.max_memory == {0: 24 * GB, "cpu": 34 * GB - streaming - 24 * GB}
    # 70B QLoRA on one 80 GB GPU: 308 GB whole, so one layer at a time.
    big = WeightsLayout(70_600_000_000, 1_050_000_000, 200_000_000)
    assert plan_memory(big, [80 * GB], 200 * GB).mode == "bounded"
    # A cap under the whole model's need makes it bounded on the biggest machine.
    capped = plan_memory(LAYOUT, [80 * GB] * 8, 2000 * GB, "20GB")
    assert capped.mode == "bounded" and sum(capped.max_memory.values()) <= 20 * GB
    assert plan_memory(LAYOUT, [80 * GB] * 8, 2000 * GB, "40GB").mode == "whole"


def test_a_cap_smaller_than_one_layer_is_one_line_with_the_fix():
    with pytest.raises(UserError) as refused:
        plan_memory(LAYOUT, [80 * GB], 500 * GB, "2GB")
    message = str(refused.value)
    assert message.startswith(
        "verify.max_memory 2GB is smaller than one layer of the model (3.91 GB: "
    )
    assert message.endswith(
        "raise it to at least that, or remove it to use the memory the machine has"
    )
    assert "\n" not in message


def test_too_little_memory_for_even_one_layer_is_refused():
    with pytest.raises(UserError, match=r"needs at least 3.91 GB \(one layer .* 8,000 M param"):
        plan_memory(LAYOUT, [], 3 * GB)


def test_layers_are_blocks_and_the_adapters_size_is_estimated_before_training(trained_adapter):
    config, base, adapter, _ = trained_adapter
    shapes = folder_shapes(Path(base))
    layout = layout_of(shapes)
    layers = {}
    for name, shape in shapes:
        if ".layers." in name:
            layer = name.split(".layers.")[1].split(".")[0]
            layers[layer] = layers.get(layer, 0) + torch.Size(shape).numel()
    assert layout.largest_block == max(layers.values())  # a layer outweighs the embedding here
    estimate = lora_parameters(shapes, config.lora.r, config.lora.target_modules)
    assert estimate == adapter_parameters(adapter)
    assert lora_parameters(shapes, config.lora.r, "all-linear") == estimate  # all 7 in layers


def test_verify_max_memory_must_be_a_size(tmp_path):
    from tests.conftest import tiny_config

    assert tiny_config(tmp_path, verify={"max_memory": "1.5GiB"}).verify.max_memory == "1.5GiB"
    with pytest.raises(Exception, match="'lots' is not a memory size such as '24GB'"):
        tiny_config(tmp_path, verify={"max_memory": "lots"})


# ---------------------------------------------------------------------------------------
# What it reports, and what it costs


@pytest.fixture(scope="module")
def merged_bf16(trained_adapter, tmp_path_factory):
    _, base, adapter, _ = trained_adapter
    out = tmp_path_factory.mktemp("merged") / "bf16"
    merge(base, adapter, out, dtype="bfloat16")
    return base, adapter, out


def test_both_modes_report_the_same_figures_and_record_what_they_cost(merged_bf16):
    base, adapter, out = merged_bf16
    whole = verify(base, adapter, out, PROMPTS, max_new_tokens=4)
    least = least_memory(base, adapter, out)
    bounded = verify(base, adapter, out, PROMPTS, max_new_tokens=4, max_memory=least)
    assert_same_check(whole, bounded)
    for report in (whole, bounded):
        assert report.seconds > 0 and report.peak_ram_bytes > 100e6 and report.peak_gpu_bytes == 0
    # The child process takes the cap too.
    assert verify_in_fresh_process(base, adapter, out, PROMPTS, 4, max_memory=least) == bounded


def test_the_card_and_the_log_say_how_the_check_ran(merged_bf16, tmp_path):
    from llm_finetune.base_model import BaseModel
    from llm_finetune.card import card_rows
    from llm_finetune.verify import check_cost
    from tests.conftest import tiny_config

    base, adapter, out = merged_bf16
    report = verify(base, adapter, out, PROMPTS, 2, max_memory=least_memory(base, adapter, out))
    facts = report.as_dict()
    _, rows = card_rows(tiny_config(tmp_path), BaseModel(base, base), "hf", {"verify": facts})
    rows = dict(rows)
    assert rows["merge check: mode"] == "bounded (one layer at a time)"
    assert rows["merge check: peak memory"] == f"{report.peak_ram_bytes / 1e9:.2f} GB RAM"
    assert rows["merge check: seconds"] == report.seconds
    assert check_cost(facts).startswith("mode: bounded (one layer at a time), peak memory ")
    # A merge checked before the mode was recorded still has a card, without those rows.
    older = {k: v for k, v in facts.items() if k not in ("mode", "seconds", "peak_ram_bytes")}
    _, rows = card_rows(tiny_config(tmp_path), BaseModel(base, base), "hf", {"verify": older})
    assert not [k for k, _ in rows if "mode" in k or "peak" in k or "seconds" in k]


# VmHWM of a fresh process per mode: ru_maxrss survives exec, so a child of the large pytest
# process would report the parent's size.
PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch, transformers, peft, accelerate  # imported before the baseline is taken
from llm_finetune.verify import verify
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
baseline = hwm()
base, adapter, merged, cap = sys.argv[1:5]
report = verify(base, Path(adapter), Path(merged), ["one two three"], 4, max_memory=cap or None)
print(json.dumps({"grown": (hwm() - baseline) * 1024, "report": report.as_dict()}))
"""


@pytest.mark.slow
def test_the_bounded_check_holds_about_one_layer_and_stays_under_its_cap(tmp_path):
    from tests.test_merge_layouts import save_tokenizer

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="60MB")
    save_tokenizer(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "down_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    del model
    merge(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16")
    cap = least_memory(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    figures = {}
    for mode, limit in (("whole", ""), ("bounded", cap)):
        args = [str(tmp_path / p) for p in ("base", "adapter", "merged")]
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, *args, limit],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        assert figures[mode]["report"]["mode"] == mode
    whole, bounded = figures["whole"], figures["bounded"]
    assert replace_mode(bounded["report"]) == replace_mode(whole["report"])
    # ~640 MB of float32 weights whole; a layer is 50 MB, the cap ~0.4 GB.
    assert bounded["grown"] <= int(cap.removesuffix("B")), (bounded["grown"], cap)
    assert bounded["grown"] < 0.4 * whole["grown"], (bounded["grown"], whole["grown"])


def replace_mode(report: dict) -> dict:
    measured = ("mode", "seconds", "peak_ram_bytes", "peak_gpu_bytes")
    return {k: v for k, v in report.items() if k not in measured}
