"""GGUF files made and run by llama.cpp's own code, offline: its converter
(`convert_hf_to_gguf.py`, in a subprocess), its quantizer (`llama_model_quantize` in libllama)
and its runtime (llama-cpp-python), all of one llama.cpp commit, installed by
`scripts/install_llama_cpp.sh` (`make setup-gguf`).

llama.cpp's native code never runs in our process (`llama_child.py`): a crash in it rejects
one file, not the run. gguf-py and numpy are imported inside the functions: the preflight
imports this module on machines where GGUF is not asked for.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.exports.convert_gguf import (
    CONVERTER_SPELLINGS,
    UNRECOGNISED,
    PreTokenizerMismatch,
)
from llm_finetune.exports.formats import CONVERTER_TYPES, GGUF_TYPES
from llm_finetune.exports.llama_child import (
    LlamaCppChild,
    LlamaCppFailed,
    LlamaCppRefused,
)

# Where the install script puts the converter of the installed llama-cpp-python's commit.
CONVERTER_DIR = Path(sys.prefix) / "share" / "llama.cpp"
SETUP_COMMAND = "make setup-gguf"


def _converter_stamp(version: str) -> Path:
    """Written by the install script once the converter of llama-cpp-python `version` is there."""
    return CONVERTER_DIR / f".llama-cpp-python-{version}"


def toolchain_problem() -> str | None:
    """None when llama.cpp's runtime, quantizer and converter are all installed, of one commit;
    else one line saying what is missing and the command that installs it. Nothing is
    imported: libllama is loaded only in child processes (and by `selftest` before training)."""
    needed = ("llama_cpp", "gguf", "sentencepiece")
    missing = [name for name in needed if not importlib.util.find_spec(name)]
    if missing:
        return (
            f"GGUF exports need llama-cpp-python, gguf-py and sentencepiece ({', '.join(missing)} "
            f"not installed here): run `{SETUP_COMMAND}`"
        )
    if not (CONVERTER_DIR / "convert_hf_to_gguf.py").is_file():
        return (
            f"GGUF exports need llama.cpp's converter, not found in {CONVERTER_DIR}: "
            f"run `{SETUP_COMMAND}`"
        )
    version = importlib.metadata.version("llama_cpp_python")
    if not _converter_stamp(version).is_file():
        return (
            f"llama.cpp's converter in {CONVERTER_DIR} is not the one of the installed "
            f"llama-cpp-python {version}: run `{SETUP_COMMAND}`"
        )
    return None


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """Yield a fresh hidden name beside `target` for a writer to create; rename it into place
    only on success, so a failed or killed export never leaves a file that looks finished."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.partial-*"):  # from a killed run
        leftover.unlink(missing_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        if not staging.is_file():
            raise RuntimeError(f"the GGUF writer reported success but wrote no {staging}")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


# --- conversion (llama.cpp's convert_hf_to_gguf.py) ---

_UNRECOGNISED = re.compile(re.escape(f"NotImplementedError: {UNRECOGNISED}"))
_CHECK_HASH = re.compile(r"chkhsh:\s+([0-9a-f]{64})")
_MISMATCH = re.compile(f"{PreTokenizerMismatch.__name__}: (.*)")
_UNSUPPORTED = re.compile(r"Model (\S+) is not supported")
_ERROR_LINE = re.compile(r"^(ERROR:|[\w.]*(Error|Exception|Exit)\b)")


def _last_error_line(stderr: str, returncode: int) -> str:
    """The converter's last error line: an uncaught exception's last line or its last ERROR
    log line (progress bars and warnings come after them on stderr); or the signal that
    killed it, most often the kernel's OOM killer."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name} (out of memory?)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line
    return lines[-1] if lines else f"exit status {returncode}"


def _conversion_error(merged: Path, stderr: str, returncode: int) -> str:
    if _UNRECOGNISED.search(stderr):
        found = _CHECK_HASH.search(stderr)
        checksum = f" (hash {found.group(1)[:12]}…)" if found else ""
        return (
            f"{merged}: llama.cpp's converter does not recognise the tokenizer's BPE "
            f"pre-tokenizer{checksum}: set export.gguf_pre_tokenizer to the llama.cpp "
            f"pre-tokenizer whose regex matches the tokenizer's (e.g. qwen2, llama-bpe, gpt-2)"
        )
    if found := _MISMATCH.search(stderr):
        return f"{merged}: {found.group(1)}"
    if found := _UNSUPPORTED.search(stderr):
        return (
            f"{merged}: llama.cpp's converter does not support the architecture "
            f"{found.group(1)}: drop the GGUF formats from export.formats for this model"
        )
    return f"{merged}: llama.cpp's converter failed: {_last_error_line(stderr, returncode)}"


def supported_architectures() -> set[str]:
    """The transformers architectures llama.cpp's converter turns into GGUF: its own table
    (`conversion/__init__.py` TEXT_MODEL_MAP), read as text, importing nothing."""
    import ast

    source = (CONVERTER_DIR / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise RuntimeError(f"no TEXT_MODEL_MAP in {CONVERTER_DIR}/conversion/__init__.py")


def architecture_problem(architectures: list[str]) -> str | None:
    """One line when llama.cpp's converter cannot convert a model of `architectures`."""
    supported = supported_architectures()
    if any(CONVERTER_SPELLINGS.get(name, name) in supported for name in architectures):
        return None
    named = ", ".join(architectures) or "none named in its config.json"
    return (
        f"llama.cpp's converter does not support the model's architecture ({named}): "
        "remove the GGUF types from export.formats"
    )


def convert(merged: Path, target: Path, outtype: str, pre_tokenizer: str | None = None) -> None:
    """Write the merged HF folder as a GGUF at `outtype` (f32/f16/bf16/q8_0) with llama.cpp's
    own converter. `pre_tokenizer` names the llama.cpp pre-tokenizer to record for a BPE
    tokenizer the converter does not recognise; a recognised one keeps its own name."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"llama.cpp's converter writes {CONVERTER_TYPES}, not {outtype!r}")
    with _atomic_file(target) as staging:
        command = [
            sys.executable,
            "-m",
            "llm_finetune.exports.convert_gguf",
            str(CONVERTER_DIR),
            pre_tokenizer or "",
            str(merged),
            "--outfile",
            str(staging),
            "--outtype",
            outtype,
        ]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
        timeout = 600 + 600 * size / 1e9  # reads and writes every weight: the disk's pace
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, check=False, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise UserError(
                f"{merged}: llama.cpp's converter did not finish in {timeout:.0f} s: stopped it "
                "(is the disk full or very slow?)"
            ) from None
        if done.returncode != 0:
            raise UserError(_conversion_error(merged, done.stderr, done.returncode))
        if pre_tokenizer:
            _check_pre_tokenizer_known(staging, pre_tokenizer, target.name)


def _check_pre_tokenizer_known(file: Path, pre_tokenizer: str, name: str) -> None:
    """A declared name is written as it is; only llama.cpp's loader knows the valid ones.
    `file` is still the staging copy; `name` is the one a failure shows."""
    with LlamaCppChild(file, name=name) as child:
        try:
            child.call("load", str(file), 512, True)
        except LlamaCppRefused as refused:
            raise UserError(
                f"export.gguf_pre_tokenizer: llama.cpp cannot load a tokenizer with "
                f"pre-tokenizer {pre_tokenizer!r} ({refused}): use one of the names llama.cpp's "
                f"src/llama-vocab.cpp knows (e.g. qwen2, llama-bpe, gpt-2)"
            ) from None


# --- llama.cpp's quantizer and runtime, each in a child process (llama_child.py) ---


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """Quantize a converter-written GGUF with llama.cpp's own quantizer (what llama-quantize
    runs). `gguf_type` is one of formats.GGUF_TYPES or any other type llama.cpp knows (its
    `LLAMA_FTYPE_MOSTLY_<TYPE>`). Tensors whose rows do not fit the type's blocks fall back
    to another type, as in llama-quantize: `gguf_metadata(target)["tensor_types"]` says which."""
    ftype_name = GGUF_TYPES.get(gguf_type, f"MOSTLY_{gguf_type.upper()}")
    with _atomic_file(target) as staging, LlamaCppChild(source) as child:
        try:
            child.call("quantize", str(source), str(staging), ftype_name)
        except LlamaCppRefused as refused:
            if str(refused).startswith("no LLAMA_FTYPE_"):
                raise UserError(
                    f"export.formats: llama.cpp has no quant type {gguf_type!r} ({refused}): "
                    f"use one of {', '.join(GGUF_TYPES)}"
                ) from None
            raise UserError(
                f"{source}: llama.cpp could not quantize it to {gguf_type}: {refused}"
            ) from None
        except LlamaCppFailed as failed:
            raise LlamaCppFailed(f"{failed} to {gguf_type}") from None


class LlamaCppRunner:
    """A GGUF file run in llama.cpp itself, on the CPU: the runtime users run it in. Greedy,
    with a fixed thread count: the same ids give the same logits on every call. llama.cpp
    runs in one child process per file; its crash or hang raises LlamaCppFailed."""

    def __init__(self, file: Path, n_ctx: int) -> None:
        self._child = LlamaCppChild(file)
        try:
            self._child.call("load", str(file), n_ctx)
        except LlamaCppRefused as refused:
            self._child.close()
            raise UserError(f"{file}: llama.cpp cannot load it: {refused}") from None
        except LlamaCppFailed:
            self._child.close()
            raise
        self.n_ctx = n_ctx

    def logits(self, ids: list[int]) -> Any:
        """float32 [len(ids), vocab]: the next-token logits at every position."""
        self._check_fits(len(ids))
        return self._child.call("eval", ids)

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `ids`; stops after a token llama.cpp counts as
        end-of-generation (the GGUF's EOS, EOT, ...), which is then the last id returned."""
        self._check_fits(len(ids))
        return self._child.call("generate", ids, max_new_tokens, self.n_ctx)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of `text`, special tokens parsed and BOS added as the GGUF
        says: compared with the HF tokenizer's to show both split text alike."""
        return self._child.call("tokenize", text)

    def _check_fits(self, count: int) -> None:
        if count > self.n_ctx:
            raise ValueError(f"{count} tokens do not fit the runner's context of {self.n_ctx}")

    def close(self) -> None:
        self._child.close()


def gguf_metadata(file: Path) -> dict[str, Any]:
    """What a GGUF says about itself (read by gguf-py, not llama.cpp): the table and the
    consistency checks compare these with the merged model's."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(file)

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    file_type = field("general.file_type")
    return {
        "architecture": field("general.architecture"),
        "file_type": None if file_type is None else LlamaFileType(file_type).name,
        "chat_template": field("tokenizer.chat_template"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
    }
