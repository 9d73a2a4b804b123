"""The float dtypes a model folder may hold, under every name they go by, and config.json's key.

One table: the name config.json and ``--dtype`` use, MLX's dtype, its size, and safetensors' code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx


class Dtype(NamedTuple):
    mx: mx.Dtype
    nbytes: int
    safetensors: str  # the dtype code in a safetensors header


TABLE: dict[str, Dtype] = {
    "float32": Dtype(mx.float32, 4, "F32"),
    "float16": Dtype(mx.float16, 2, "F16"),
    "bfloat16": Dtype(mx.bfloat16, 2, "BF16"),
}
DTYPES: dict[str, mx.Dtype] = {name: d.mx for name, d in TABLE.items()}
DTYPE_BYTES: dict[str, int] = {name: d.nbytes for name, d in TABLE.items()}
SAFETENSORS_CODES: dict[str, str] = {name: d.safetensors for name, d in TABLE.items()}
CONFIG_KEY = "torch_dtype"  # transformers ≥ 4.56 also writes "dtype"; both are read


def dtype_name(dtype: mx.Dtype) -> str:
    """``mx.bfloat16`` → ``"bfloat16"`` (the name config.json uses)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def config_dtype(config: dict[str, Any], default: str | None = None) -> str | None:
    """The weights' dtype a config.json states (``torch_dtype``, or the newer ``dtype``)."""
    name = config.get(CONFIG_KEY) or config.get("dtype")
    return str(name) if name else default


def set_config_dtype(config: dict[str, Any], name: str) -> None:
    config[CONFIG_KEY] = name
