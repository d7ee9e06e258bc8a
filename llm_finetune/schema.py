"""configs/schema.json: the configs' JSON schema, generated from the pydantic models.

Editors read it through each config's first line, `# yaml-language-server: $schema=../schema.json`
(the Red Hat YAML language server: VS Code, Neovim, Helix, Zed; JetBrains IDEs too): keys
complete, and unknown keys and wrong types are underlined as they are typed.
`llm-finetune schema` writes it; a test fails when the committed file is stale.

The schema is the models' own (`Config.model_json_schema()`: types, enums, bounds, defaults,
the field docstrings as descriptions, `additionalProperties: false`), plus what the loader
accepts beyond the models: an empty top-level section (null: all defaults), and
`training.report_to` given as one tracker. The checks between keys (`method: dpo` needs
`data.format: dpo`, `publish.repo_id` when `publish.enabled`, ...) and `${VAR}` interpolation
are not expressible in it: `llm-finetune validate` checks those.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from llm_finetune.errors import UserError

SCHEMA_PATH = Path("configs/schema.json")  # from the repository root, where commands run
HEADER = "# yaml-language-server: $schema=../schema.json"  # configs/<model>/<method>.yaml
DRAFT = "https://json-schema.org/draft/2020-12/schema"  # the dialect pydantic writes


class _WithFactoryDefaults(GenerateJsonSchema):
    """Pydantic's generator, with the defaults of `default_factory` fields (lists, dicts)
    written too. A section's default (a whole model) is left out: its fields show theirs."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        return NoDefault if isinstance(value, BaseModel) else value


def config_schema() -> dict[str, Any]:
    """The JSON schema of a config file, as `configs/schema.json` holds it."""
    from llm_finetune.config import Config
    from llm_finetune.exports.formats import ALL_FORMATS

    schema = Config.model_json_schema(schema_generator=_WithFactoryDefaults)
    defs = schema["$defs"]
    # A section whose keys are all commented out reads as null: all its defaults (load_config
    # drops it). Not `model:` or `data:`, which have no defaults.
    for name, prop in schema["properties"].items():
        if "$ref" in prop and name not in schema["required"]:
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}]}
    # `report_to: wandb` is a list of one tracker.
    report_to = defs["TrainingConfig"]["properties"]["report_to"]
    tracker = report_to["items"]
    report_to["anyOf"] = [{k: report_to.pop(k) for k in ("items", "minItems", "type")}, tracker]
    # Export formats are a fixed vocabulary (validated in code against the same list).
    export = defs["ExportConfig"]["properties"]
    export["formats"]["items"] = {"enum": list(ALL_FORMATS), "type": "string"}
    export["formats"]["uniqueItems"] = True
    export["limits"]["propertyNames"] = {"enum": list(ALL_FORMATS)}
    # pydantic's order again: keys sorted, except the fields', which keep the models' order.
    return {"$schema": DRAFT, **_WithFactoryDefaults().sort(schema)}


def schema_text() -> str:
    """The schema as written: keys in a stable order, two-space indents, a final newline."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: Path) -> None:
    """Write the schema to `path` at once (a temporary file beside it, then os.replace):
    an editor never reads half a file. Raises UserError when the folder is not writable."""
    text = schema_text()
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        hint = (
            " (run it from the repository root, or pass --output PATH)"
            if path == SCHEMA_PATH
            else ""
        )
        raise UserError(f"cannot write {str(path)!r}: {str(folder)!r} {what}{hint}")
    temporary: str | None = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise UserError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
