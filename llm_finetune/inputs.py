"""Checks of the files and folders a user names to a command (`--base`, `--adapter`,
`--merged`, `--folder`, `--prompts`, `--storage`, `model.name`, `output_dir`), made before a
model is loaded or a request is sent.

A typo, a copy cut short or a folder of another model is then one line that names the path as
the user wrote it and the fix, instead of a Hub lookup of something meant as a path, or a
traceback from deep inside a loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError, first_line
from llm_finetune.fsutil import check_output_folder, looks_like_local_path, read_json_object

if TYPE_CHECKING:
    from llm_finetune.config import Config

INDEX_SUFFIX = ".safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# config.json fields that fix the shapes of a model's weights: two models that differ in one
# of them cannot be compared logit for logit, nor is one a merge of the other.
SHAPE_FIELDS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def check_folder(name: str, what: str) -> Path:
    """The existing folder `name` (symbolic links followed), as a path."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_symlink() and not path.exists():
        raise UserError(f"{what} {name!r} is a broken symbolic link; point it at the folder")
    if path.exists():
        raise UserError(f"{what} {name!r} is a file, not a folder; pass the folder")
    raise UserError(f"{what} {name!r}: no such folder; check the path")


def check_json_files(folder: Path, fix: str) -> None:
    """Every JSON file at the top of `folder` parses: a loader would fail on a damaged one
    halfway through loading the model."""
    for path in sorted(folder.glob("*.json")):
        read_json_object(path, fix)


def check_model_folder(name: str, what: str) -> dict[str, Any]:
    """A transformers model folder: config.json naming the model, JSON files that parse, and
    safetensors weights whose index (if any) names only files that are there. Returns the
    config. Reads no weights."""
    path = check_folder(name, what)
    fix = f"copy or download {what} {name!r} again"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{what} {name!r} is not a model folder (no config.json); pass a folder that "
            "save_pretrained wrote (config.json and *.safetensors weights)"
        )
    config = read_json_object(config_file, fix)
    if not config.get("model_type") and not config.get("architectures"):
        raise UserError(
            f"{str(config_file)!r} names no model_type or architectures: it is not a "
            f"transformers model config; {fix}"
        )
    check_json_files(path, fix)
    for index in sorted(path.glob(f"*{INDEX_SUFFIX}")):
        weight_map = read_json_object(index, fix).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{str(index)!r} has no weight_map: {fix}")
        missing = sorted({str(s) for s in weight_map.values()} - {p.name for p in path.iterdir()})
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(
                f"{what} {name!r} is incomplete: {index.name} names {missing[0]}{more}, which "
                f"is not there; {fix}"
            )
    if not any(path.glob("*.safetensors")):
        found = "only pickle (.bin) weights" if any(path.glob("*.bin")) else "no weights"
        raise UserError(
            f"{what} {name!r} has {found}, no *.safetensors: save it with "
            "save_pretrained(..., safe_serialization=True), or pass the folder that has them"
        )
    return config


def check_weights_readable(name: str) -> None:
    """Every safetensors file of a model folder has a header that fits the file (a download
    cut short, a damaged copy): read_header refuses one that does not."""
    from llm_finetune.safetensors_stream import read_header

    for shard in sorted(Path(name).expanduser().glob("*.safetensors")):
        read_header(shard)


def check_tokenizer(name: str, what: str) -> None:
    """The folder holds a tokenizer (what verification encodes its prompts with)."""
    path = Path(name).expanduser()
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise UserError(
            f"{what} {name!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy the "
            "base model's tokenizer files into it"
        )


def check_adapter_folder(name: str, what: str = "--adapter") -> dict[str, Any]:
    """A peft adapter folder: adapter_config.json (a JSON object) and its weights. Returns the
    adapter config."""
    path = check_folder(name, what)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"{what} {name!r} is not a LoRA adapter folder (no adapter_config.json); "
            "pass the folder that `save_pretrained` of a peft model wrote"
        )
    config = read_json_object(config_file, f"copy {what} {name!r} again, or train it again")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(
            f"{what} {name!r} has no adapter_model.safetensors (weights must be safetensors; "
            "re-save the adapter with save_pretrained(..., safe_serialization=True))"
        )
    return config


def model_config(name: str, what: str) -> dict[str, Any]:
    """The config of a model named on the command line: a folder (checked, and never looked
    up on the Hub when the name looks like a path) or a Hub id (its config.json, downloaded)."""
    if looks_like_local_path(name):
        return check_model_folder(name, what)
    from huggingface_hub import hf_hub_download

    try:
        config_file = Path(hf_hub_download(name, "config.json"))
    except Exception as exc:  # missing, gated, offline: the reason, in one line
        raise UserError(f"{what} {name!r}: cannot load its config: {first_line(exc)}") from None
    return read_json_object(config_file, f"the Hub's config.json of {name!r} is damaged")


def check_adapter_fits(adapter: str, base_folder: Path, base_config: dict[str, Any]) -> None:
    """The adapter's tensors agree with its config and fit the base's weights, as the merge
    checks them: peft refuses such an adapter only halfway through loading, with a traceback."""
    from llm_finetune.merge import base_shards, plan_merge, read_adapter_for

    lora = read_adapter_for(Path(adapter).expanduser(), base_folder)
    fan_in_fan_out = bool(lora.config.get("fan_in_fan_out"))
    plan_merge(lora, base_shards(base_folder), base_config, "float32", fan_in_fan_out, base_folder)


def check_same_model(
    base: dict[str, Any], base_name: str, merged: dict[str, Any], merged_name: str
) -> None:
    """The merged model has the base's architecture and sizes (each field both configs set)."""
    for field in SHAPE_FIELDS:
        if field in base and field in merged and base[field] != merged[field]:
            raise UserError(
                f"--merged {merged_name!r} is not a merge of --base {base_name!r}: its "
                f"{field} is {merged[field]!r}, the base's is {base[field]!r}; pass the base "
                "the merged model was made from"
            )


def read_prompts(name: str) -> list[str]:
    """The non-empty lines of a prompts file."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(f"--prompts {name!r} is a folder; pass a text file, one prompt a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts {name!r}: no such file; check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {name!r} is not UTF-8 text; pass a text file") from None
    except OSError as exc:
        raise UserError(f"cannot read --prompts {name!r} ({exc.strerror or exc})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {name!r} holds no prompt; write one prompt a line")
    return prompts


def check_config_paths(config: Config) -> None:
    """The paths of a config that can be checked without loading anything: output_dir, and
    model.name when it names a folder."""
    check_output_folder(str(config.output_path), "output_dir")
    if looks_like_local_path(config.model.name):
        check_model_folder(config.model.name, "model.name")


def check_gguf_files(folder: Path, what: str) -> None:
    """Each *.gguf file starts as GGUF does (magic, version 2 or 3): a file cut short or
    overwritten by something else is named before any request."""
    for file in sorted(folder.glob("*.gguf")):
        with file.open("rb") as stream:
            head = stream.read(8)
        if len(head) < 8 or head[:4] != b"GGUF" or int.from_bytes(head[4:], "little") not in (2, 3):
            raise UserError(
                f"{what}: {file.name} is not a GGUF file (damaged or truncated): export it again"
            )


def check_publish_folder(name: str) -> None:
    """A folder to publish is a model folder, a LoRA adapter folder whose JSON files parse, or
    a folder of GGUF files, and its manifest, if any, lists files (which publish then checks
    byte for byte)."""
    from llm_finetune.manifest import read_manifest
    from llm_finetune.publish import folder_kind

    folder = check_folder(name, "--folder")
    if folder_kind(folder) == "adapter":
        check_adapter_folder(name, "--folder")
        check_json_files(folder, f"copy --folder {name!r} again, or train it again")
    elif (folder / "config.json").is_file():
        check_model_folder(name, "--folder")
    elif folder_kind(folder) == "gguf":
        check_gguf_files(folder, f"--folder {name!r}")
    else:
        raise UserError(
            f"--folder {name!r} is neither a model folder (config.json), a LoRA adapter "
            "folder (adapter_config.json) nor a folder of GGUF files: nothing to publish"
        )
    read_manifest(folder)  # a damaged manifest is one line before any request
