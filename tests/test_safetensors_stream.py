"""The dtype names: safetensors' codes and torch's names, from the one table; headers read as
the safetensors library reads them (the damaged ones: tests/test_merge_inputs.py and
tests/test_fuzz_readers.py)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_finetune.safetensors_stream import (
    FORMAT_BITS,
    DamagedFile,
    ShardWriter,
    read_header,
    read_rows,
    safetensors_code,
    torch_dtype_name,
)


@pytest.mark.parametrize(
    ("code", "name"), [("BF16", "bfloat16"), ("F16", "float16"), ("F32", "float32")]
)
def test_codes_and_names_of_the_merge_dtypes(code, name):
    assert torch_dtype_name(code) == name
    assert safetensors_code(name) == code


def test_a_code_torch_has_no_dtype_for_is_reported_as_stored():
    assert torch_dtype_name("I64") == "int64"
    assert torch_dtype_name("F8_E8M0") == "F8_E8M0"


# ---------------------------------------------------------------------------------------
# Reading: every dtype the format defines; a file cut short after its header was read


@pytest.mark.parametrize("code", sorted(FORMAT_BITS))
def test_a_header_of_every_dtype_the_format_defines_is_read_as_the_library_reads_it(tmp_path, code):
    shape = [2, 8]  # 16 elements: whole bytes for the 4- and 6-bit types too
    nbytes = 16 * FORMAT_BITS[code] // 8
    header = json.dumps({"t": {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}})
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * nbytes)
    info = read_header(path).tensors["t"]
    with safe_open(str(path), "np") as f:
        assert (f.get_slice("t").get_dtype(), f.get_slice("t").get_shape()) == (code, shape)
    assert (info.dtype, list(info.shape), info.nbytes) == (code, shape, nbytes)


@pytest.mark.parametrize("shape", [[0], [0, 3], [3, 0], [2, 5, 0]])
def test_tensors_without_elements_take_no_bytes_wherever_their_zero_is(tmp_path, shape):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(3), "none": torch.zeros(shape)}, path)
    assert read_header(path).tensors["none"].shape == tuple(shape)


def test_a_file_cut_short_while_it_is_read_is_a_damaged_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(64, 8), "b": torch.ones(4)}, path)
    header = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(header.tensors["a"].start + 100)
    with open(path, "rb") as f, pytest.raises(DamagedFile, match="ended early while reading a"):
        read_rows(f, header.tensors["a"])
    writer = ShardWriter(tmp_path / "out.safetensors", {"a": ("F32", (64, 8))}, {})
    with open(path, "rb") as f, pytest.raises(DamagedFile, match="ended early while reading a"):
        writer.copy_raw("a", f, header.tensors["a"])
    writer.abort()
