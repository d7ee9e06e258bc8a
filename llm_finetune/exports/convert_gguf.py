"""llama.cpp's own `convert_hf_to_gguf.py`, run with one change: a BPE tokenizer whose
pre-tokenizer llama.cpp does not recognise gets the name the user declared.

The converter identifies a BPE pre-tokenizer by hashing how it splits a fixed text, and stops
on any hash it does not know: every locally trained tokenizer. The user then names the
llama.cpp pre-tokenizer whose regex matches theirs (`export.gguf_pre_tokenizer`). That name
is used only where the converter would stop; a recognised tokenizer keeps its detected name,
and a declared name that contradicts it is refused.

Run by `gguf.convert` in a subprocess, so the converter's imports and globals stay out of ours:
    python -m llm_finetune.exports.convert_gguf CONVERTER_DIR PRE_TOKENIZER CONVERTER_ARGS...
(an empty PRE_TOKENIZER runs the converter unchanged).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The converter's message for a hash it does not know (conversion/base.py).
UNRECOGNISED = "BPE pre-tokenizer was not recognized"
# Architectures transformers 5 spells otherwise than the converter registers them.
CONVERTER_SPELLINGS = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}


class PreTokenizerMismatch(Exception):
    """The declared pre-tokenizer contradicts the one llama.cpp recognised."""


def choose_pre_tokenizer(detect: Callable[[], str], declared: str) -> str:
    """The converter's detected name if it has one, else the declared one."""
    try:
        detected = detect()
    except NotImplementedError as exc:
        if UNRECOGNISED not in str(exc):
            raise
        return declared
    if detected != declared:
        raise PreTokenizerMismatch(
            f"llama.cpp recognises this tokenizer's pre-tokenizer as {detected!r} but "
            f"export.gguf_pre_tokenizer is {declared!r}: remove export.gguf_pre_tokenizer "
            f"(it is only for tokenizers llama.cpp does not recognise)"
        )
    return detected


def main(argv: list[str]) -> None:
    converter_dir, declared, *converter_args = argv
    sys.path.insert(0, converter_dir)
    import convert_hf_to_gguf  # llama.cpp's, found on the path only now
    from conversion.base import ModelBase, TextModel

    if declared:
        detect_original = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            return choose_pre_tokenizer(lambda: detect_original(self, tokenizer), declared)

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    load_hparams = ModelBase.load_hparams
    ModelBase.load_hparams = staticmethod(
        lambda *args, **kwargs: with_converter_keys(load_hparams(*args, **kwargs))
    )
    if lacks_its_mtp_layers(Path(converter_args[0])):
        converter_args.append("--no-mtp")
    sys.argv = [str(Path(converter_dir) / "convert_hf_to_gguf.py"), *converter_args]
    convert_hf_to_gguf.main()


def with_converter_keys(hparams: dict[str, Any]) -> dict[str, Any]:
    """The config as the converter reads it: keys transformers 5 no longer writes derived from
    the ones it writes instead, as transformers itself reads them. Only the converter's copy
    changes; the published config.json stays as transformers wrote it."""
    hparams = dict(hparams)
    model_type = hparams.get("model_type")
    if model_type == "gpt2" and hparams.get("n_ctx") is None:
        hparams["n_ctx"] = hparams.get("n_positions")
    if model_type == "gpt_neox" and hparams.get("rotary_pct") is None:
        rope = hparams.get("rope_parameters") or {}
        hparams["rotary_pct"] = rope.get("partial_rotary_factor", 1.0)
    if model_type == "falcon" and not hparams.get("new_decoder_architecture"):
        # FalconAttention: one key/value head with multi_query, one per head without it
        many = hparams.get("num_kv_heads") or hparams.get("num_attention_heads")
        hparams["num_kv_heads"] = 1 if hparams.get("multi_query", True) else many
    architectures = hparams.get("architectures") or []
    hparams["architectures"] = [CONVERTER_SPELLINGS.get(a, a) for a in architectures]
    return hparams


def lacks_its_mtp_layers(model_dir: Path) -> bool:
    """A checkpoint of an architecture whose multi-token-prediction layers llama.cpp converts
    (Qwen3.5, Qwen3-Next: `mtp.*`), without them: transformers neither loads nor saves them, and
    the converter stops on their absence unless told `--no-mtp`. DeepSeek and GLM keep theirs
    among `model.layers` (`num_nextn_predict_layers`): left to the converter."""
    import json

    from llm_finetune.merge import base_shards
    from llm_finetune.safetensors_stream import read_header

    try:
        from conversion import get_model_class

        config = json.loads((model_dir / "config.json").read_text())
        model_class = get_model_class((config.get("architectures") or [""])[0])
        nextn = [
            c for c in (config, config.get("text_config") or {}) if "num_nextn_predict_layers" in c
        ]
        if not model_class.supports_mtp_export or nextn:
            return False
        names = [name for shard in base_shards(model_dir) for name in read_header(shard).tensors]
    except Exception:  # noqa: BLE001 - another converter, a damaged folder: it says why itself
        return False
    return not any(part == "mtp" for name in names for part in name.split("."))


if __name__ == "__main__":
    main(sys.argv[1:])
