"""The tokenizer a merged folder carries: the files as trained, completed with what
transformers 5's `save_pretrained` no longer writes and loaders and llama.cpp's converter
still read, and the special token ids the merge aligns generation with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llm_finetune.errors import UserError, abbreviated, first_line
from llm_finetune.fsutil import read_json_object

TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "tekken.json",
}
# What transformers 5's tokenizer.save_pretrained no longer writes but llama.cpp's converter
# reads: without tokenizer.model, Gemma and Phi-3 get no GGUF; without add_bos_token, a
# Mistral GGUF whose tokenizer.json does not say so adds no BOS where training did.
VOCABULARY_FILES = ("tokenizer.model", "tekken.json")
FLAG_SAMPLE = "Hello world: 47 is forty-seven."  # tokenized before and after completing
BASE_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.tiktoken"]  # what complete_tokenizer reads


def is_vocabulary_file(name: str) -> bool:
    """A vocabulary the converter reads and transformers 5 no longer saves."""
    return name in VOCABULARY_FILES or name.endswith(".tiktoken")


def is_tokenizer_file(name: str) -> bool:
    """A file of the tokenizer that the merged folder and every export carry."""
    return name in TOKENIZER_FILES or is_vocabulary_file(name)


def copy_tokenizer(
    base_folder: Path, adapter: Path, staging: Path
) -> tuple[Path | None, list[str]]:
    """Copy the tokenizer files as trained (the adapter's, else the base's), byte for byte,
    completed from the base (`complete_tokenizer`); return the folder they came from (None
    when neither has a tokenizer) and what the base completed."""
    source = next(
        (f for f in (adapter, base_folder) if (f / "tokenizer_config.json").is_file()), None
    )
    if source is None:
        return None, []
    for path in source.iterdir():
        if is_tokenizer_file(path.name):
            try:
                shutil.copy2(path, staging / path.name)
            except (FileNotFoundError, PermissionError) as exc:  # a dangling link, say
                raise UserError(
                    f"cannot copy the tokenizer file {path} ({exc.strerror}); copy the "
                    f"tokenizer files into {source} again"
                ) from None
    return source, complete_tokenizer(base_folder, staging)


def complete_tokenizer(base_folder: Path, folder: Path) -> list[str]:
    """Add to `folder`'s tokenizer what transformers 5 no longer saves and llama.cpp's
    converter reads: the base's vocabulary files (`VOCABULARY_FILES`, `*.tiktoken`), and
    `add_bos_token`/`add_eos_token` as transformers tokenizes. Where the converter finds
    neither flag nor a post-processor in tokenizer.json that says, it adds no BOS, so a GGUF
    of a model trained with BOS would run without it. Nothing the folder has is replaced, and
    nothing is added that changes how transformers tokenizes; return what was added."""
    from transformers import AutoTokenizer

    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return []
    vocabulary = [
        path
        for path in sorted(base_folder.iterdir())
        if is_vocabulary_file(path.name) and path.is_file() and not (folder / path.name).exists()
    ]
    config = read_json_object(config_file, f"copy the tokenizer files into {folder} again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        before = tokenizer(FLAG_SAMPLE)["input_ids"]
    except Exception as exc:  # a custom tokenizer class, say: its own files, unchecked
        for path in vocabulary:
            shutil.copy2(path, folder / path.name)
        return [path.name for path in vocabulary] + [f"flags not pinned ({first_line(exc)})"]
    behaviour = {
        "add_bos_token": bool(before) and before[0] == tokenizer.bos_token_id,
        "add_eos_token": len(before) > 1 and before[-1] == tokenizer.eos_token_id,
    }
    flags = {key: value for key, value in behaviour.items() if key not in config}
    added = [path.name for path in vocabulary] + [f"{k}={str(v).lower()}" for k, v in flags.items()]
    if not added:
        return []
    original = config_file.read_bytes()
    for path in vocabulary:
        shutil.copy2(path, folder / path.name)
    config_file.write_text(json.dumps({**config, **flags}, indent=2, ensure_ascii=False) + "\n")
    if AutoTokenizer.from_pretrained(folder)(FLAG_SAMPLE)["input_ids"] != before:
        for path in vocabulary:
            (folder / path.name).unlink()
        config_file.write_bytes(original)
        return [f"not added: {', '.join(added)} (they change how transformers tokenizes)"]
    return added


def special_token_id(folder: Path, name: str) -> int | None:
    """The id of the tokenizer's `eos_token`/`pad_token`, read from its files."""
    fix = f"copy the tokenizer files into {folder} again"
    token = None
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / file).is_file():
            token = read_json_object(folder / file, fix).get(name)
            if token is not None:
                break
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    if not isinstance(token, str):
        raise UserError(
            f"{folder}: the tokenizer's {name} is {abbreviated(token)}, not a token; {fix}"
        )
    try:
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(token)
        from transformers import AutoTokenizer  # sentencepiece-only tokenizers

        return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)
    except Exception as exc:  # a damaged tokenizer file, in the loader's words
        raise UserError(
            f"the tokenizer in {folder} does not load ({first_line(exc)}); {fix}"
        ) from None
