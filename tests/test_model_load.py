"""Quantize-on-load: the load peak stays near the final size, and the numbers equal the old path's.

The old path read the whole model, cast it, then quantized it (a 4B bf16 base peaked at 8.5 GB to
end at 2.2 GB). ``mlx_lora.model.load.load_base`` reads, casts and quantizes one module at a time.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import make_tiny_model
from mlx.utils import tree_flatten

from mlx_lora.model import load as model_mod
from mlx_lora.model.load import _cast_floats, _quantizable, load_base


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    """8 layers, hidden 512: 26M parameters, large enough for peak-memory differences to show."""
    return make_tiny_model(
        tmp_path_factory.mktemp("load") / "m512",
        hidden_size=512,
        layers=8,
        heads=8,
        kv_heads=8,
        intermediate_size=1408,
    )


def _old_load(model_dir: Path, dtype, quantize):
    """What load_base did before: read everything, cast everything, quantize everything."""
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    if dtype is not None:
        model.update(_cast_floats(model.parameters(), dtype))
    if quantize is not None:
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=_quantizable)
    mx.eval(model.parameters())
    return model


def _nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _largest_leaf_bytes(model_dir: Path) -> int:
    """Full-precision bytes (as stored, bf16) of the largest linear/embedding in the file."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "numpy") as f:
        return max(
            2 * f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[-1] for k in f.keys()
        )


def _peak_of(fn):
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    return out, mx.get_peak_memory() - base


@pytest.mark.parametrize("bits", [4, 8])
def test_load_peak_is_final_size_plus_one_layer(mid_model: Path, bits: int) -> None:
    (model, _, _), peak = _peak_of(lambda: load_base(mid_model, dtype=mx.float32, quantize=bits))
    final = _nbytes(model)
    # one layer's fp32 copy (largest matrix stored bf16, cast to fp32) + 1 MB slack
    one_layer = 3 * _largest_leaf_bytes(mid_model)
    assert peak <= final + one_layer + (1 << 20), (peak, final, one_layer)
    del model
    old, old_peak = _peak_of(lambda: _old_load(mid_model, mx.float32, bits))
    assert _nbytes(old) == final
    assert old_peak > final + one_layer + (1 << 20)  # the bound is one the old path broke


@pytest.mark.parametrize(
    ("dtype", "bits"), [(mx.float32, 4), (mx.float32, 8), (mx.bfloat16, 4), (mx.float32, None)]
)
def test_same_logits_as_loading_everything_first(mid_model: Path, dtype, bits) -> None:
    new, _, _ = load_base(mid_model, dtype=dtype, quantize=bits)
    old = _old_load(mid_model, dtype, bits)
    ids = mx.array([[1, 5, 9, 200, 33, 7, 1000]])
    assert mx.array_equal(new(ids), old(ids)).item()
    flat_new, flat_old = dict(tree_flatten(new.parameters())), dict(tree_flatten(old.parameters()))
    assert flat_new.keys() == flat_old.keys()
    assert all(flat_new[k].dtype == flat_old[k].dtype for k in flat_new)


def test_row_blocks_quantize_like_the_whole_matrix(
    mid_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large matrices (a real embedding) are quantized in row blocks: same bits, lower peak."""
    monkeypatch.setattr(model_mod, "QUANT_CHUNK_BYTES", 256 << 10)  # every matrix is "large" here
    (new, _, _), peak = _peak_of(lambda: load_base(mid_model, dtype=mx.float32, quantize=4))
    old = _old_load(mid_model, mx.float32, 4)
    for (k, a), (_, b) in zip(
        sorted(tree_flatten(new.parameters())), sorted(tree_flatten(old.parameters())), strict=True
    ):
        assert a.shape == b.shape and mx.array_equal(a, b).item(), k
    assert peak <= _nbytes(new) + 3 * _largest_leaf_bytes(mid_model) + (1 << 20)
