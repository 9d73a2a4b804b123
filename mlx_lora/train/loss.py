"""The training loss: packed rows projected to the vocabulary only where it counts, or the model's
own forward for every other architecture.

Two paths compute the same loss (token cross-entropy summed over the answer tokens). The packed
path drives the blocks of the architectures in :data:`PACKED_TYPES` layer by layer; every other
architecture mlx-lm loads takes the general path: its own ``model(inputs)`` (so embedding scales,
logit soft-capping, sliding windows are its own), one example per row, the loss gathered at the
same target positions. Both are checked against mlx-lm's plain forward in the tests.

A Qwen vocabulary has 151,936 entries; a ``[batch, seq, vocab]`` logits tensor is most of the
memory of a small-model step, and most positions are prompt or padding. So the blocks run once
over the packed rows (attention confined to each example: per example for the blocks
:mod:`mlx_lora.train.forward` drives, by a block-diagonal mask for the others), the hidden states of
target positions are gathered, and the cross-entropy is computed chunk by chunk (with gradient
checkpointing, each chunk is recomputed in the backward pass instead of kept).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.data.dataset import Batch, make_batch
from mlx_lora.model import kernels
from mlx_lora.model.families import FAMILIES
from mlx_lora.train import forward
from mlx_lora.train.forward import fast_path, lanes

LOSS_CHUNK = 128  # rows of [chunk, vocab] logits alive at once: 78 MB for Qwen's vocab in fp32

# Architectures whose blocks are (embed → layers(x, mask, cache) → norm → head): the packed path
# drives them with its own block-diagonal mask, minding what mlx-lm's Model does around the blocks
# (Gemma's embedding scale and final logit soft-capping, Gemma 3's sliding-window layers): the
# model types of the families marked ``packed_loss``.
PACKED_TYPES = tuple(t for f in FAMILIES.values() if f.packed_loss for t in f.model_types)


def training_path(model_type: str | None) -> str:
    """``packed`` for :data:`PACKED_TYPES`, else ``general``."""
    return "packed" if model_type in PACKED_TYPES else "general"


def attention_mask(segments: mx.array) -> mx.array:
    """``[rows, 1, L, L]`` boolean: causal, and only within the same segment (example)."""
    length = segments.shape[1]
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    same = segments[:, :, None] == segments[:, None, :]
    return mx.logical_and(same, causal)[:, None]


def _checkpointed(layer: nn.Module):
    """Recompute the block's activations in the backward pass instead of storing them."""

    def call(x: mx.array, mask: mx.array) -> mx.array:
        def inner(params: Any, x: mx.array) -> mx.array:  # the mask is closed over: no VJP for it
            layer.update(params)
            return layer(x, mask, None)

        return mx.checkpoint(inner)(layer.trainable_parameters(), x)

    return call


def _embed(model: nn.Module, inputs: mx.array) -> mx.array:
    """The embedding as the model's own forward scales it (Gemma: by √hidden; Gemma 3 rounds the
    factor to bf16 first, as mlx-lm does)."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    kind = getattr(model, "model_type", None)
    if kind == "gemma2":
        h = h * (inner.args.hidden_size**0.5)
    elif kind == "gemma3_text":
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    return h


def _layer_masks(model: nn.Module, mask: mx.array) -> list[mx.array]:
    """Per block: ``mask``, narrowed to the sliding window on Gemma 3's local layers."""
    inner = model.model
    layers = inner.layers
    if getattr(model, "model_type", None) == "gemma2" and layers[0].self_attn.repeats > 1:
        mask = mask[:, :, None]  # its attention groups query heads as [B, kv, repeats, L, L]
    pattern = getattr(inner, "sliding_window_pattern", 1)
    if getattr(model, "model_type", None) != "gemma3_text" or pattern <= 1:
        return [mask] * len(layers)
    n = mask.shape[-1]
    pos = mx.arange(n)
    window = mx.logical_and(mask, (pos[:, None] - pos[None, :]) < inner.window_size)
    return [mask if i % pattern == pattern - 1 else window for i in range(len(layers))]


def hidden_states(
    model: nn.Module, inputs: mx.array, mask: mx.array, checkpoint: bool = False
) -> mx.array:
    """Final-norm hidden states of a standard decoder (embed → blocks → norm) under ``mask``."""
    inner = model.model
    h = _embed(model, inputs)
    for layer, m in zip(inner.layers, _layer_masks(model, mask), strict=True):
        h = _checkpointed(layer)(h, m) if checkpoint else layer(h, m, None)
    return inner.norm(h)


def project(model: nn.Module, h: mx.array) -> mx.array:
    """The output head: ``lm_head`` or the tied embedding, soft-capped where the model caps."""
    if "lm_head" in model and not getattr(model, "tie_word_embeddings", False):
        out = model.lm_head(h)
    else:
        out = model.model.embed_tokens.as_linear(h)
    cap = getattr(model, "final_logit_softcapping", None)
    return mx.tanh(out / cap) * cap if cap else out


def loss_sum(
    model: nn.Module,
    inputs: mx.array,
    segments: mx.array,
    targets: mx.array,
    labels: mx.array,
    weights: mx.array,
    checkpoint: bool = False,
    chunk: int = LOSS_CHUNK,
    layout: forward.Layout | None = None,
) -> mx.array:
    """Sum (not mean) of token cross-entropies: micro-batches add up to the large batch exactly.

    Models :func:`mlx_lora.train.forward.fast_path` accepts run row by row, each row trimmed to its
    examples, on its own lane (:func:`mlx_lora.train.forward.cpu_lanes`), attention per example; the
    other packed architectures run all rows at once under the block-diagonal mask."""
    if not forward.fast_path(model):
        h = hidden_states(model, inputs, attention_mask(segments), checkpoint)
        h = h.reshape(-1, h.shape[-1])[targets]
        return _head_loss(model, h, labels, weights, checkpoint, chunk)
    if layout is None or not layout.row_targets:
        layout = forward.Layout.from_segments(
            np.array(segments), np.array(targets), np.array(weights)
        )
    total = mx.array(0.0, dtype=mx.float32)
    for r, (t0, t1) in enumerate(layout.row_targets):
        if t1 == t0:  # a row without targets cannot change the loss
            continue
        with mx.stream(forward.lane_stream(r)):
            row = layout.row(r)
            h = forward.hidden_states(model, inputs[r : r + 1, : row.length], row, checkpoint)
            h = h[0][targets[t0:t1] - r * layout.length]
            total = total + _head_loss(model, h, labels[t0:t1], weights[t0:t1], checkpoint, chunk)
    return total


def _head_loss(
    model: nn.Module,
    h: mx.array,
    labels: mx.array,
    weights: mx.array,
    checkpoint: bool,
    chunk: int,
) -> mx.array:
    """Weighted cross-entropy sum of target hidden states ``h`` [n, hidden], chunk by chunk."""

    def chunk_ce(yc: mx.array, wc: mx.array):
        def ce(hc: mx.array) -> mx.array:  # labels/weights closed over: integers have no VJP
            return (kernels.cross_entropy(project(model, hc), yc) * wc).sum()

        # With gradient checkpointing each chunk's logits are recomputed in the backward pass
        # (memory stays at one chunk); without it they are kept (about 10% faster).
        return mx.checkpoint(ce) if checkpoint else ce

    total = mx.array(0.0, dtype=mx.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + chunk_ce(labels[s : s + chunk], weights[s : s + chunk])(h[s : s + chunk])
    return total


def target_logps(
    model: nn.Module,
    inputs: mx.array,
    segments: mx.array,
    targets: mx.array,
    labels: mx.array,
    n_real: int,
    path: str = "packed",
    checkpoint: bool = False,
    layout: forward.Layout | None = None,
) -> mx.array:
    """Log-probability of each of the first ``n_real`` target tokens (row-major order), on the
    same forward as :func:`loss_sum` (``general``: the model's own): what preference losses sum
    per sequence."""

    def logps(h: mx.array, y: mx.array) -> mx.array:
        parts = [
            -kernels.cross_entropy(project(model, h[s : s + LOSS_CHUNK]), y[s : s + LOSS_CHUNK])
            for s in range(0, h.shape[0], LOSS_CHUNK)
        ]
        return mx.concatenate(parts) if parts else mx.zeros((0,), mx.float32)

    t, y = targets[:n_real], labels[:n_real]
    if path != "packed":
        logits = model(inputs)
        flat = logits.reshape(-1, logits.shape[-1])[t].astype(mx.float32)
        return -nn.losses.cross_entropy(flat, y)
    if not forward.fast_path(model):
        h = hidden_states(model, inputs, attention_mask(segments), checkpoint)
        return logps(h.reshape(-1, h.shape[-1])[t], y)
    if layout is None or not layout.row_targets:
        layout = forward.Layout.from_segments(
            np.array(segments), np.array(targets), (np.arange(len(targets)) < n_real) * 1.0
        )
    parts = []
    for r, (t0, t1) in enumerate(layout.row_targets):
        if t1 == t0:
            continue
        with mx.stream(forward.lane_stream(r)):
            row = layout.row(r)
            h = forward.hidden_states(model, inputs[r : r + 1, : row.length], row, checkpoint)
            parts.append(logps(h[0][targets[t0:t1] - r * layout.length], labels[t0:t1]))
    return mx.concatenate(parts)


def reference_loss_sum(model: nn.Module, inputs: mx.array, loss_mask: mx.array) -> mx.array:
    """The plain loss (full logits, one example per row, mlx-lm's own forward), for comparisons."""
    logits = model(inputs[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, inputs[:, 1:])
    return (ce * loss_mask[:, 1:]).sum()


def general_loss_sum(
    model: nn.Module,
    inputs: mx.array,
    segments: mx.array,
    targets: mx.array,
    labels: mx.array,
    weights: mx.array,
    checkpoint: bool = False,
    chunk: int = LOSS_CHUNK,
) -> mx.array:
    """:func:`loss_sum` through the model's own forward (rows hold one example each, padded on
    the right, so its own causal mask is the right one); ``checkpoint`` is applied by
    :func:`checkpoint_layers` beforehand."""
    logits = model(inputs)
    flat = logits.reshape(-1, logits.shape[-1])[targets].astype(mx.float32)
    return (nn.losses.cross_entropy(flat, labels) * weights).sum()


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_layers(model: nn.Module) -> None:
    """Gradient checkpointing for a model the general path runs: each block instance gets a
    subclass whose call recomputes its activations in the backward pass. Parameter names (and so
    the PEFT names of the adapter) stay as they are, and no other model is touched."""
    for layer in model.layers:
        cls = type(layer)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self: nn.Module, *args: Any, _call: Any = call, **kw: Any) -> Any:
                def inner(params: Any, *a: Any) -> Any:
                    self.update(params)
                    return _call(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args)

            _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": checkpointed})
        layer.__class__ = _CHECKPOINTED[cls]


def batch_arrays(b: Batch) -> tuple[mx.array, ...]:
    return (
        mx.array(b.inputs),
        mx.array(b.segments),
        mx.array(b.targets),
        mx.array(b.labels),
        mx.array(b.weights),
    )


def all_sum(x: float, group: mx.distributed.Group | None) -> float:
    if group is None or group.size() == 1:
        return x
    return mx.distributed.all_sum(mx.array(x, dtype=mx.float32), group=group, stream=mx.cpu).item()


def evaluate(
    model: nn.Module,
    examples: list,
    batch_size: int,
    max_len: int,
    packing: bool,
    pad_id: int,
    group: mx.distributed.Group | None = None,
    path: str = "packed",
) -> float:
    """Mean token cross-entropy over the validation examples (laid out as in training, by rank);
    ``path`` is :func:`mlx_lora.train.loss.training_path`'s."""
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    model.eval()
    total, count = 0.0, 0
    mine = examples[rank::world]
    fn = loss_sum if path == "packed" else general_loss_sum
    eager = path == "packed" and fast_path(model)  # exact shapes, rows side by side
    for i in range(0, len(mine), batch_size):
        chosen = mine[i : i + batch_size]
        packed = packing and path == "packed"
        b = (
            make_batch(chosen, max_len, packed, pad_id, pad_to=1, lanes=lanes())
            if eager
            else make_batch(chosen, max_len, packed, pad_id)
        )
        loss = fn(model, *batch_arrays(b))
        total += loss.item()
        count += b.n_target_tokens
    model.train()
    return all_sum(total, group) / max(all_sum(float(count), group), 1.0)
