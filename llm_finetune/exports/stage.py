"""The export stage: every format the config asks for, written beside merged/ and checked
against the verified 16-bit merge on the same held-out tokens before anything is published.

Each format is written atomically and then measured (KL, top-1 agreement, perplexity,
max |Δlogit|, stopping at EOS); one beyond its limits is moved to `exports/rejected/`, never
published, and the run says which and by how much while keeping everything else. The table
of results goes to the run summary, the printed end of the run and the model cards.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.errors import UserError
from llm_finetune.exports.formats import (
    CONVERTER_TYPES,
    DEFAULT_LIMITS,
    FP32,
    LORA,
    MERGED_4BIT,
    MERGED_16BIT,
    Limits,
    is_gguf,
    kind_of,
    table,
)
from llm_finetune.manifest import file_table, fingerprint, read_manifest, write_manifest
from llm_finetune.runlog import log

if TYPE_CHECKING:
    from llm_finetune.base_model import BaseModel
    from llm_finetune.config import Config, ExportConfig

EXPORTS = "exports"
RESULTS = "results.json"
GGUF_FOLDER = "gguf"
REJECTED = "rejected"


@dataclass
class ExportResult:
    """One row of the table: what was written, how far it is from the 16-bit merge."""

    format: str
    files: list[str]  # relative to the run's output folder
    bytes: int
    seconds: float
    measured: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def limits_for(fmt: str, export: ExportConfig) -> Limits:
    """The format's default limits with the config's own values, where it sets them."""
    default = DEFAULT_LIMITS[fmt]
    given = export.limits.get(fmt)
    if given is None:
        return default
    return Limits(
        kl=default.kl if given.kl is None else given.kl,
        top1=default.top1 if given.top1 is None else given.top1,
        stops_at_eos=default.stops_at_eos if given.stops_at_eos is None else given.stops_at_eos,
    )


def gguf_file_name(run_name: str, gguf_type: str) -> str:
    """`<name>-Q4_K_M.gguf`: the tag after the colon in `ollama run hf.co/<repo>:Q4_K_M`."""
    return f"{run_name}-{gguf_type.upper()}.gguf"


def gguf_source_type(merge_dtype: str) -> str:
    """The converter's output the quantizer starts from: the merge's own precision."""
    return {"bfloat16": "bf16", "float16": "f16"}.get(merge_dtype, "f32")


def estimated_bytes(fmt: str, merged_bytes: int) -> int:
    """Disk an export takes, from the 16-bit merge's size (bits per weight over 16)."""
    bits = {
        FP32: 32,
        MERGED_16BIT: 0,  # the merge itself
        MERGED_4BIT: 4.5,
        LORA: 0,  # the adapter, already kept
        "f32": 32,
        "f16": 16,
        "bf16": 16,
        "q8_0": 8.5,
        "q6_k": 6.6,
        "q5_k_m": 5.7,
        "q5_k_s": 5.5,
        "q5_0": 5.5,
        "q5_1": 6,
        "q4_k_m": 4.9,
        "q4_k_s": 4.6,
        "q4_0": 4.5,
        "q4_1": 5,
    }.get(fmt, 4)
    return int(merged_bytes * bits / 16)


def export_disk_need(formats: tuple[str, ...], merged_bytes: int) -> int:
    """What the exports add to the disk, the GGUF quantizer's 16-bit source included."""
    need = sum(estimated_bytes(f, merged_bytes) for f in formats)
    if any(is_gguf(f) and f not in CONVERTER_TYPES for f in formats):
        need += merged_bytes  # the converter's 16-bit GGUF, removed after quantizing
    return need


SETUP_TARGETS = {"gguf": "setup-gguf", "bitsandbytes": "setup-export"}  # Makefile targets


def _tools(config: Config) -> list[str]:
    """The tools the formats asked for need."""
    wanted = {
        "gguf": config.export.gguf_types,
        "bitsandbytes": MERGED_4BIT in config.export.formats,
    }
    return [tool for tool, needed in wanted.items() if needed]


def _problem(tool: str) -> str | None:
    if tool == "gguf":
        from llm_finetune.exports.gguf import toolchain_problem

        return toolchain_problem()
    from llm_finetune.exports.safetensors_exports import bitsandbytes_problem

    return bitsandbytes_problem()


def setup_targets(config: Config) -> list[str]:
    """The Makefile targets that install what this config's exports need and is missing."""
    return [SETUP_TARGETS[tool] for tool in _tools(config) if _problem(tool)]


def toolchain_problems(config: Config) -> list[str]:
    """Missing or broken tools for the formats asked for, each one line with the command that
    fixes it: raised in the preflight, before training. An installed GGUF toolchain must also
    pass its self-test (a tiny model converted, quantized and run: seconds, once per machine)."""
    problems = [problem for tool in _tools(config) if (problem := _problem(tool))]
    if config.export.gguf_types and not problems:
        from llm_finetune.exports.gguf_selftest import selftest_problem

        if problem := selftest_problem(config.export.gguf_types):
            problems.append(problem)
    return problems


def export_all(
    config: Config, base: BaseModel | None, merged: Path, out: Path, tokenizer: Any
) -> list[dict[str, Any]]:
    """Write and check every format of `config.export.formats` into `out`/exports; return
    the table's rows. `base` (for lora and fp32): the base the adapter in `out` was trained on.

    Exports of the same merge, data and export settings are reused (a re-run after a failed
    upload converts nothing again); anything else starts from an empty exports/ folder, so
    no file of an earlier run is ever published with these."""
    from llm_finetune.exports.checks import held_out, reference

    folder = out / EXPORTS
    inputs = _inputs_fingerprint(config, merged)
    if (reused := _reusable(folder, inputs)) is not None:
        log("    reusing the checked exports of this merge and export config")
        return reused
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    export = config.export
    held = held_out(config, tokenizer, export.check_rows, export.check_max_tokens, merged)
    held = dataclasses.replace(held, max_new_tokens=export.check_max_new_tokens)
    tokens = sum(len(s) for s in held.sequences)
    log(f"    checked on {held.source}: {tokens} tokens, {len(held.prompts)} generation prompts")
    start = time.monotonic()
    ref = reference(merged, held, folder / ".reference", device=_device())
    results = [_measured_row(MERGED_16BIT, [merged], out, ref, None, config, start)]
    log(_row_line(results[0]))
    for fmt in config.export.formats:
        if fmt == MERGED_16BIT or is_gguf(fmt):
            continue
        assert base is not None, f"{fmt} is made from the base and the adapter"
        results.append(_safetensors_export(fmt, config, base, merged, out, ref))
        log(_row_line(results[-1]))
    if config.export.gguf_types:
        for row in _gguf_exports(config, merged, out, ref, tokenizer):
            results.append(row)
            log(_row_line(row))
    shutil.rmtree(folder / ".reference", ignore_errors=True)
    rows = [r.as_dict() for r in results]
    for kind in {kind_of(r["format"]) for r in rows if r["passed"]}:
        if publish_folder(out, kind).is_dir() and publish_folder(out, kind) != merged:
            seal_export(out, kind, inputs, rows)
    _write_json(folder / RESULTS, {"inputs": inputs, "rows": rows})
    return rows


def seal_export(out: Path, kind: str, inputs: str, rows: list[dict[str, Any]]) -> None:
    """(Re)write an export folder's manifest: publish then sends exactly the checked files."""
    mine = [r for r in rows if kind_of(r["format"]) == kind]
    write_manifest(publish_folder(out, kind), f"export-{kind}", inputs, exports=mine)


def _inputs_fingerprint(config: Config, merged: Path) -> str:
    """What the exports depend on: the merged files that loaders read (its manifest's hashes;
    not the card or its curves), the export settings and the rows they are checked on."""
    from llm_finetune.publish import is_artefact

    manifest = read_manifest(merged)
    files = manifest["files"] if manifest else file_table(merged)
    return fingerprint(
        {
            "merged": {name: f for name, f in files.items() if is_artefact(name)},
            "export": config.export.model_dump(mode="json"),
            "data": config.data.model_dump(mode="json"),
            "prompts": [config.verify.prompts, config.verify.max_new_tokens],
            "max_seq_length": config.model.max_seq_length,
        }
    )


def _reusable(folder: Path, inputs: str) -> list[dict[str, Any]] | None:
    """The stored rows, if they are of these inputs and their files are all still there."""
    stored = folder / RESULTS
    if not stored.is_file():
        return None
    try:
        results = json.loads(stored.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("inputs") != inputs:
        return None
    rows = results.get("rows", [])
    out = folder.parent
    if all((out / f).is_file() for r in rows for f in r["files"]):
        return rows
    return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _measured_row(
    fmt: str,
    paths: list[Path],
    out: Path,
    ref: Any,
    runner: Any,
    config: Config,
    start: float,
) -> ExportResult:
    """Measure one written export (runner None: the reference itself) and judge it."""
    from llm_finetune.exports.checks import judge, measure

    measured = _reference_measured(ref) if runner is None else measure(ref, runner)
    if runner is not None:
        runner.close()
    files = [f for p in paths for f in _files(p)]
    return ExportResult(
        format=fmt,
        files=[_shown(f, out) for f in files],
        bytes=sum(f.stat().st_size for f in files),
        seconds=round(time.monotonic() - start, 2),
        measured=measured.as_dict(),
        problems=judge(measured, limits_for(fmt, config.export)),
    )


def _device() -> str:
    """Where transformers runs the checks: the GPU that trained the model, when there is one
    (GGUF files always run in llama.cpp on the CPU, as most of their users run them)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference_measured(ref: Any) -> Any:
    """The 16-bit merge's own row: the reference measured against itself, without a rerun."""
    from llm_finetune.exports.checks import Measured, answer_fields

    eos = set(ref.held_out.eos_ids)
    stops = sum(1 for g in ref.generations if g and g[-1] in eos)
    return Measured(
        kl=0.0,
        kl_max=0.0,
        top1=1.0,
        perplexity=ref.perplexity,
        reference_perplexity=ref.perplexity,
        max_abs_logit_diff=0.0,
        eos_stops=stops,
        eos_expected=stops,
        same_generations=len(ref.generations),
        generations=len(ref.generations),
        positions=ref.starts[-1],
        seconds=0.0,
        answers_expected=ref.held_out.answers_expected,
        **answer_fields(ref.held_out, ref.generations),
    )


def _safetensors_export(
    fmt: str, config: Config, base: BaseModel, merged: Path, out: Path, ref: Any
) -> ExportResult:
    from llm_finetune.exports import safetensors_exports as st

    start = time.monotonic()
    folder = out / EXPORTS / fmt
    if fmt == LORA:
        runner = st.TransformersRunner(
            base.path, adapter=out / "adapter", device=_device(), revision=base.revision
        )
        return _measured_row(fmt, [out / "adapter"], out, ref, runner, config, start)
    if fmt == FP32:
        st.write_fp32(base.path, base.revision, out / "adapter", folder, overwrite=True)
    else:
        st.write_merged_4bit(merged, folder, overwrite=True, device=_device())
    runner = st.TransformersRunner(folder, device=_device())
    row = _measured_row(fmt, [folder], out, ref, runner, config, start)
    if not row.passed:
        row.files = [_shown(f, out) for f in _files(_reject(folder, out))]
    return row


def _gguf_exports(
    config: Config, merged: Path, out: Path, ref: Any, tokenizer: Any
) -> list[ExportResult]:
    """llama.cpp's converter once (the merge's precision), its quantizer for each other type;
    each file run in llama.cpp itself for its check, its prompt format and stop tokens
    compared with training's, beside the Ollama files made for it."""
    from llm_finetune.exports import gguf
    from llm_finetune.exports.prompt_format import training_text

    folder = out / EXPORTS / GGUF_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    pre_tokenizer = config.export.gguf_pre_tokenizer
    source_type = gguf_source_type(config.merge.dtype)
    source = folder / gguf_file_name(config.run_name, source_type)
    started = time.monotonic()
    try:
        gguf.convert(merged, source, source_type, pre_tokenizer)
    except UserError as exc:  # the 16-bit model is kept and published all the same
        return [ExportResult(t, [], 0, 0.0, problems=[str(exc)]) for t in config.export.gguf_types]
    convert_seconds = time.monotonic() - started
    shipped = _shipped_beside_gguf(config, merged, tokenizer, folder)
    samples = _training_rows(config, 8)  # read once for every file's checks below
    texts = [training_text(config.data.format, row, tokenizer) for row in samples]
    held = ref.held_out
    n_ctx = max(len(s) for s in [*held.sequences, *held.prompts]) + held.max_new_tokens + 1
    rows = []
    for gguf_type in config.export.gguf_types:
        start = time.monotonic() - (convert_seconds if gguf_type == source_type else 0)
        target = folder / gguf_file_name(config.run_name, gguf_type)
        try:
            if gguf_type in CONVERTER_TYPES and gguf_type != source_type:
                gguf.convert(merged, target, gguf_type, pre_tokenizer)
            elif gguf_type != source_type:
                gguf.quantize(source, target, gguf_type)
        except UserError as exc:
            rows.append(ExportResult(gguf_type, [], 0, 0.0, problems=[str(exc)]))
            continue
        try:
            runner = gguf.LlamaCppRunner(target, n_ctx=n_ctx)
            try:
                problems = _tokenizer_problems(texts, tokenizer, runner)
                row = _measured_row(gguf_type, [target], out, ref, runner, config, start)
            finally:
                runner.close()
        except UserError as exc:  # llama.cpp refused, crashed or hung on this file
            seconds = round(time.monotonic() - start, 2)
            size = target.stat().st_size
            row = ExportResult(gguf_type, [_shown(target, out)], size, seconds, problems=[str(exc)])
        else:
            metadata = gguf.gguf_metadata(target)
            row.problems += problems + _prompt_format_problems(
                config, samples[0], tokenizer, shipped, metadata
            )
            types = ", ".join(f"{k} {v}" for k, v in sorted(metadata["tensor_types"].items()))
            row.notes.append(f"tensor types: {types}")
        if not row.passed:
            row.files = [_shown(_reject(target, out), out)]
        rows.append(row)
    if source_type not in config.export.gguf_types:
        source.unlink(missing_ok=True)
    return rows


def _training_rows(config: Config, count: int) -> list[dict[str, Any]]:
    from llm_finetune.data import load_raw

    raw = load_raw(config.data)
    return [raw[i] for i in range(min(count, len(raw)))]


def _shipped_beside_gguf(config: Config, merged: Path, tokenizer: Any, folder: Path) -> Any:
    """Write the Ollama files into the GGUF folder (its Modelfile runs the file most people
    pull: q4_k_m when made, else the first type asked for); return, with the merged folder's
    chat template and EOS ids, what the consistency check compares with training."""
    from llm_finetune.exports.ollama import ollama_files
    from llm_finetune.exports.prompt_format import shipped_by_folder

    types = config.export.gguf_types
    main = "q4_k_m" if "q4_k_m" in types else types[0]
    shipped = shipped_by_folder(merged)
    template = next(iter(shipped.chat_templates.values()))
    made = ollama_files(template or "", tokenizer.eos_token, gguf_file_name(config.run_name, main))
    for name, text in made.files.items():
        (folder / name).write_text(text, encoding="utf-8")
    if made.note:
        log(f"    Ollama: {made.note}")
    shipped.ollama = made.files
    return shipped


def _prompt_format_problems(
    config: Config, row: dict[str, Any], tokenizer: Any, shipped: Any, metadata: dict[str, Any]
) -> list[str]:
    """The GGUF's chat template and EOS, the merged folder's and the Ollama files', each
    against the text training made of `row`, a training row."""
    from llm_finetune.exports.prompt_format import gguf_shipped, prompt_format_problems

    everything = shipped.add(gguf_shipped(metadata))
    return prompt_format_problems(config.data.format, row, tokenizer, everything)


def _tokenizer_problems(texts: list[str], tokenizer: Any, runner: Any) -> list[str]:
    """llama.cpp must split the training texts into the ids transformers trained on: a wrong
    pre-tokenizer (export.gguf_pre_tokenizer) shows here, not in the logits."""
    for text in texts:
        ours, theirs = tokenizer(text)["input_ids"], runner.tokenize(text)
        if ours != theirs:
            pairs = zip(ours, theirs, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
            return [
                f"llama.cpp tokenizes the training text otherwise than transformers from token "
                f"{at} on ({tokenizer.convert_ids_to_tokens(ours[at : at + 3])} vs "
                f"{tokenizer.convert_ids_to_tokens(theirs[at : at + 3])}): check "
                "export.gguf_pre_tokenizer"
            ]
    return []


def publish_folder(out: Path, kind: str) -> Path:
    """The folder published as `kind`'s repo: the GGUF files together, one folder otherwise."""
    return out / EXPORTS / (GGUF_FOLDER if kind == "gguf" else kind)


def _shown(file: Path, out: Path) -> str:
    """A file as the table and summary name it: relative to the output folder when in it."""
    return str(file.relative_to(out)) if file.is_relative_to(out) else str(file)


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def _reject(path: Path, out: Path) -> Path:
    """An export beyond its limits: kept for inspection, out of every folder we publish."""
    rejected = out / EXPORTS / REJECTED
    rejected.mkdir(parents=True, exist_ok=True)
    destination = rejected / path.name
    if destination.exists():
        shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
    path.rename(destination)
    return destination


def _row_line(row: ExportResult) -> str:
    """A row of the table as the export finishes: format, file, size, numbers, verdict."""
    return "    " + "  ".join(table([row.as_dict()])[1])
