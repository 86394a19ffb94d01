"""The GGUF container: metadata and tensor directory, read without the `gguf` package.

GGUF (llama.cpp's file format) is a little-endian file laid out as

    magic "GGUF" | version u32 | tensor count | metadata count
    metadata:    key (string) | value type u32 | value
    tensor info: name (string) | n_dims u32 | dims | ggml type u32 | data offset u64
    padding to the alignment (metadata `general.alignment`, default 32)
    tensor data: each tensor at data start + its offset

Versions differ only in integer widths: version 1 stores string lengths, array lengths, the two counts and
the tensor dims as u32, versions 2 and 3 as u64. `gguf.GGUFReader` refuses version 1 (the old
stories260K test model is one), so we read the container ourselves. This also lets float (F32/F16/BF16)
files load where the optional `gguf` package is absent, and gives precise errors for truncated files.

This module knows nothing about models: it returns names, shapes and raw type ids. Mapping to Hugging Face
form is in `gguf.py`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (1, 2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value type ids -> struct format of the scalar types.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# numpy dtype strings for reading numeric arrays in one call (a vocabulary has ~10^5 entries).
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file lists it. `dims` are in GGUF order: dims[0] is the fastest-varying one."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # absolute position of the first byte in the file


@dataclass(frozen=True)
class GGUFDirectory:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    file_size: int


class _Truncated(Exception):
    """Raised by `_Cursor` when a read would run past the end of the file."""


class _Corrupt(Exception):
    """Raised when the bytes are there but do not make sense (unknown type, bad utf-8, ...)."""


class _Cursor:
    """Sequential little-endian reads from a buffer, with a bounds check on every read."""

    def __init__(self, buf, size_format: str):
        self.buf = buf
        self.pos = 0
        self.size_format = size_format  # "I" for version 1, "Q" for later versions

    def take(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def size(self) -> int:
        return self.take(self.size_format)

    def string(self) -> str:
        n = self.size()
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"a string at byte {self.pos - n} is not valid UTF-8") from e

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type = self.take("I")
            count = self.size()
            return self.array(item_type, count)
        fmt = _SCALARS.get(type_id)
        if fmt is None:
            raise _Corrupt(f"unknown metadata value type {type_id} at byte {self.pos - 4}")
        return self.take(fmt)

    def array(self, item_type: int, count: int) -> list:
        if item_type in _NUMPY:
            import numpy as np

            itemsize = np.dtype(_NUMPY[item_type]).itemsize
            if self.pos + count * itemsize > len(self.buf):
                raise _Truncated
            values = np.frombuffer(self.buf, dtype=_NUMPY[item_type], count=count, offset=self.pos)
            self.pos += count * itemsize
            return values.tolist()
        return [self.value(item_type) for _ in range(count)]


def read_directory(path: Path) -> GGUFDirectory:
    """Parse the header of the GGUF file at `path`; tensor data is not read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise LoadError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoadError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise LoadError(f"{path}: permission denied") from None


def _parse(path: Path, buf, size: int) -> GGUFDirectory:
    if bytes(buf[:4]) != MAGIC:
        raise LoadError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise LoadError(f"{path}: big-endian GGUF files are not supported")
        raise LoadError(f"{path}: GGUF version {version} is not supported (supported: 1, 2, 3)")

    cursor = _Cursor(buf, "I" if version == 1 else "Q")
    cursor.pos = 8
    try:
        n_tensors = cursor.size()
        n_metadata = cursor.size()
        metadata: dict[str, Any] = {}
        for _ in range(n_metadata):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.take("I"))
        raw_entries = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.take("I")
            if not 1 <= n_dims <= 4:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cursor.size() for _ in range(n_dims))
            type_id = cursor.take("I")
            offset = cursor.take("Q")
            raw_entries.append((name, dims, type_id, offset))
    except _Truncated:
        raise LoadError(f"{path}: truncated GGUF file (header ends early, at {size} bytes)") from None
    except _Corrupt as e:
        raise LoadError(f"{path}: corrupt GGUF file: {e}") from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise LoadError(f"{path}: corrupt GGUF file: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [TensorEntry(name, dims, type_id, data_start + offset) for name, dims, type_id, offset in raw_entries]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise LoadError(f"{path}: corrupt GGUF file: tensor {duplicate!r} is listed twice")
    return GGUFDirectory(version=version, metadata=metadata, tensors=tensors, file_size=size)
