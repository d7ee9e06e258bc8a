"""A damaged manifest (a crash mid-write on a filesystem without atomic rename, an edit by
hand) stops a re-run with one line, not a traceback, and is never taken for a good one."""

from __future__ import annotations

import pytest

from llm_finetune.base_model import BaseModel
from llm_finetune.errors import UserError
from llm_finetune.manifest import MANIFEST, write_manifest
from llm_finetune.resume import inspect_outputs, train_fingerprint
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"files": ', "is not valid JSON"),
        ("", "is not valid JSON (it is empty)"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"inputs_fingerprint": "x"}', "lists no files, it is damaged"),
        ('{"files": {"a": 1}}', "lists no files, it is damaged"),
    ],
)
def test_a_damaged_manifest_stops_a_rerun_with_one_line(tmp_path, text, message):
    config = tiny_config(tmp_path)
    adapter = config.output_path / "adapter"
    adapter.mkdir(parents=True)
    (adapter / MANIFEST).write_text(text)
    with pytest.raises(UserError, match="remove the folder and make it again") as refused:
        inspect_outputs(config, "publish", BaseModel("builtin:tiny-llama", "/x"))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_manifest_without_a_fingerprint_is_another_configs(tmp_path):
    config = tiny_config(tmp_path)
    base = BaseModel("builtin:tiny-llama", "/x")
    adapter = config.output_path / "adapter"
    adapter.mkdir(parents=True)
    write_manifest(adapter, "adapter", train_fingerprint(config, base))
    assert inspect_outputs(config, "publish", base).adapter is not None
    text = (adapter / MANIFEST).read_text().replace('"inputs_fingerprint"', '"other"')
    (adapter / MANIFEST).write_text(text)
    with pytest.raises(UserError, match="was made from a different config"):
        inspect_outputs(config, "publish", base)
