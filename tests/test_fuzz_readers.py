"""Property-based fuzzing of the two readers of files users hand to the merge: whatever the
bytes of a safetensors file or the JSON of an adapter_config.json, they answer with the
checked result or a UserError (DamagedFile for a damaged file), never another exception.

A header the reader accepts is also accepted by the safetensors library, with the same
tensors: the checks refuse nothing the format allows that the merge could meet.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from llm_finetune.adapter import read_adapter, read_adapter_config
from llm_finetune.errors import UserError
from llm_finetune.safetensors_stream import DamagedFile, read_header

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


def valid_file(folder: Path) -> Path:
    path = folder / "valid.safetensors"
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "c": torch.tensor([1, 2], dtype=torch.int64),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def assert_as_the_library_reads_it(path: Path, exact: bool = True) -> None:
    """read_header refuses with DamagedFile or accepts; what it accepts, safetensors opens with
    the same names, dtypes and shapes, and (`exact`) what safetensors opens, it accepts.

    Not exact for raw bytes: JSON with a name given twice is refused here, while the library
    keeps the last entry."""
    try:
        header = read_header(path)
        ours = {n: (i.dtype, i.shape) for n, i in header.tensors.items()}
    except DamagedFile:
        ours = None
    try:
        with safe_open(str(path), "np") as f:
            theirs = {
                n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                for n in f.keys()  # noqa: SIM118 - not a dict
            }
    except Exception:  # the library's refusal: SafetensorError, or its own parse error
        theirs = None
    if ours is not None or exact:
        assert ours == theirs


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes(workdir, data):
    path = workdir / "bytes.safetensors"
    path.write_bytes(data)
    assert_as_the_library_reads_it(path, exact=False)


def _with_header(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@FUZZ
@given(header=json_values, data=st.binary(max_size=64))
def test_arbitrary_json_headers(workdir, header, data):
    path = workdir / "json.safetensors"
    path.write_bytes(_with_header(json.dumps(header).encode(), data))
    assert_as_the_library_reads_it(path)


fields = st.sampled_from(["dtype", "shape", "data_offsets"])
field_values = (
    json_values
    | st.sampled_from(["F32", "BF16", "F4", "F6_E2M3", "U16", "BOOL", "F8_E8M0", "f32", ""])
    | st.lists(st.integers(min_value=-2, max_value=40), max_size=3)
)


@FUZZ
@example(name="empty", field="shape", value=[1, 0], padding=0)  # no elements, 0 not first
@given(
    name=st.sampled_from(["a", "b", "empty", "c"]),
    field=fields,
    value=field_values,
    padding=st.integers(min_value=-3, max_value=3),
)
def test_mutated_fields_of_a_valid_header(workdir, name, field, value, padding):
    """One field of one tensor replaced, and the data made shorter or longer."""
    raw = valid_file(workdir).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header[name][field] = value
    data = raw[8 + length :]
    data = data[:padding] if padding < 0 else data + b"\0" * padding
    path = workdir / "mutated.safetensors"
    path.write_bytes(_with_header(json.dumps(header).encode(), data))
    assert_as_the_library_reads_it(path)


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=10_000),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.none() | st.integers(min_value=0, max_value=10_000),
)
def test_flipped_bytes_and_cuts_of_a_valid_file(workdir, position, byte, cut):
    raw = bytearray(valid_file(workdir).read_bytes())
    raw[position % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    path = workdir / "flipped.safetensors"
    path.write_bytes(bytes(raw))
    assert_as_the_library_reads_it(path, exact=False)


# ---------------------------------------------------------------------------------------
# adapter_config.json


@pytest.fixture(scope="module")
def adapter(workdir) -> Path:
    """A small LoRA adapter as peft saves it: r=4 on q_proj and v_proj of two layers."""
    folder = workdir / "adapter"
    folder.mkdir()
    prefix = "base_model.model.model.layers"
    tensors = {}
    for layer in range(2):
        for module, out in (("q_proj", 32), ("v_proj", 16)):
            tensors[f"{prefix}.{layer}.self_attn.{module}.lora_A.weight"] = torch.randn(4, 32)
            tensors[f"{prefix}.{layer}.self_attn.{module}.lora_B.weight"] = torch.randn(out, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": None,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_bias": False,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def test_the_fuzzed_adapter_is_valid(adapter):
    assert len(read_adapter(adapter).modules) == 4


@FUZZ
@given(config=json_values)
def test_arbitrary_json_as_adapter_config(workdir, config):
    folder = workdir / "any-config"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with contextlib.suppress(UserError):
        read_adapter_config(folder)


config_keys = st.sampled_from(
    [
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "bias",
        "init_lora_weights",
        "use_qalora",
        "ensure_weight_tying",
    ]
)
config_values = (
    json_values
    | st.integers(min_value=-1, max_value=9)
    | st.sampled_from(["q_proj", "v_proj", ".*", "layers", "all-linear", "(", "all", "lora_only"])
    | st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "self_attn", "layers"]), max_size=3)
    | st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", "layers.1.self_attn.q_proj", "(", ".*"]),
        st.integers(min_value=0, max_value=8) | st.floats(),
        max_size=2,
    )
)


@FUZZ
@given(changes=st.dictionaries(config_keys, config_values | st.just("<delete>"), max_size=3))
def test_mutated_adapter_configs_against_their_tensors(workdir, adapter, changes):
    """A valid config with fields replaced or deleted, read with the adapter's weights: the
    checks against the tensors (ranks, targets, patterns) also see every value."""
    config = _config(adapter)
    for key, value in changes.items():
        if value == "<delete>":
            config.pop(key, None)
        else:
            config[key] = value
    folder = workdir / "mutated-adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        result = read_adapter(folder)
    except UserError:
        return
    for lora in result.modules.values():  # what was accepted has a usable scale
        assert math.isfinite(lora.scale)
        assert lora.lora_a.shape[0] == lora.lora_b.shape[1]
