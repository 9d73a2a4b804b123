"""The decoder forward of a training step: linears over packed rows, attention per example.

Packing puts a batch's examples side by side in rows so that the linears see no padding. Attention
over a packed row with a block-diagonal mask, however, costs rows × length² — on a CPU, where MLX
has no fused attention and its softmax is slow, that made a 30-layer model slower than unpacked
training. Here each example attends only to itself: its queries, keys and values are sliced out
of the row, rotated from position 0 (as at inference), and attend under a causal mask; outputs are
put back in place. The work is Σ lengthᵢ² instead of length², shapes are whatever the batch holds
(this runs eagerly: nothing is compiled per shape), and SwiGLU/softmax use
:mod:`mlx_lora.model.kernels`.

The blocks of the architectures in :data:`FAST_TYPES` are driven here (the same modules, weights
and LoRA layers as mlx-lm's forward; tests check the outputs match). Other models run their own
``layer(x, mask)`` with the block-diagonal mask.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.model import kernels
from mlx_lora.model.families import FAMILIES

# mlx-lm modules whose blocks are: x + attn(norm(x)); h + mlp(norm(h)), attention q/k/v/o with
# RoPE (and qwen3's q/k norms), MLP down(silu(gate) · up): the families marked ``fast_forward``.
FAST_TYPES = tuple(f.model_types[0] for f in FAMILIES.values() if f.fast_forward)


@dataclass(frozen=True)
class Layout:
    """Where each example sits: ``spans`` of (row, start, length), in row-major order, and per
    row the slice [start, stop) of the batch's target arrays that falls in it."""

    rows: int
    length: int
    spans: tuple[tuple[int, int, int], ...]
    row_targets: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def from_segments(
        segments: np.ndarray, targets: np.ndarray | None = None, weights: np.ndarray | None = None
    ) -> Layout:
        """Spans from per-token segment ids (-1 = padding), computed on the host; with the
        batch's flat ``targets`` (row-major, real ones first: weight > 0), their row slices."""
        segments = np.asarray(segments)
        rows, length = segments.shape
        spans = []
        for r, row in enumerate(segments):
            change = np.flatnonzero(np.diff(row, prepend=-2, append=-2))
            for s, e in zip(change[:-1], change[1:], strict=True):
                if row[s] >= 0:
                    spans.append((r, int(s), int(e - s)))
        row_targets: tuple = ()
        if targets is not None:
            real = int(np.count_nonzero(np.asarray(weights) > 0)) if weights is not None else None
            owner = np.asarray(targets)[:real] // length
            bounds = np.searchsorted(owner, np.arange(rows + 1))
            row_targets = tuple(
                (int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            )
        return Layout(rows, length, tuple(spans), row_targets)

    def fill(self, row: int) -> int:
        """Tokens of ``row`` up to the end of its last example."""
        return max((s + n for r, s, n in self.spans if r == row), default=0)

    def row(self, row: int) -> Layout:
        """The layout of one row on its own (trimmed to its fill)."""
        spans = tuple((0, s, n) for r, s, n in self.spans if r == row)
        return Layout(1, self.fill(row), spans)


def fast_path(model: nn.Module) -> bool:
    """Whether :func:`block` reproduces this model's own layers."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    kind = type(layers[0]).__module__.rsplit(".", 1)[-1]
    layer = layers[0]
    return (
        kind in FAST_TYPES
        and not any(getattr(lay, "use_sliding", False) for lay in layers)
        and all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and all(hasattr(layer.self_attn, n) for n in ("n_heads", "n_kv_heads", "scale", "rope"))
    )


class Masks:
    """Additive causal masks, one per example length, built once per batch and shared by layers."""

    def __init__(self, dtype: mx.Dtype = mx.float32):
        self.dtype = dtype
        self._by_length: dict[int, mx.array] = {}

    def __call__(self, n: int) -> mx.array:
        if n not in self._by_length:
            idx = mx.arange(n)
            self._by_length[n] = mx.where(
                idx[:, None] >= idx[None, :],
                mx.array(0.0, self.dtype),
                mx.array(-mx.inf, self.dtype),
            )
        return self._by_length[n]


def _attend(q: mx.array, k: mx.array, v: mx.array, scale: float, masks: Masks) -> mx.array:
    """Causal attention of one example: q [1, heads, n, d], k/v [1, kv_heads, n, d]."""
    if not kernels.use_fast_kernels():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    _, heads, n, d = q.shape
    kv = k.shape[1]
    q = (q * scale).reshape(kv, heads // kv, n, d)
    scores = q @ k.reshape(kv, 1, n, d).swapaxes(-1, -2) + masks(n)
    out = kernels.softmax(scores) @ v.reshape(kv, 1, n, d)
    return out.reshape(1, heads, n, d)


def attention(attn: nn.Module, x: mx.array, layout: Layout, masks: Masks) -> mx.array:
    """``attn``'s projections over the packed rows, each example attending to itself only."""
    rows, length, _ = x.shape
    q = attn.q_proj(x).reshape(rows, length, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(rows, length, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(rows, length, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):  # qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    pieces: list[list[mx.array]] = [[] for _ in range(rows)]
    fill = [0] * rows
    for r, s, n in layout.spans:
        if s > fill[r]:  # padding between examples (none when packed)
            pieces[r].append(mx.zeros((1, q.shape[1], s - fill[r], q.shape[3]), q.dtype))
        sl = (slice(r, r + 1), slice(None), slice(s, s + n))
        pieces[r].append(_attend(attn.rope(q[sl]), attn.rope(k[sl]), v[sl], attn.scale, masks))
        fill[r] = s + n
    out_rows = []
    for r in range(rows):
        if fill[r] < length:
            pieces[r].append(mx.zeros((1, q.shape[1], length - fill[r], q.shape[3]), q.dtype))
        out_rows.append(mx.concatenate(pieces[r], axis=2) if len(pieces[r]) > 1 else pieces[r][0])
    out = mx.concatenate(out_rows, axis=0) if rows > 1 else out_rows[0]
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(rows, length, -1))


def mlp(m: nn.Module, x: mx.array) -> mx.array:
    """``down(silu(gate(x)) · up(x))`` with the fast SwiGLU."""
    return m.down_proj(kernels.swiglu(m.gate_proj(x), m.up_proj(x)))


def block(layer: nn.Module, h: mx.array, layout: Layout, masks: Masks) -> mx.array:
    """One decoder block, as mlx-lm's, with per-example attention and the fast SwiGLU."""
    h = h + attention(layer.self_attn, layer.input_layernorm(h), layout, masks)
    return h + mlp(layer.mlp, layer.post_attention_layernorm(h))


def hidden_states(
    model: nn.Module, inputs: mx.array, layout: Layout, checkpoint: bool = False
) -> mx.array:
    """Final-norm hidden states (embed → blocks → norm) of rows laid out as ``layout`` says."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    masks = Masks(h.dtype)
    for layer in inner.layers:
        if checkpoint:
            h = checkpointed(block, layer, layout, masks)(h)
        else:
            h = block(layer, h, layout, masks)
    return inner.norm(h)


def checkpointed(fn: Any, layer: nn.Module, *context: Any):
    """``fn(layer, x, *context)`` recomputed in the backward pass instead of stored."""

    def call(x: mx.array) -> mx.array:
        def inner(params: Any, x: mx.array) -> mx.array:  # context closed over: no VJP for it
            layer.update(params)
            return fn(layer, x, *context)

        return mx.checkpoint(inner)(layer.trainable_parameters(), x)

    return call


_LANES = {"n": 1}
_STREAMS: list = []


def lanes() -> int:
    """Rows a batch should be packed into (see :func:`cpu_lanes`)."""
    return _LANES["n"]


def lane_stream(row: int):
    """The stream that runs ``row`` of a batch: rows run side by side on their own CPU threads
    when :func:`cpu_lanes` set up more than one lane, else all on the default stream."""
    lanes = _LANES["n"]
    if lanes <= 1:
        return mx.default_stream(mx.default_device())
    while len(_STREAMS) < lanes:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[row % lanes]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def lane_count(examples_per_batch: int) -> int:
    """How many rows :func:`cpu_lanes` runs side by side (the memory plan lays batches out so)."""
    lanes = min(_cores(), examples_per_batch) if kernels.use_fast_kernels() else 1
    if os.environ.get("MLX_LORA_LANES", "").isdigit():
        lanes = int(os.environ["MLX_LORA_LANES"])
    return max(1, lanes)


@contextmanager
def cpu_lanes(examples_per_batch: int):
    """Run a batch's rows side by side, one CPU thread each, with BLAS threads sharing the rest.

    MLX computes element-wise operations on one thread per stream; only the matmuls use every
    core. A small model's step is half element-wise work, so on a CPU the batch is packed into
    ``lanes`` rows (as many as cores, at most one per example), each row's forward and backward
    runs on its own stream, and OpenBLAS gets cores // lanes threads. Yields the lane count.
    ``MLX_LORA_LANES=N`` overrides the count (1: one row, all cores to the matmuls).
    """
    lanes = lane_count(examples_per_batch)
    blas = _openblas()
    before = blas[1]() if blas else None
    _LANES["n"] = lanes
    if blas and lanes > 1:
        blas[0](max(1, _cores() // lanes))
    try:
        yield lanes
    finally:
        _LANES["n"] = 1
        if blas and before:
            blas[0](before)


def _openblas():
    """(set, get) of OpenBLAS' thread count when it is the loaded BLAS, else None."""
    try:
        lib = ctypes.CDLL(None)
        return lib.openblas_set_num_threads, lib.openblas_get_num_threads
    except (OSError, AttributeError):
        return None


def keep_buffers() -> None:
    """Make freed memory cheap to reuse on a Linux CPU, where batch shapes change every step.

    MLX's CPU allocator caches freed buffers for reuse at the same size only (32 MB by default)
    and hands the rest to glibc, which returns every large block to the OS at once (mmap/munmap);
    the next step faults its pages in again: about 2.5 µs per 4 KB page on this machine, i.e.
    2.4 ns per float32 element, as much as computing an ``exp``. With glibc serving every size
    from its heap (no mmap, no trimming) and MLX's size-exact cache off, freed buffers are reused
    at any size and the process keeps what its peak needed, no more.
    """
    if not kernels.use_fast_kernels():
        return
    mx.set_cache_limit(0)
    if sys.platform != "linux":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
