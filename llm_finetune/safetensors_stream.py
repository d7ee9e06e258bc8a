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
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

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


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = json.loads(f.read(length))
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {
        name: TensorInfo(
            name=name,
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
            start=8 + length + info["data_offsets"][0],
            nbytes=info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in raw.items()
    }
    return Header(Path(path), tensors, metadata)


def read_rows(f: BinaryIO, info: TensorInfo, rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` (along dim 0) of a tensor, read with a plain file read into memory owned by
    the returned tensor (no mmap, so nothing stays resident afterwards)."""
    if info.dtype not in DTYPES:
        raise ValueError(f"tensor {info.name} has dtype {info.dtype}, which cannot be merged")
    total = info.shape[0] if info.shape else 1
    start, stop, _ = rows.indices(total)
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    row_bytes = info.nbytes // total if total else 0
    if row_bytes * (stop - start) == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    buffer = torch.empty(row_bytes * (stop - start), dtype=torch.uint8)  # not zero-filled
    f.seek(info.start + start * row_bytes)
    if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise OSError(f"{f.name} ended early while reading {info.name}")
    return buffer.view(DTYPES[info.dtype]).reshape(shape)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) file, e.g. an adapter, without keeping a memory map."""
    header = read_header(path)
    with open(path, "rb") as f:
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
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
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
                raise OSError(f"{source.name} ended early while copying {name}")
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
