"""Read and write safetensors files one tensor at a time.

The `safetensors` library writes a file from a dict of every tensor in it, and reads through
a memory map whose touched pages stay resident while the file is open. A merge of a large
checkpoint needs neither: the header fixes every offset in advance, so a shard can be written
tensor by tensor (peak memory: one tensor), and tensors the merge does not change are copied
as raw bytes, never decoded. The format: an 8-byte little-endian header length, a JSON header
(`dtype`, `shape`, `data_offsets` per tensor, padded with spaces to 8 bytes), then the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from llm_finetune.errors import UserError, abbreviated, first_line

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def torch_dtype_name(code: str) -> str:
    """'BF16' -> 'bfloat16', the name config.json and torch use; a code torch lacks, as is."""
    return str(DTYPES[code]).removeprefix("torch.") if code in DTYPES else code


def safetensors_code(name: str) -> str:
    """'bfloat16' -> 'BF16', the code a safetensors header stores."""
    return next(code for code, dtype in DTYPES.items() if dtype == getattr(torch, name))


class DamagedFile(UserError):
    """A file that is not what its name says: cut short, overwritten, or never a safetensors
    file. Refused when its header is read, in one line that names the file, before any output
    is written."""


# Bits per element of every dtype the safetensors format defines (safetensors 0.8's `Dtype`).
FORMAT_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
REFETCH = "download or copy it again, or re-save it with save_pretrained"


def open_for_reading(path: Path) -> BinaryIO:
    """`open(path, "rb")`, with the reasons a user can fix (a dangling link, permissions) as a
    one-line UserError."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        if Path(path).is_symlink():
            raise DamagedFile(
                f"{path} is a link to {os.readlink(path)}, which does not exist; {REFETCH}"
            ) from None
        raise DamagedFile(f"{path} does not exist; {REFETCH}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a safetensors file") from None
    except PermissionError:
        raise UserError(
            f"cannot read {path}: permission denied; make it readable (chmod a+r) or copy it "
            "to a folder you can read"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_header(path: Path) -> Header:
    """The tensors of a safetensors file, checked as the safetensors library checks them
    (names, dtypes, shapes, offsets, sizes, the file's length) from its header alone: a
    damaged file is refused here, not half-way through a merge, and the data is never read."""
    path = Path(path)
    with open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            what = "it is empty" if size == 0 else f"it has only {size} bytes"
            raise DamagedFile(f"{path} is not a safetensors file: {what}; {REFETCH}")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            if prefix + f.read(15) == b"version https://git-lfs":
                raise DamagedFile(
                    f"{path} is a Git LFS pointer, not the weights; fetch them "
                    "(git lfs pull) or download the file again"
                )
            raise DamagedFile(
                f"{path} is not a safetensors file: its first 8 bytes give a header of "
                f"{length} bytes; {REFETCH}"
            )
        if 8 + length > size:
            raise _ended_early(path, size, 8 + length)
        raw = _parse_header(path, f.read(length))
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(path, "__metadata__ is not a map of strings")
    tensors = {name: _tensor_info(path, name, info, 8 + length) for name, info in raw.items()}
    end = 0  # the data must cover the file after the header exactly, tensor after tensor
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.nbytes)):
        if info.start != 8 + length + end:
            raise _damaged(path, f"tensor {info.name!r} overlaps another or leaves a gap")
        end += info.nbytes
    if 8 + length + end > size:
        raise _ended_early(path, size, 8 + length + end)
    if 8 + length + end < size:
        raise _damaged(path, f"{size - 8 - length - end} bytes after its last tensor")
    return Header(path, tensors, metadata)


def _damaged(path: Path, what: str) -> DamagedFile:
    return DamagedFile(f"{path} has a damaged safetensors header ({what}); {REFETCH}")


def _ended_early(path: Path, size: int, needed: int) -> DamagedFile:
    return DamagedFile(
        f"{path} ended early while reading: it has {size} bytes, its header needs {needed} "
        "(a download or copy cut short); download or copy it again"
    )


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    """The header's JSON object; a name given twice is refused (json would keep the last)."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise _damaged(path, f"{twice!r} appears twice")
        return dict(pairs)

    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=refuse_duplicates)
    except UnicodeDecodeError:
        raise _damaged(path, "not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _damaged(path, f"not JSON: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise _damaged(path, f"a JSON {type(raw).__name__}, not an object")
    return raw


def _is_count(value: Any) -> bool:
    """A size or an offset: safetensors stores them as unsigned 64-bit integers."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _tensor_info(path: Path, name: str, info: Any, data_start: int) -> TensorInfo:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise _damaged(path, f"tensor {abbreviated(name)} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FORMAT_BITS:
        raise _damaged(
            path,
            f"tensor {abbreviated(name)} has dtype {abbreviated(dtype)}, which the safetensors "
            "format does not define",
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _damaged(
            path, f"tensor {abbreviated(name)} has shape {abbreviated(shape)}, not a list of sizes"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _damaged(
            path,
            f"tensor {abbreviated(name)} has data_offsets {abbreviated(offsets)}, not [begin, end]",
        )
    begin, end = offsets
    if end < begin:
        raise _damaged(path, f"tensor {abbreviated(name)} ends before it begins: {offsets}")
    bits = 0 if 0 in shape else FORMAT_BITS[dtype]
    for count in shape:  # stops as soon as the size is past the tensor's bytes: never huge
        bits *= count
        if bits > (end - begin) * 8:
            break
    if bits != (end - begin) * 8:
        raise _damaged(
            path,
            f"tensor {abbreviated(name)} has {end - begin} bytes, which is not the size of "
            f"{dtype} x {abbreviated(shape)}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)


def read_rows(f: BinaryIO, info: TensorInfo, rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` (along dim 0) of a tensor, read with a plain file read into memory owned by
    the returned tensor (no mmap, so nothing stays resident afterwards)."""
    if info.dtype not in DTYPES:
        raise UserError(
            f"{f.name}: tensor {info.name} is stored as {info.dtype}, which torch cannot read "
            "here; save it as float32, float16 or bfloat16"
        )
    total = info.shape[0] if info.shape else 1
    start, stop, _ = rows.indices(total)
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    row_bytes = info.nbytes // total if total else 0
    if row_bytes * (stop - start) == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    buffer = torch.empty(row_bytes * (stop - start), dtype=torch.uint8)  # not zero-filled
    f.seek(info.start + start * row_bytes)
    if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise _ended_during_merge(f.name, info.name)
    return buffer.view(DTYPES[info.dtype]).reshape(shape)


def _ended_during_merge(path: str, name: str) -> DamagedFile:
    return DamagedFile(
        f"{path} ended early while reading {name}: it was cut short or replaced while the "
        "merge read it; download or copy it again"
    )


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) file, e.g. an adapter, without keeping a memory map."""
    header = read_header(path)
    with open_for_reading(path) as f:
        return {name: read_rows(f, info) for name, info in header.tensors.items()}


# glibc's mallopt parameter and its documented default (mallopt(3)), and the merge's value.
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 << 10
MERGE_MMAP_THRESHOLD = 1 << 20


@contextlib.contextmanager
def freed_memory_returned_to_the_os() -> Iterator[None]:
    """Serve allocations from 1 MiB up with mmap (glibc), so a freed block leaves the
    process at once; glibc's documented default threshold is set back on the way out.

    glibc otherwise raises its mmap threshold after the first large free, and blocks of the
    next sizes come from a heap that never shrinks: the peak grows with fragmentation. The
    setting is process-wide and mallopt has no getter: training and verification in the same
    process must not inherit it. Any mallopt of the threshold also ends glibc's dynamic
    adjustment for good, so the default (128 KiB, where a fresh process starts) is what can
    be restored: it returns memory at least as readily as the dynamic mode would, at the cost
    of an mmap for mid-size allocations.
    """
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MERGE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)


class ShardWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are declared up front.

    Blocks are handed to a writer thread through a short queue, so computing the next block
    overlaps writing the last one (file writes release the GIL); memory grows by at most
    QUEUE_BLOCKS blocks.
    """

    QUEUE_BLOCKS = 2

    def __init__(
        self, path: Path, layout: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        """`layout`: name -> (dtype, shape), in the order the tensors will be written."""
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by the writer thread
        try:
            self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        except BaseException:  # a full disk already: no thread to close the file
            self._file.close()
            raise
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with self._file:
            while (block := self._queue.get()) is not None:
                if self._error is None:
                    try:
                        self._file.write(block)
                    except BaseException as exc:  # reported by the next put or by close()
                        self._error = exc

    def _put(self, block: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(block)

    def _check(self, name: str, nbytes: int) -> None:
        expected_name, expected_bytes = self._expected[self._next]
        if (name, nbytes) != (expected_name, expected_bytes):
            raise ValueError(f"shard layout mismatch at {name} (expected {expected_name})")
        self._next += 1

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write one tensor given as consecutive blocks of rows (or one block)."""
        nbytes = 0
        for part in parts:
            data = part.contiguous().reshape(-1).view(torch.uint8)
            self._put(memoryview(data.numpy()))  # the view keeps the block alive until written
            nbytes += data.numel()
        self._check(name, nbytes)

    def copy_raw(self, name: str, source: BinaryIO, info: TensorInfo) -> None:
        """Copy an unchanged tensor's bytes in bounded chunks."""
        self._check(name, info.nbytes)
        source.seek(info.start)
        left = info.nbytes
        while left:
            chunk = source.read(min(COPY_CHUNK, left))
            if not chunk:
                raise _ended_during_merge(source.name, name)
            self._put(chunk)
            left -= len(chunk)

    def abort(self) -> None:
        """Stop the writer thread after a failure elsewhere; the partial file is the caller's."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        """Wait for the writes; raise if any failed or if a declared tensor is missing."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != len(self._expected):
            raise ValueError(
                f"shard incomplete: {self._next}/{len(self._expected)} tensors written"
            )
