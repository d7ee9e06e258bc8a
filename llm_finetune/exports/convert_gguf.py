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

# The converter's message for a hash it does not know (conversion/base.py).
UNRECOGNISED = "BPE pre-tokenizer was not recognized"


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
    from conversion.base import TextModel

    if declared:
        detect_original = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            return choose_pre_tokenizer(lambda: detect_original(self, tokenizer), declared)

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(Path(converter_dir) / "convert_hf_to_gguf.py"), *converter_args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
