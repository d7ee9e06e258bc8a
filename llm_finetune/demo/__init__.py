"""The embedded demo: a tiny Llama and its tokenizer, built locally (no download) and cached.

`builtin:tiny-llama` in a config resolves here. The tokenizer is a byte-level BPE trained on
the bundled dataset, with BOS/EOS/PAD and a chat template. Its pre-tokenizer is Qwen2's,
regex for regex (digits split one by one, so the number-to-words task is learnable by a tiny
model), so llama.cpp, told `qwen2`, tokenizes exactly as transformers does. The model has
random weights saved in bfloat16, the "16-bit base" that the demo merges into; its matrices'
rows are multiples of 256, so GGUF K-quants (q4_k_m, q6_k) really apply to them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llm_finetune.data import ALPACA_TEMPLATE, BUILTIN_DIR

TINY_LLAMA_VERSION = "tiny-llama-v3"
BUILTIN_MODELS = ("tiny-llama",)
LM_HEAD_SCALE = 5.0  # the head's random weights, relative to the rest (build_tiny_llama)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer regex, as in its tokenizer.json (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER = "qwen2"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def cache_root() -> Path:
    return Path(os.environ.get("LLM_FINETUNE_CACHE", Path.home() / ".cache" / "llm-finetune"))


def resolve_builtin_model(name: str) -> Path:
    """Path of a builtin model, building it on first use (atomically, so a crash leaves none)."""
    short = name.removeprefix("builtin:")
    if short not in BUILTIN_MODELS:
        from llm_finetune.errors import UserError

        raise UserError(f"unknown builtin model {name!r}; builtin: {list(BUILTIN_MODELS)}")
    target = cache_root() / TINY_LLAMA_VERSION
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        build_tiny_llama(staging)
        with contextlib.suppress(OSError):  # another process built it first
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _training_corpus() -> list[str]:
    rows = [json.loads(line) for line in (BUILTIN_DIR / "number_words.jsonl").open()]
    return [ALPACA_TEMPLATE.format(r["instruction"], r["output"]) for r in rows]


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the bundled dataset, with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(tokenizer: Any) -> Any:
    """The demo's LlamaConfig: every matrix row a multiple of 256 (GGUF K-quant blocks)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def build_tiny_llama(folder: Path, seed: int = 0) -> None:
    """Write a ~2M-parameter Llama (bf16 safetensors), its tokenizer and generation config."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    with torch.no_grad():
        # The head 5x the rest (std 0.1): with 0.02 throughout, the frozen head's logits span
        # too little for a confident answer (held-out loss stalls near 1.7); with 0.1
        # throughout, the random layers drown the tokens and LoRA learns few numbers
        # (exact match 12.5% on the held-out rows, against 97.5-100% now).
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
