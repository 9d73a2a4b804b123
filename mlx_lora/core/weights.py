"""Safetensors checkpoints: which files, which tensors, and reading one tensor at a time.

Every command that touches weights files (hub's folder check, fuse, the GGUF writer, verify) goes
through here, so shard indexes are resolved once and a damaged file fails the same way everywhere.
Headers are read with ``safetensors.safe_open`` (no data touched). Data is read with ``mx.load``,
which is lazy per tensor and, unlike safetensors' numpy backend, reads bfloat16 — the dtype most
checkpoints ship in.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_file, read_json

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file header only."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, BF16, I32, U32, ...

    def load(self) -> mx.array:
        """The tensor as stored (lazy until evaluated)."""
        return load_tensors(self.file)[self.name]

    def f32(self, rows: Any = None) -> np.ndarray:
        """The tensor (or ``rows`` of it: a slice or an index array) as numpy float32."""
        if self.dtype not in FLOAT_DTYPES:
            raise MlxLoraError(
                f"{self.file}: tensor {self.name} has dtype {self.dtype}, not a float type (a "
                "quantized checkpoint?); fuse or dequantize to float16, bfloat16 or float32 first"
            )
        x = self.load()
        if rows is not None:
            x = x[mx.array(rows) if isinstance(rows, np.ndarray) else rows]
        return np.array(x.astype(mx.float32))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: its shard index, else every file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MlxLoraError(f"{index}: no weight_map; re-download the model")
        files = sorted({folder / str(f) for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MlxLoraError(
                f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {INDEX_FILE}; "
                "finish or redo the download"
            )
        return files
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (only PyTorch .bin weights: convert them)" if any(folder.glob("*.bin")) else ""
        raise MlxLoraError(
            f"{folder} has no *.safetensors weights{hint}; pass a complete model folder"
        )
    return files


def file_tensors(path: Path) -> dict[str, TensorInfo]:
    """Name → :class:`TensorInfo` for one safetensors file (header only)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = TensorInfo(path, name, tuple(s.get_shape()), s.get_dtype())
            return out
    except Exception as e:  # noqa: BLE001 - safetensors has its own error type for bad headers
        raise MlxLoraError(
            f"{path}: not a readable safetensors file ({e}); re-download or re-write it"
        ) from None


def folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) Hugging Face checkpoint folder, header only."""
    out: dict[str, TensorInfo] = {}
    for f in weight_files(folder):
        out.update(file_tensors(f))
    return out


def load_tensors(path: Path) -> dict[str, mx.array]:
    """All tensors of one file, lazily (each is read when first evaluated)."""
    try:
        return mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise MlxLoraError(
            f"{path}: unreadable safetensors ({e}); the file is damaged, re-write or re-download it"
        ) from None


def save_tensors(path: Path, tensors: dict[str, mx.array], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (PyTorch's ``format: pt`` marker by default)."""
    with atomic_file(Path(path)) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata=metadata or {"format": "pt"})


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor to write without holding it: its header entry and a source of its bytes."""

    name: str
    dtype: str  # safetensors' name: F32, F16, BF16
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[bytes]]  # the data, row-major, in pieces

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def save_streamed(path: Path, tensors: list[StreamedTensor]) -> None:
    """Write a safetensors file tensor by tensor, so memory stays near one chunk (atomic).

    For checkpoints larger than memory (a dequantized GGUF); :func:`save_tensors` needs every
    tensor in memory at once.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            written = 0
            for piece in t.chunks():
                f.write(piece)
                written += len(piece)
            if written != t.nbytes:
                raise ValueError(f"{t.name}: {written} bytes written, {t.nbytes} expected")
