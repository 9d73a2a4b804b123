"""Element-wise kernels of a training step that MLX's CPU backend computes slowly, made fast.

On the CPU, MLX evaluates ``exp`` (and so ``sigmoid``, ``silu``, ``softmax``, ``logsumexp``) one
scalar at a time through library calls: about 10 ns per element, i.e. slower than the matmuls of a
small model's block. Here ``exp`` is the same Cephes polynomial MLX uses, written with plain
multiply-adds and an exponent built from integer bits, compiled into one fused loop (a new shape
costs a few ms of tracing, never a C++ build): about 2-3 ns per element, within 2 ulp of
``mx.exp``. Softmax, SwiGLU and cross-entropy built on it carry their own (analytic) gradients, so
autodiff never differentiates the bit tricks. On a GPU MLX's own fused kernels are used.
"""

from __future__ import annotations

import mlx.core as mx

# exp(x) = 2**n · 2**f, n = round(x / ln 2), f in [-0.5, 0.5]; 2**f by Cephes' polynomial.
_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 · 2**23: adding and subtracting it rounds a float32 to an integer
_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)


def use_fast_kernels() -> bool:
    """The polynomial kernels pay off on the CPU only."""
    return mx.default_device().type == mx.DeviceType.cpu


def _exp(x: mx.array) -> mx.array:
    """exp of a float32 array: 0 below -88, about 1.7e38 above 88 (inputs here are bounded)."""
    y = mx.clip(x, -88.0, 88.0) * _LOG2E
    n = (y + _ROUND) - _ROUND
    f = y - n
    p = _POLY[0]
    for c in _POLY[1:]:
        p = p * f + c
    two_n = mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)
    return two_n * p


fast_exp = mx.compile(_exp)


@mx.compile
def _softmax_fwd(x: mx.array) -> mx.array:
    e = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@mx.compile
def _softmax_bwd(p: mx.array, g: mx.array) -> mx.array:
    return p * (g - mx.sum(g * p, axis=-1, keepdims=True))


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    return _softmax_fwd(x)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (_softmax_bwd(output, cotangent),)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, computed in float32, returned in ``x``'s dtype."""
    if not use_fast_kernels():
        return mx.softmax(x, axis=-1, precise=True)
    return _softmax(x.astype(mx.float32)).astype(x.dtype)


@mx.compile
def _swiglu_fwd(gate: mx.array, up: mx.array) -> mx.array:
    return gate / (1.0 + _exp(-gate)) * up


@mx.compile
def _swiglu_bwd(gate: mx.array, up: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    s = 1.0 / (1.0 + _exp(-gate))
    silu = gate * s
    return g * up * (s + silu * (1.0 - s)), g * silu


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_fwd(gate, up)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(*primals, cotangent)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (the MLP of Llama/Qwen/Mistral blocks)."""
    if not use_fast_kernels() or gate.dtype != mx.float32 or up.dtype != mx.float32:
        return gate * mx.sigmoid(gate) * up
    return _swiglu(gate, up)


@mx.compile
def _logsumexp(x: mx.array) -> mx.array:
    m = mx.max(x, axis=-1, keepdims=True)
    return (m + mx.log(mx.sum(_exp(x - m), axis=-1, keepdims=True))).squeeze(-1)


@mx.compile
def _ce_grad(x: mx.array, lse: mx.array, g: mx.array, labels: mx.array) -> mx.array:
    """(softmax(x) - onehot(labels)) · g in one pass and one buffer."""
    onehot = mx.arange(x.shape[-1], dtype=labels.dtype) == labels[..., None]
    return (_exp(x - lse[..., None]) - onehot) * g[..., None]


@mx.custom_function
def _cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    lse = _logsumexp(logits)
    return lse - mx.take_along_axis(logits, labels[..., None], axis=-1).squeeze(-1)


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, output):
    logits, labels = primals
    picked = mx.take_along_axis(logits, labels[..., None], axis=-1).squeeze(-1)
    return _ce_grad(logits, output + picked, cotangent, labels), mx.zeros_like(labels)


def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-row ``logsumexp(logits) - logits[label]`` in float32 (no reduction)."""
    logits = logits.astype(mx.float32)
    if not use_fast_kernels():
        return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
            logits, labels[..., None], axis=-1
        ).squeeze(-1)
    return _cross_entropy(logits, labels)


@mx.compile
def _keep_mask(rows: mx.array, cols: mx.array, seed: mx.array, threshold: mx.array, scale):
    """0 or ``scale`` per element, from a counter-based hash (murmur3's finalizer) of the
    element's index and ``seed``: one fused integer loop instead of MLX's threefry bits."""
    h = (rows * cols.shape[-1] + cols) * 0x9E3779B1 + seed
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return mx.where(h >= threshold, scale, 0.0)


def dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout (keep with probability 1 - p, scale by 1 / (1 - p)). The seed is drawn
    from MLX's generator, so ``mx.random.seed`` makes the masks reproducible."""
    if p <= 0:
        return x
    if not use_fast_kernels():
        keep = mx.random.bernoulli(1 - p, x.shape)
        return mx.where(keep, x * (1 / (1 - p)), 0)
    cols = x.shape[-1]
    rows = x.size // cols
    seed = mx.random.randint(0, 2**31 - 1, (), dtype=mx.int32).astype(mx.uint32)
    mask = _keep_mask(
        mx.arange(rows, dtype=mx.uint32)[:, None],
        mx.arange(cols, dtype=mx.uint32)[None, :],
        seed,
        mx.array(min(round(p * 2**32), 2**32 - 1), dtype=mx.uint32),
        mx.array(1 / (1 - p), dtype=x.dtype),
    )
    return x * mask.reshape(x.shape)
