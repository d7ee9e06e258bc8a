"""Read and write safetensors files one tensor at a time.

The `safetensors` library writes a file from a dict of every tensor in it, and reads through
a memory map whose touched pages stay resident while the file is open. A merge of a large
checkpoint needs neither: the header fixes every offset in advance, so a shard can be written
tensor by tensor (peak memory: one tensor), and tensors the merge does not change are copied
as raw bytes, never decoded. The format: an 8-byte little-endian header length, a JSON header
(`dtype`, `shape`, `data_offsets` per tensor, padded with spaces to 8 bytes), then the data.
"""

from __future__ import annotations

import json
import math
import struct
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
NAMES = {dtype: name for name, dtype in DTYPES.items()}
COPY_CHUNK = 64 << 20


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


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor, read with a plain file read into memory owned by the tensor (no mmap)."""
    if info.dtype not in DTYPES:
        raise ValueError(f"tensor {info.name} has dtype {info.dtype}, which cannot be merged")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    buffer = bytearray(info.nbytes)
    f.seek(info.start)
    f.readinto(buffer)
    return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(info.shape)


class ShardWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are declared up front."""

    def __init__(
        self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
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
        self.data_bytes = offset
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def _check(self, name: str, nbytes: int) -> None:
        expected_name, expected_bytes = self._expected[self._next]
        if (name, nbytes) != (expected_name, expected_bytes):
            raise ValueError(f"shard layout mismatch at {name} (expected {expected_name})")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        self._check(name, data.numel())
        self._file.write(memoryview(data.numpy()))

    def copy_raw(self, name: str, source: BinaryIO, info: TensorInfo) -> None:
        """Copy an unchanged tensor's bytes in bounded chunks."""
        self._check(name, info.nbytes)
        source.seek(info.start)
        left = info.nbytes
        while left:
            chunk = source.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"{source.name} ended early while copying {name}")
            self._file.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        if self._next != len(self._expected):
            self._file.close()
            raise ValueError(
                f"shard incomplete: {self._next}/{len(self._expected)} tensors written"
            )
        self._file.close()
