"""llama.cpp's native code (libllama, through llama-cpp-python) run in a child process, so that
a crash inside it rejects one GGUF file instead of ending the run.

llama.cpp can die in ways Python cannot catch: a segfault in a CPU kernel (ggml's AMX
matmul on Sapphire Rapids Xeons), `terminate` on a C++ exception in its tokenizer, the
kernel's OOM killer, a hang. In our process any of these would take the trained, merged and
checked model down with it. Here the parent sends requests over a pipe and turns the child's
death, or its silence past a timeout scaled to the file's size, into one line that names the
signal and the file; the caller rejects that format and the run goes on.

    parent: LlamaCppChild(file).call("load", ...) -> value, or raises LlamaCppFailed
    child:  python -m llm_finetune.exports.llama_child (reads requests on stdin)

Test hook: LLM_FINETUNE_LLAMA_FAULT="<segv|abort|kill|hang>:<op>[:<part of a file name>]"
makes the child die that way when it is asked `op` (load, tokenize, eval, generate,
quantize), for a file whose path contains the given part. LLM_FINETUNE_LLAMA_TIMEOUT_S
replaces the size-scaled timeout of every request.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from llm_finetune.errors import UserError

FAULT_ENV = "LLM_FINETUNE_LLAMA_FAULT"
TIMEOUT_ENV = "LLM_FINETUNE_LLAMA_TIMEOUT_S"
_HEADER = struct.Struct("<QQ")  # each message: the lengths of its JSON and of its array
_VERBS = {
    "load": "loading",
    "tokenize": "tokenizing with",
    "eval": "running",
    "generate": "running",
    "quantize": "quantizing",
    "system_info": "starting on",
}


class LlamaCppFailed(UserError):
    """llama.cpp died, hung or failed to start: the one line says how and on which file."""


class LlamaCppRefused(Exception):
    """llama.cpp answered with an error of its own (a file it cannot load or quantize):
    the caller words the message, as it knows what was asked."""


def timeout_for(size_bytes: int) -> float:
    """Seconds one request about a model of `size_bytes` may take: generous for the slowest
    CPU a check may run on (2 cores evaluate ~1 GB of weights per token step in seconds)."""
    if given := os.environ.get(TIMEOUT_ENV):
        return float(given)
    return 120.0 + 120.0 * size_bytes / 1e9


def signal_name(number: int) -> str:
    """SIGSEGV for 11: what a process's negative return code means."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_CAUSE = re.compile(r"terminate called|what\(\)|GGML_ASSERT|error|failed", re.IGNORECASE)


def _cause(log_text: str) -> str:
    """The log line that says why llama.cpp died, when it says (an assert, an exception)."""
    lines = [line.strip() for line in log_text.splitlines() if _CAUSE.search(line)]
    return lines[-1][:200] if lines else ""


def death_message(returncode: int, log_text: str, doing: str) -> str:
    """One line for a child that ended without answering: `doing` is "running x.gguf"."""
    cause = _cause(log_text)
    because = f": {cause}" if cause else ""
    if returncode < 0:
        name = signal_name(-returncode)
        if name == "SIGKILL":
            return f"llama.cpp was killed (SIGKILL: out of memory?) {doing}"
        return f"llama.cpp crashed ({name}{because}) {doing}"
    return f"llama.cpp's process ended (exit status {returncode}{because}) {doing}"


class LlamaCppChild:
    """One child process that runs llama.cpp for one file (and what is quantized from it);
    every request to it waits at most `timeout_s`. `name`: the file's name in messages."""

    def __init__(self, file: Path, timeout_s: float | None = None, name: str = "") -> None:
        self.file = file
        self.name = name or file.name
        size = file.stat().st_size if file.is_file() else 0
        self.timeout_s = timeout_for(size) if timeout_s is None else timeout_s
        # The child's stderr (llama.cpp's last words), closed by close().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, "-m", "llm_finetune.exports.llama_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    def call(self, op: str, *args: Any) -> Any:
        """Ask the child `op(*args)`; its answer, or LlamaCppRefused with llama.cpp's reason,
        or LlamaCppFailed when it died or did not answer in time (it is then stopped)."""
        doing = f"{_VERBS.get(op, op)} {self.name}"
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(_encode(op, list(args)))
            self._process.stdin.flush()
            status, value = self._receive(time.monotonic() + self.timeout_s)
        except (BrokenPipeError, EOFError):
            raise LlamaCppFailed(self._died(doing)) from None
        except TimeoutError:
            self._stop()
            raise LlamaCppFailed(
                f"llama.cpp gave no answer in {self.timeout_s:.0f} s {doing}: stopped it "
                f"(a slower machine may set {TIMEOUT_ENV})"
            ) from None
        if status == "refused":
            raise LlamaCppRefused(value)
        return value

    def _receive(self, deadline: float) -> tuple[str, Any]:
        assert self._process.stdout is not None
        header = self._read(self._process.stdout, _HEADER.size, deadline)
        text, array = (
            self._read(self._process.stdout, n, deadline) for n in _HEADER.unpack(header)
        )
        return _decode(text, array)

    @staticmethod
    def _read(stream: BinaryIO, count: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        while count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(stream.fileno(), min(count, 1 << 24))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def _log_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def _died(self, doing: str) -> str:
        try:
            returncode = self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # closed its pipe but still running: stop it
            self._stop()
            returncode = self._process.returncode
        return death_message(returncode, self._log_text(), doing)

    def _stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def close(self) -> None:
        """End the child (politely: it closes the model; killed if it does not exit)."""
        if self._process.poll() is None:
            with contextlib.suppress(OSError):
                assert self._process.stdin is not None
                self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._stop()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()

    def __enter__(self) -> LlamaCppChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the child: llama-cpp-python, its log kept off stderr but for the cause of an error ---

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h of this commit (llama_cpp/_logger.py's 3 is outdated)


class _Worker:
    """The requests the child answers, each one llama.cpp call on the loaded file."""

    def __init__(self) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.errors: list[str] = []

        @llama_cpp.llama_log_callback
        def keep_errors(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            if level == _GGML_LOG_LEVEL_ERROR and len(self.errors) < 10:
                self.errors.append(text.decode("utf-8", "replace"))

        self._callback = keep_errors  # referenced for as long as libllama may call it
        llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.llama: Any = None
        self.file = ""  # the loaded one
        self.n_threads = len(os.sched_getaffinity(0))

    def first_error(self) -> str:
        """The first error llama.cpp logged for this request: the cause (what follows is
        "failed to load model" and the like), without the C function's name."""
        lines = (line.strip() for text in self.errors for line in text.splitlines())
        first = next((line for line in lines if re.search("[A-Za-z]", line)), "")
        return re.sub(r"^\w+: ", "", first)

    def system_info(self) -> str:
        return self.llama_cpp.llama_print_system_info().decode()

    def load(self, file: str, n_ctx: int, vocab_only: bool = False) -> None:
        if self.llama is not None:
            self.llama.close()
            self.llama = None
        self.file = file
        try:
            self.llama = self.llama_cpp.Llama(
                model_path=file,
                n_ctx=n_ctx,
                n_gpu_layers=0,
                logits_all=not vocab_only,
                vocab_only=vocab_only,
                seed=0,
                n_threads=self.n_threads,
                verbose=False,
            )
        except ValueError:
            raise LlamaCppRefused(self.first_error() or "no reason given") from None

    def _evaluate(self, ids: list[int]) -> None:
        self.llama.reset()
        self.llama.eval(ids)

    def eval(self, ids: list[int]) -> Any:
        import numpy as np

        self._evaluate(ids)
        return np.array(self.llama.scores[: len(ids)], dtype=np.float32)

    def generate(self, ids: list[int], max_new_tokens: int, n_ctx: int) -> list[int]:
        import numpy as np

        vocab = self.llama._model.vocab
        new: list[int] = []
        self._evaluate(ids)
        while len(new) < max_new_tokens:
            token = int(np.argmax(self.llama.scores[self.llama.n_tokens - 1]))
            new.append(token)
            if self.llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            if len(ids) + len(new) >= n_ctx:
                break
            self.llama.eval([token])
        return new

    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def quantize(self, source: str, target: str, ftype_name: str) -> None:
        ftype = getattr(self.llama_cpp, f"LLAMA_FTYPE_{ftype_name}", None)
        if ftype is None:
            raise LlamaCppRefused(f"no LLAMA_FTYPE_{ftype_name} in llama.cpp {self.version()}")
        params = self.llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = self.n_threads
        status = self.llama_cpp.llama_model_quantize(
            source.encode(), target.encode(), ctypes.byref(params)
        )
        if status != 0:
            raise LlamaCppRefused(self.first_error() or f"status {status}")

    def version(self) -> str:
        return self.llama_cpp.__version__


def _fault(op: str, files: list[str]) -> None:
    """The test hook (see the module's docstring): die as a crashing llama.cpp would."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    wanted_op, _, part = rest.partition(":")
    if wanted_op != op or not any(part in file for file in files):
        return
    sys.stderr.flush()
    if kind == "segv":
        ctypes.string_at(0)  # a real segmentation fault, as in ggml's AMX kernel
    elif kind == "abort":
        sys.stderr.write("terminate called after throwing an instance of 'std::out_of_range'\n")
        sys.stderr.flush()
        os.abort()
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        time.sleep(10**6)


def _encode(head: str, value: Any) -> bytes:
    """A request (op, args) or a reply (status, value): JSON, and a float32 array value as
    the .npy bytes after it. No pickle: neither side runs what the other sends."""
    array = b""
    if not isinstance(value, (type(None), str, int, float, list)):  # eval's logits
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        array, value = buffer.getvalue(), None
    text = json.dumps([head, value]).encode("utf-8")
    return _HEADER.pack(len(text), len(array)) + text + array


def _decode(text: bytes, array: bytes) -> tuple[str, Any]:
    head, value = json.loads(text)
    if array:
        import numpy as np

        value = np.load(io.BytesIO(array), allow_pickle=False)
    return head, value


def _read_message(stream: BinaryIO) -> tuple[str, Any] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    text_length, array_length = _HEADER.unpack(header)
    return _decode(stream.read(text_length), stream.read(array_length))


def main() -> None:
    """Answer requests until stdin closes. Replies go to the original stdout; whatever native
    code prints to stdout is sent to stderr (the parent's log of this child) instead."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    worker = _Worker()
    requests = sys.stdin.buffer
    while (request := _read_message(requests)) is not None:
        op, args = request
        _fault(op, [worker.file, *map(str, args)])
        worker.errors.clear()
        try:
            reply = ("ok", getattr(worker, op)(*args))
        except LlamaCppRefused as exc:
            reply = ("refused", str(exc))
        replies.write(_encode(*reply))
        replies.flush()
    if worker.llama is not None:
        worker.llama.close()


if __name__ == "__main__":
    main()
