"""`llm-finetune merge` meets damaged and mismatched inputs: one `error:` line that names the
file and the fix, exit code 2, no traceback, and no output folder (nor a staging folder).

The corpus is made by the test from valid files: the tiny base, a LoRA adapter saved by peft
on it, and a sharded copy of the base; each case damages one thing and runs the real CLI.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_finetune.cli import main

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BASE_Q0 = "model.layers.0.self_attn.q_proj.weight"
RANK = 4


@pytest.fixture(scope="module")
def valid(tiny_base, tmp_path_factory) -> Path:
    """A folder with `base` (the tiny base), `sharded` (the same base in 4 to 9 shards: each
    named model-0000N-of-0000M) and `adapter` (LoRA r=4 on q_proj and v_proj with random B,
    saved by peft)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("valid")
    shutil.copytree(tiny_base, root / "base")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    size = (root / "base" / "model.safetensors").stat().st_size
    model.save_pretrained(root / "sharded", max_shard_size=size // 4)
    shutil.copy(root / "base" / "tokenizer.json", root / "sharded")
    peft_model = get_peft_model(
        model.float(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    peft_model.save_pretrained(root / "adapter")
    return root


def run_merge(capsys, base: Path | str, adapter: Path, output: Path) -> tuple[int, str]:
    """The CLI's exit code and what it printed on stderr (only that: earlier output is dropped)."""
    capsys.readouterr()
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output)])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, fragment: str, named: str, output: Path) -> None:
    """Exit 2, one `error:` line naming the file, no traceback, nothing left behind."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert named in lines[0], lines[0]
    assert not output.exists()
    if output.parent.is_dir():
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


# ---------------------------------------------------------------------------------------
# Ways to damage a safetensors file, its header given as JSON text or bytes


def split(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length], raw[8 + length :]


def write_header(path: Path, header: bytes | str, data: bytes | None = None) -> None:
    header = header.encode() if isinstance(header, str) else header
    data = split(path)[1] if data is None else data
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header = json.loads(split(path)[0])
    change(header)
    write_header(path, json.dumps(header))


def set_field(name: str, field: str, value) -> Callable[[dict], None]:
    return lambda header: header[name].__setitem__(field, value)


def reshape(change: Callable[[list[int]], object]) -> Callable[[dict], None]:
    """BASE_Q0's shape replaced by `change` of its true shape."""
    return lambda header: header[BASE_Q0].__setitem__("shape", change(header[BASE_Q0]["shape"]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def duplicate_name(path: Path) -> None:
    text = split(path)[0].decode().rstrip()
    first = json.dumps(BASE_Q0) + ":"
    start = text.index(first)
    entry = text[start : text.index("}", start) + 1]
    write_header(path, text[:-1] + "," + entry + "}")


def overlap(header: dict) -> None:
    """k_proj's bytes moved to where q_proj's begin (its size kept, so only the place is
    wrong)."""
    k_proj = header["model.layers.0.self_attn.k_proj.weight"]
    begin, end = k_proj["data_offsets"]
    q_begin = header[BASE_Q0]["data_offsets"][0]
    k_proj["data_offsets"] = [q_begin, q_begin + end - begin]


def dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "blobs" / "0123abcd")


# Each case: (id, damage(base, adapter), the message fragment, the file the line names)
SHARD = "model.safetensors"
BASE_CASES = [
    ("empty", lambda b, a: (b / SHARD).write_bytes(b""), "it is empty", SHARD),
    ("shorter-than-8", lambda b, a: (b / SHARD).write_bytes(b"\x10\0\0"), "only 3 bytes", SHARD),
    (
        "html-page",
        lambda b, a: (b / SHARD).write_text("<!DOCTYPE html><html>rate limited</html>"),
        "first 8 bytes give a header of",
        SHARD,
    ),
    (
        "lfs-pointer",
        lambda b, a: (b / SHARD).write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:abc\n"
            f"size {(b / SHARD).stat().st_size}\n"
        ),
        "Git LFS pointer",
        SHARD,
    ),
    ("header-past-end", lambda b, a: truncate(b / SHARD, 200), "ended early while reading", SHARD),
    (
        "data-cut-short",
        lambda b, a: truncate(b / SHARD, (b / SHARD).stat().st_size * 2 // 3),
        "ended early while reading",
        SHARD,
    ),
    (
        "header-not-json",
        lambda b, a: write_header(b / SHARD, split(b / SHARD)[0].replace(b'"', b"'", 1)),
        "not JSON",
        SHARD,
    ),
    ("header-a-list", lambda b, a: write_header(b / SHARD, "[1, 2]"), "not an object", SHARD),
    (
        "header-not-utf8",
        lambda b, a: write_header(b / SHARD, split(b / SHARD)[0].replace(b"lm_head", b"lm\xe9ead")),
        "not UTF-8",
        SHARD,
    ),
    ("duplicate-name", lambda b, a: duplicate_name(b / SHARD), "appears twice", SHARD),
    (
        "undefined-dtype",
        lambda b, a: edit_header(b / SHARD, set_field(BASE_Q0, "dtype", "BF17")),
        "'BF17', which the safetensors format does not define",
        SHARD,
    ),
    (
        "negative-shape",
        lambda b, a: edit_header(b / SHARD, reshape(lambda shape: [-shape[0], shape[1]])),
        "not a list of sizes",
        SHARD,
    ),
    (
        "shape-a-string",
        lambda b, a: edit_header(b / SHARD, reshape(lambda shape: "x".join(map(str, shape)))),
        "not a list of sizes",
        SHARD,
    ),
    (
        "one-offset",
        lambda b, a: edit_header(b / SHARD, set_field(BASE_Q0, "data_offsets", [0])),
        "not [begin, end]",
        SHARD,
    ),
    (
        "float-offsets",
        lambda b, a: edit_header(b / SHARD, set_field(BASE_Q0, "data_offsets", [0.0, 8.0])),
        "not [begin, end]",
        SHARD,
    ),
    (
        "end-before-begin",
        lambda b, a: edit_header(b / SHARD, set_field(BASE_Q0, "data_offsets", [64, 0])),
        "ends before it begins",
        SHARD,
    ),
    (
        "size-not-shape",
        lambda b, a: edit_header(b / SHARD, reshape(lambda shape: [shape[0], shape[1] - 1])),
        "which is not the size of BF16",
        SHARD,
    ),
    (
        "no-dtype",
        lambda b, a: edit_header(b / SHARD, lambda h: h[BASE_Q0].pop("dtype")),
        "lacks dtype, shape or data_offsets",
        SHARD,
    ),
    (
        "overlapping-tensors",
        lambda b, a: edit_header(b / SHARD, overlap),
        "overlaps another or leaves a gap",
        SHARD,
    ),
    (
        "bytes-after-the-data",
        lambda b, a: (b / SHARD).write_bytes((b / SHARD).read_bytes() + b"\0" * 64),
        "64 bytes after its last tensor",
        SHARD,
    ),
    (
        "metadata-not-strings",
        lambda b, a: edit_header(b / SHARD, lambda h: h.__setitem__("__metadata__", {"v": 1})),
        "__metadata__ is not a map of strings",
        SHARD,
    ),
    (
        "dangling-symlink",
        lambda b, a: dangling_link(b / SHARD),
        "blobs/0123abcd, which does not exist",
        SHARD,
    ),
    (
        "quantized-tensor",
        lambda b, a: edit_header(b / SHARD, set_field(BASE_Q0, "dtype", "I16")),
        "is stored as I16: a quantized checkpoint",
        SHARD,
    ),
    (
        "config-not-json",
        lambda b, a: (b / "config.json").write_text('{"model_type": "llama",'),
        "config.json' is not valid JSON",
        "config.json",
    ),
    (
        "config-a-list",
        lambda b, a: (b / "config.json").write_text("[]"),
        "holds a JSON list, not an object",
        "config.json",
    ),
    (
        "generation-config-not-json",
        lambda b, a: (b / "generation_config.json").write_text("{'eos_token_id': 2}"),
        "generation_config.json' is not valid JSON",
        "generation_config.json",
    ),
    (
        "tokenizer-config-not-json",
        lambda b, a: (b / "tokenizer_config.json").write_text('{"eos_token": "</s>"'),
        "tokenizer_config.json' is not valid JSON",
        "tokenizer_config.json",
    ),
    (
        "tokenizer-json-damaged",
        lambda b, a: (b / "tokenizer.json").write_text('{"version": "1.0"}'),
        "does not load",
        "base",
    ),
    (
        "tokenizer-dangling-link",
        lambda b, a: dangling_link(b / "tokenizer.json"),
        "cannot copy the tokenizer file",
        "tokenizer.json",
    ),
    (
        "config-missing",
        lambda b, a: (b / "config.json").unlink(),
        "has no config.json",
        "base",
    ),
]

INDEX = "model.safetensors.index.json"


def last_shard(base: Path) -> Path:
    return sorted(base.glob("model-*.safetensors"))[-1]


def tensor_in_two_shards(base: Path) -> None:
    first, last = sorted(base.glob("model-*.safetensors"))[0], last_shard(base)
    shutil.copy(first, last)


SHARDED_CASES = [
    (
        "index-not-json",
        lambda b, a: (b / INDEX).write_text("{"),
        "is not valid JSON",
        INDEX,
    ),
    (
        "index-without-weight-map",
        lambda b, a: (b / INDEX).write_text('{"metadata": {}}'),
        "weight_map is not a map",
        INDEX,
    ),
    (
        "index-outside-the-folder",
        lambda b, a: (b / INDEX).write_text('{"weight_map": {"x": "../model.safetensors"}}'),
        "weight_map is not a map",
        INDEX,
    ),
    (
        "shard-missing",
        lambda b, a: last_shard(b).unlink(),
        "does not exist; download or copy it again",
        "-of-0000",
    ),
    ("shard-cut-short", lambda b, a: truncate(last_shard(b), 4096), "ended early", "-of-0000"),
    ("shards-mixed", lambda b, a: tensor_in_two_shards(b), "is in both", "-of-0000"),
]


def edit_config(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def damage(base: Path, adapter: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        change(config)
        (adapter / "adapter_config.json").write_text(json.dumps(config))

    return damage


def setting(**values) -> Callable[[Path, Path], None]:
    return edit_config(lambda config: config.update(values))


def without(key: str) -> Callable[[Path, Path], None]:
    return edit_config(lambda config: config.pop(key))


def edit_tensors(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def damage(base: Path, adapter: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return damage


def add_tensor(name: str, shape: Callable[[dict], list[int]]) -> Callable[[Path, Path], None]:
    """Adds a zero tensor named `name` of `shape` (of the base's config.json)."""

    def damage(base: Path, adapter: Path) -> None:
        config = json.loads((base / "config.json").read_text())
        tensor = torch.zeros(shape(config))
        edit_tensors(lambda tensors: tensors.__setitem__(name, tensor))(base, adapter)

    return damage


def drop_tensor(name: str) -> Callable[[Path, Path], None]:
    return edit_tensors(lambda tensors: tensors.pop(name))


def keep_no_tensors(tensors: dict) -> None:
    tensors.clear()


def magnitudes(tensors: dict) -> None:
    for name in [n for n in tensors if n.endswith("lora_B.weight")]:
        module = name.removesuffix(".lora_B.weight")
        tensors[f"{module}.lora_magnitude_vector"] = torch.ones(tensors[name].shape[0])


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_CASES = [
    (
        "weights-cut-short",
        lambda b, a: truncate(a / WEIGHTS, (a / WEIGHTS).stat().st_size - 100),
        "ended early while reading",
        WEIGHTS,
    ),
    ("weights-empty", lambda b, a: (a / WEIGHTS).write_bytes(b""), "it is empty", WEIGHTS),
    (
        "config-not-json",
        lambda b, a: (a / CONFIG).write_text('{"r": 4, '),
        "is not valid JSON",
        CONFIG,
    ),
    ("config-a-string", lambda b, a: (a / CONFIG).write_text('"lora"'), "not an object", CONFIG),
    ("config-dangling-link", lambda b, a: dangling_link(a / CONFIG), "does not exist", CONFIG),
    ("no-r", without("r"), "has no r, which sets the merge's scale", CONFIG),
    ("no-alpha", without("lora_alpha"), "has no lora_alpha", CONFIG),
    ("r-a-string", setting(r="4"), "r is '4', expected a positive integer", CONFIG),
    ("r-zero", setting(r=0), "r is 0, expected a positive integer", CONFIG),
    ("alpha-nan", setting(lora_alpha=float("nan")), "lora_alpha is nan, expected a number", CONFIG),
    (
        "r-disagrees-with-shapes",
        setting(r=8),
        "r says rank 8 for model.layers.0.self_attn.q_proj, but its weights",
        CONFIG,
    ),
    (
        "rank-pattern-disagrees",
        setting(rank_pattern={"v_proj": 2}),
        "rank_pattern says rank 2 for model.layers.0.self_attn.v_proj",
        CONFIG,
    ),
    (
        "rank-pattern-bad-regex",
        setting(rank_pattern={"v_proj(": 4}),
        "rank_pattern is",
        CONFIG,
    ),
    (
        "alpha-pattern-not-numbers",
        setting(alpha_pattern={"v_proj": "sixteen"}),
        "alpha_pattern is",
        CONFIG,
    ),
    ("alpha-pattern-a-list", setting(alpha_pattern=[16]), "alpha_pattern is [16]", CONFIG),
    ("use-dora-yes", setting(use_dora="yes"), "use_dora is 'yes', expected true or false", CONFIG),
    ("bias-unknown", setting(bias="some"), "bias is 'some'", CONFIG),
    ("target-modules-a-number", setting(target_modules=3), "target_modules is 3", CONFIG),
    (
        "layers-pattern-with-regex-targets",
        setting(target_modules=".*q_proj", layers_pattern="layers", layers_to_transform=[0]),
        "expected a list when layers_to_transform or layers_pattern is set",
        CONFIG,
    ),
    ("not-lora", setting(peft_type="IA3"), "adapter type 'IA3' is not LoRA", CONFIG),
    (
        "a-lora-variant",
        setting(alora_invocation_tokens=[1, 2]),
        "sets alora_invocation_tokens, which this merge does not support",
        CONFIG,
    ),
    (
        "target-modules-miss-a-module",
        setting(target_modules=["q_proj"]),
        "does not cover model.layers.0.self_attn.v_proj",
        CONFIG,
    ),
    (
        "regex-target-misses-a-module",
        setting(target_modules=r".*\.q_proj"),
        "does not cover model.layers.0.self_attn.v_proj",
        CONFIG,
    ),
    (
        "excluded-module",
        setting(exclude_modules=["v_proj"]),
        "does not cover model.layers.0.self_attn.v_proj",
        CONFIG,
    ),
    (
        "layers-to-transform-miss-a-layer",
        setting(layers_to_transform=[0]),
        "does not cover model.layers.1.self_attn",
        CONFIG,
    ),
    (
        "modules-to-save-take-a-module",
        setting(modules_to_save=["q_proj"]),
        "does not cover model.layers.0.self_attn.q_proj",
        CONFIG,
    ),
    (
        "use-dora-without-magnitudes",
        setting(use_dora=True),
        "use_dora is True but model.layers.0.self_attn.q_proj has no lora_magnitude_vector",
        CONFIG,
    ),
    (
        "magnitudes-without-use-dora",
        edit_tensors(magnitudes),
        "use_dora is False but model.layers.0.self_attn.q_proj has lora_magnitude_vector",
        CONFIG,
    ),
    (
        "lora-bias-without-lora-bias",
        add_tensor(f"{Q0}.lora_B.bias", lambda c: [c["hidden_size"]]),
        "lora_bias is not true but model.layers.0.self_attn.q_proj has a lora_B.bias",
        CONFIG,
    ),
    (
        "lora-A-without-B",
        drop_tensor(f"{Q0}.lora_B.weight"),
        "q_proj has no lora_B weight",
        WEIGHTS,
    ),
    (
        "lora-B-without-A",
        drop_tensor(f"{Q0}.lora_A.weight"),
        "q_proj has no lora_A weight",
        WEIGHTS,
    ),
    (
        "ranks-of-A-and-B-differ",
        add_tensor(f"{Q0}.lora_A.weight", lambda c: [RANK - 1, c["hidden_size"]]),
        "has lora_A of rank 3 but lora_B of rank 4",
        WEIGHTS,
    ),
    (
        "a-1d-lora-A",
        add_tensor(f"{Q0}.lora_A.weight", lambda c: [RANK * c["hidden_size"]]),
        "only Linear and Embedding LoRA (2-D weights) merge",
        WEIGHTS,
    ),
    ("no-lora-tensors", edit_tensors(keep_no_tensors), "holds no LoRA weights", WEIGHTS),
    (
        "whole-tensor-not-in-modules-to-save",
        add_tensor(
            "base_model.model.lm_head.weight", lambda c: [c["vocab_size"], c["hidden_size"]]
        ),
        "lm_head.weight is a whole tensor that neither modules_to_save nor bias",
        WEIGHTS,
    ),
    (
        "a-tensor-peft-would-not-load",
        add_tensor(
            "model.layers.0.self_attn.q_proj.lora_A.weight", lambda c: [RANK, c["hidden_size"]]
        ),
        "is not named as peft saves adapters",
        WEIGHTS,
    ),
    (
        "dtype-torch-cannot-read",
        lambda b, a: edit_header(
            a / WEIGHTS,
            set_field(f"{Q0}.lora_A.weight", "dtype", "U32"),  # F32's size: only the dtype
        ),
        "is stored as U32, which torch cannot read here",
        WEIGHTS,
    ),
]


def _cases(cases, base_folder):
    return [
        pytest.param(base_folder, damage, fragment, named, id=name)
        for name, damage, fragment, named in cases
    ]


@pytest.mark.parametrize(
    ("base_folder", "damage", "fragment", "named"),
    _cases(BASE_CASES, "base") + _cases(SHARDED_CASES, "sharded") + _cases(ADAPTER_CASES, "base"),
)
def test_a_damaged_or_mismatched_input_is_one_line(
    valid, tmp_path, capsys, base_folder, damage, fragment, named
):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(valid / base_folder, base)
    shutil.copytree(valid / "adapter", adapter)
    damage(base, adapter)
    output = tmp_path / "merged"
    code, err = run_merge(capsys, base, adapter, output)
    assert_refused(code, err, fragment, named, output)


@pytest.mark.parametrize("base_folder", ["base", "sharded"])
def test_the_corpus_starts_from_inputs_that_merge(valid, tmp_path, capsys, base_folder):
    """Each case above fails because of its one damage, not because the inputs never merged."""
    code, err = run_merge(capsys, valid / base_folder, valid / "adapter", tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


# ---------------------------------------------------------------------------------------
# The adapter whose r disagrees with its tensors: peft refuses it, and so does the merge
# (it used to exit 0 with a model merged at the wrong scale).


def test_peft_and_the_merge_both_refuse_an_r_that_disagrees_with_the_shapes(
    valid, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    shutil.copytree(valid / "adapter", adapter)
    setting(r=2 * RANK)(valid / "base", adapter)
    model = AutoModelForCausalLM.from_pretrained(valid / "base", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(model, str(adapter))
    output = tmp_path / "merged"
    code, err = run_merge(capsys, valid / "base", adapter, output)
    assert_refused(code, err, "peft refuses this adapter", CONFIG, output)


def test_a_rank_pattern_that_agrees_with_the_shapes_merges(tiny_base, tmp_path, capsys):
    """rank_pattern is legitimate: each module's rank comes from its pattern entry."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    code, err = run_merge(capsys, tiny_base, tmp_path / "adapter", tmp_path / "merged")
    assert code == 0, err


# ---------------------------------------------------------------------------------------
# Paths: a base that looks like a path, an output that cannot be made, a full disk


@pytest.mark.parametrize("name", ["./no-such-base", "no-such-base/", "{tmp}/no-such-base"])
def test_a_base_that_looks_like_a_path_is_never_looked_up(
    valid, tmp_path, capsys, monkeypatch, name
):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    base = name.format(tmp=tmp_path)
    code, err = run_merge(capsys, base, valid / "adapter", tmp_path / "merged")
    assert_refused(
        code, err, "does not exist; pass the base model's folder", base, tmp_path / "merged"
    )


def test_a_base_that_is_a_file(valid, tmp_path, capsys):
    code, err = run_merge(capsys, valid / "base" / "config.json", valid / "adapter", tmp_path / "m")
    assert_refused(code, err, "is not a folder", "config.json", tmp_path / "m")


def test_an_output_under_a_file(valid, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    output = tmp_path / "notes.txt" / "merged"
    code, err = run_merge(capsys, valid / "base", valid / "adapter", output)
    assert_refused(
        code, err, "notes.txt', which is a file, not a folder; choose another", "notes.txt", output
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_in_a_folder_this_user_cannot_write(valid, tmp_path, capsys, monkeypatch):
    """Root may write anywhere, so the refusal is checked with os.access answering as for
    another user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != locked and access(path, mode)
    )
    output = locked / "merged"
    code, err = run_merge(capsys, valid / "base", valid / "adapter", output)
    assert_refused(code, err, "this user may not write in", "locked", output)


def test_an_unreadable_shard(valid, tmp_path, capsys, monkeypatch):
    from llm_finetune import safetensors_stream

    shard = valid / "base" / SHARD

    def denied(path, mode="r", *args, **kwargs):
        if Path(path) == shard:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(safetensors_stream, "open", denied, raising=False)
    code, err = run_merge(capsys, valid / "base", valid / "adapter", tmp_path / "merged")
    assert_refused(code, err, "permission denied; make it readable", SHARD, tmp_path / "merged")


class FillingDisk:
    """A file being written on a disk with `room` bytes left."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.mark.parametrize("room", [0, 200_000], ids=["at-the-header", "in-the-writer-thread"])
def test_the_disk_filling_during_the_write(valid, tmp_path, capsys, monkeypatch, room):
    from llm_finetune import safetensors_stream

    def filling(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the merge closes it
        return FillingDisk(file, room) if "w" in mode else file

    monkeypatch.setattr(safetensors_stream, "open", filling, raising=False)
    output = tmp_path / "merged"
    code, err = run_merge(capsys, valid / "base", valid / "adapter", output)
    assert_refused(code, err, "the disk filled while writing the merged model", "merged", output)
    assert "free space or choose another output folder" in err
