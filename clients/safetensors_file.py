"""Reading the safetensors format (https://github.com/huggingface/safetensors) with every offset checked.

A file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the tensor bytes, offsets relative to their start. Parsing here (rather
than with the ``safetensors`` package) lets a damaged file fail with a message
that says what is wrong before anything is copied or cached.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# A header beyond this is not a real adapter's (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (corrupt or truncated)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its bytes are ``data[start:end]`` of the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse(data: bytes | memoryview, what: str = "file") -> tuple[list[TensorSpec], memoryview]:
    """The tensors of a safetensors file and its data section; ``SafetensorsError`` naming ``what`` if damaged."""
    data = memoryview(data)
    if len(data) < 8:
        raise SafetensorsError(f"{what}: truncated safetensors file ({len(data)} bytes, no header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{what}: not a safetensors file (header length {header_len})")
    if 8 + header_len > len(data):
        raise SafetensorsError(f"{what}: truncated safetensors file (header of {header_len} bytes, file of {len(data)})")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{what}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{what}: corrupt safetensors header (not a JSON object)")
    body = data[8 + header_len:]
    specs = [_spec(name, entry, len(body), what) for name, entry in header.items() if name != "__metadata__"]
    specs.sort(key=lambda s: s.start)
    for before, after in zip(specs, specs[1:]):
        if after.start < before.end:
            raise SafetensorsError(f"{what}: tensors {before.name!r} and {after.name!r} overlap")
    return specs, body


def _spec(name: str, entry, body_len: int, what: str) -> TensorSpec:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{what}: corrupt entry for tensor {name!r}")
    dtype = DTYPES.get(entry.get("dtype"))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise SafetensorsError(f"{what}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{what}: tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{what}: tensor {name!r} has bad data_offsets {offsets!r}")
    start, end = offsets
    if end > body_len:
        raise SafetensorsError(f"{what}: truncated safetensors file (tensor {name!r} ends at byte {end} "
                               f"of a data section of {body_len})")
    if end - start != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{what}: tensor {name!r} has {end - start} bytes for shape {shape} of {dtype}")
    return TensorSpec(name, dtype, tuple(shape), start, end)
