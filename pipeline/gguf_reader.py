"""Read a GGUF file once: header, metadata and tensor table parsed with `struct` over an mmap.

GGUF v2/v3, little-endian (the layout gguf-py writes): magic `GGUF`, version (u32), tensor count
(u64), metadata count (u64), the metadata key/values, the tensor table (name, dims, ggml type,
offset), then the tensor data from the next `general.alignment` boundary (default 32). Tensors are
exposed as read-only numpy views into the map; `dequantize` turns one into float32 with gguf-py's
vectorized `gguf.quants.dequantize`. Parsing a 49k-token vocabulary takes well under a second.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# metadata value type id -> struct format (GGUFValueType in gguf-py: 8 is string, 9 is array)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def dequantizable_types() -> frozenset:
    """The ggml types `dequantize` turns into float32 (gguf-py does the math)."""
    from gguf.constants import GGMLQuantizationType as T

    return frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                      T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: shape in torch order (slowest dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    """Reads little-endian values sequentially; a read past the end is one clear error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def _truncated(self, size: int, what: str) -> InputError:
        return InputError(f"GGUF file {self.path} is truncated or corrupt: reading {what} needs {size} bytes at "
                          f"offset {self.pos}, but the file has {len(self.buf)} bytes; re-download or reinstall it")

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise self._truncated(size, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("Q", what)
        if self.pos + length > len(self.buf):
            raise self._truncated(length, what)
        value = self.buf[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return value

    def value(self, type_id: int, key: str) -> Any:
        if type_id in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[type_id], key)[0]
        if type_id == _STRING:
            return self.string(key)
        if type_id == _ARRAY:
            return self.array(key)
        raise InputError(f"GGUF file {self.path}: metadata key {key} has value type {type_id} at offset {self.pos} "
                         f"(allowed: 0-12); the file is corrupt or newer than this reader")

    def array(self, key: str) -> list:
        item_type, count = self.unpack("IQ", key)
        if item_type in _SCALAR_FORMATS:  # one vectorized read: numeric arrays can be vocab-sized
            dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
            if self.pos + count * dtype.itemsize > len(self.buf):
                raise self._truncated(count * dtype.itemsize, key)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        return [self.value(item_type, key) for _ in range(count)]


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata (Python values, arrays as lists) and its tensor table."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _buf: mmap.mmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view shaped (*shape[:-1], bytes per row)."""
        info = self.tensors[name]
        rows = prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        flat = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return flat.reshape(*info.shape[:-1], info.nbytes // rows)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor in float32, shaped `info.shape` (a view into the file for F32 tensors)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        if info.ggml_type not in dequantizable_types():
            allowed = ", ".join(sorted(t.name for t in dequantizable_types()))
            raise InputError(f"GGUF tensor {name} in {self.path} has ggml type {ggml_type_name(info.ggml_type)}, "
                             f"which cannot be dequantized here (allowed: {allowed}); re-quantize the "
                             f"file to one of these with llama.cpp's llama-quantize")
        values = dequantize(self.raw(name), GGMLQuantizationType(info.ggml_type))
        return values.astype(np.float32, copy=False).reshape(info.shape)


def ggml_type_name(type_id: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown ({type_id})"


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    if len(cur.buf) < 4 or cur.buf[:4] != GGUF_MAGIC:
        raise InputError(f"{cur.path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                         f"point model.gguf_file at a .gguf file")
    cur.pos = 4
    version, tensor_count, kv_count = cur.unpack("IQQ", "the header")
    if version not in GGUF_VERSIONS:
        raise InputError(f"GGUF file {cur.path} has version {version} (allowed: {', '.join(map(str, GGUF_VERSIONS))}, "
                         f"little-endian); convert it with a current llama.cpp")
    return version, tensor_count, kv_count


def _read_tensor_table(cur: _Cursor, count: int, alignment: int) -> dict[str, TensorInfo]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    entries = []
    for index in range(count):
        name = cur.string(f"the name of tensor {index}")
        (n_dims,) = cur.unpack("I", f"tensor {name}")
        dims = cur.unpack(f"{n_dims}Q", f"tensor {name}")
        ggml_type, offset = cur.unpack("IQ", f"tensor {name}")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))  # ggml lists the fastest dim first
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in entries:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise InputError(f"GGUF tensor {name} in {cur.path} has unknown ggml type {ggml_type}; "
                             f"the file is corrupt or newer than the installed gguf package") from None
        nbytes = prod(shape) // block * block_bytes
        start = data_start + offset
        if start + nbytes > len(cur.buf):
            raise InputError(f"GGUF file {cur.path} is truncated: tensor {name} needs bytes {start}..{start + nbytes} "
                             f"but the file has {len(cur.buf)} bytes; re-download or reinstall it")
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    return tensors


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table once; tensor data stays in the map.

    Raises:
        InputError naming the file, the offset and what was expected, for a non-GGUF, truncated or
        corrupt file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        if path.stat().st_size == 0:
            raise InputError(f"GGUF file {path} is empty; re-download or reinstall it")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    version, tensor_count, kv_count = _read_header(cur)
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cur.string(f"metadata key {index}")
        (type_id,) = cur.unpack("I", key)
        metadata[key] = cur.value(type_id, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise InputError(f"GGUF file {path}: general.alignment={alignment} is not a positive integer")
    tensors = _read_tensor_table(cur, tensor_count, alignment)
    return GGUFFile(path, version, metadata, tensors, buf)
