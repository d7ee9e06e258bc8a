"""The dtype names: safetensors' codes and torch's names, from the one table."""

from __future__ import annotations

import pytest

from llm_finetune.safetensors_stream import safetensors_code, torch_dtype_name


@pytest.mark.parametrize(
    ("code", "name"), [("BF16", "bfloat16"), ("F16", "float16"), ("F32", "float32")]
)
def test_codes_and_names_of_the_merge_dtypes(code, name):
    assert torch_dtype_name(code) == name
    assert safetensors_code(name) == code


def test_a_code_torch_has_no_dtype_for_is_reported_as_stored():
    assert torch_dtype_name("I64") == "int64"
    assert torch_dtype_name("F8_E8M0") == "F8_E8M0"
