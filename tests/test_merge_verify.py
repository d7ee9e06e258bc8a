"""The merge reproduces base+adapter, and verification catches a merge that does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_finetune.errors import UserError
from llm_finetune.merge import merge
from llm_finetune.verify import VerificationFailed, verify, verify_in_fresh_process
from tests.test_verify_bounded import least_memory

PROMPTS = ["Write the number 47 in words.", "Convert 21 to words."]


def _reference_logits(base: str, adapter, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.inference_mode():
        return peft_model(input_ids=input_ids).logits


def _merged_logits(folder, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def merged_bf16(trained_adapter, tmp_path_factory):
    _, base, adapter, _ = trained_adapter
    out = tmp_path_factory.mktemp("merged") / "bf16"
    report = merge(base, adapter, out, dtype="bfloat16")
    return base, adapter, out, report


def test_float32_merge_matches_peft_within_1e_4(trained_adapter, tmp_path):
    _, base, adapter, _ = trained_adapter
    out = tmp_path / "fp32"
    merge(base, adapter, out, dtype="float32")
    input_ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = (_reference_logits(base, adapter, input_ids) - _merged_logits(out, input_ids)).abs()
    assert float(diff.max()) < 1e-4


def test_bf16_merge_is_within_bf16_rounding(merged_bf16):
    base, adapter, out, report = merged_bf16
    layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    assert report.lora_modules_merged == layers * 7  # 7 target modules per layer
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    input_ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = _reference_logits(base, adapter, input_ids)
    diff = float((reference - _merged_logits(out, input_ids)).abs().max())
    scale = float(reference.abs().max())
    assert 0 < diff <= 2e-2 * scale  # rounding only: far below the logits' scale


def test_merged_folder_is_complete_and_eos_agrees(merged_bf16):
    _, _, out, _ = merged_bf16
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    eos_ids = generation["eos_token_id"]
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    assert config["eos_token_id"] in eos_ids
    assert tokenizer_config["eos_token"] == "</s>"
    assert not any(n.startswith(".") for n in names)


def test_verify_passes_and_measures_adapter_effect(merged_bf16):
    base, adapter, out, _ = merged_bf16
    report = verify(base, adapter, out, PROMPTS, max_new_tokens=4)
    assert report.passed and report.dtype == "bfloat16"
    assert 0 < report.max_abs_logit_diff <= report.tolerance
    assert report.adapter_effect_max_abs_logit_diff > 10 * report.tolerance
    assert report.generations_agree == len(PROMPTS)
    assert report.eos_consistent
    assert report.mode == "whole"  # the machine has the memory: the faster way


@pytest.mark.parametrize("mode", ["whole", "bounded"])
def test_verify_holds_one_model_at_a_time(merged_bf16, monkeypatch, mode):
    """base+adapter is freed before the merged model loads: peak memory is one fp32 model,
    or one block of it."""
    import weakref

    from llm_finetune import verify as verify_module

    base, adapter, out, _ = merged_bf16
    name = "load_whole" if mode == "whole" else "load_bounded"
    load = getattr(verify_module, name)
    loaded: list[weakref.ref] = []

    def load_and_count(path, *args, **kwargs):
        alive = [ref for ref in loaded if ref() is not None]
        assert not alive, "the previous model is still in memory"
        model, device = load(path, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, device

    monkeypatch.setattr(verify_module, name, load_and_count)
    cap = None if mode == "whole" else least_memory(base, adapter, out)
    assert verify(base, adapter, out, PROMPTS, max_new_tokens=2, max_memory=cap).mode == mode
    assert len(loaded) == 2


@pytest.mark.parametrize("mode", ["whole", "bounded"])
@pytest.mark.parametrize("check", [verify, verify_in_fresh_process])
def test_verify_catches_a_wrong_merge(merged_bf16, tmp_path, check, mode):
    base, adapter, out, _ = merged_bf16
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = load_file(broken / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = (weights[key].float() + 0.5).to(torch.bfloat16)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    cap = None if mode == "whole" else least_memory(base, adapter, broken)
    with pytest.raises(VerificationFailed, match="differs from base\\+adapter"):
        check(base, adapter, broken, PROMPTS, max_new_tokens=2, max_memory=cap)


def test_verify_in_a_fresh_process_reports_the_same(merged_bf16, tmp_path):
    """What the pipeline runs for the unsloth backend, whose process Unsloth has patched."""
    base, adapter, out, _ = merged_bf16
    here = verify(base, adapter, out, PROMPTS, max_new_tokens=4)
    assert verify_in_fresh_process(base, adapter, out, PROMPTS, max_new_tokens=4) == here
    with pytest.raises(UserError, match="not a model folder"):  # a refusal, not a crash
        verify_in_fresh_process(base, adapter, tmp_path, PROMPTS)
    with pytest.raises(RuntimeError, match="verification process failed"):
        verify_in_fresh_process(base, tmp_path / "no-adapter", out, PROMPTS)


def test_untrained_adapter_shows_no_effect(tiny_base, tmp_path):
    """An adapter that changes nothing is measured as such, not silently passed off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "zero"
    )
    merge(tiny_base, tmp_path / "zero", tmp_path / "merged", dtype="float32")
    report = verify(tiny_base, tmp_path / "zero", tmp_path / "merged", PROMPTS, max_new_tokens=2)
    assert report.adapter_effect_max_abs_logit_diff == 0.0


def test_merge_refuses_existing_output_unless_overwrite(trained_adapter, tmp_path):
    _, base, adapter, _ = trained_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        merge(base, adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(base, adapter, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_merge_refuses_quantized_base_and_non_adapter(trained_adapter, tmp_path):
    _, base, adapter, _ = trained_adapter
    quantized = tmp_path / "quantized"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="original 16-bit base"):
        merge(str(quantized), adapter, tmp_path / "out")
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        merge(base, tmp_path, tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_failed_merge_leaves_nothing_half_written(trained_adapter, tmp_path, monkeypatch):
    """A crash after the shards are written (here: writing config.json) leaves no folder."""
    import llm_finetune.merge as merge_module

    _, base, adapter, _ = trained_adapter

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "_write_config_and_generation", crash)
    with pytest.raises(OSError, match="disk full"):
        merge(base, adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_config_and_generation_config_are_written_once(trained_adapter, tmp_path, monkeypatch):
    """Made whole in memory (dtype, EOS fixes) and written once: nothing earlier to rewrite."""
    import llm_finetune.merge as merge_module

    _, base, adapter, _ = trained_adapter
    write = merge_module._write_config_and_generation
    writes = []

    def write_once(folder, config, generation):
        writes.append(sorted(p.name for p in folder.iterdir() if p.name.endswith("config.json")))
        write(folder, config, generation)

    monkeypatch.setattr(merge_module, "_write_config_and_generation", write_once)
    merge(base, adapter, tmp_path / "merged")
    assert writes == [["tokenizer_config.json"]]  # no config.json nor generation_config.json yet


def test_a_folder_written_elsewhere_gets_the_tokenizers_eos(tmp_path):
    """Unsloth's merged folder: generation must stop on the EOS the model was trained with."""
    from llm_finetune.merge import align_eos_in_folder

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    fixes = align_eos_in_folder(tmp_path, eos_id=2, pad_id=0)
    assert fixes == [
        "generation_config.eos_token_id += 2 (the tokenizer's EOS)",
        "generation_config.pad_token_id = 0",
    ]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [3, 2], "pad_token_id": 0}
    assert align_eos_in_folder(tmp_path, eos_id=2, pad_id=0) == []  # nothing left to fix
