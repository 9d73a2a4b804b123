"""The training loss on packed rows, projected to the vocabulary only where it counts.

A Qwen vocabulary has 151,936 entries; a ``[batch, seq, vocab]`` logits tensor is most of the
memory of a small-model step, and most positions are prompt or padding. So the blocks run once
over the packed rows (attention confined to each example by a block-diagonal mask), the hidden
states of target positions are gathered, and the cross-entropy is computed chunk by chunk (with
gradient checkpointing, each chunk is recomputed in the backward pass instead of kept).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

LOSS_CHUNK = 128  # rows of [chunk, vocab] logits alive at once: 78 MB for Qwen's vocab in fp32


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


def hidden_states(
    model: nn.Module, inputs: mx.array, mask: mx.array, checkpoint: bool = False
) -> mx.array:
    """Final-norm hidden states of a standard decoder (embed → blocks → norm) under ``mask``."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    for layer in inner.layers:
        h = _checkpointed(layer)(h, mask) if checkpoint else layer(h, mask, None)
    return inner.norm(h)


def project(model: nn.Module, h: mx.array) -> mx.array:
    """The output head: ``lm_head`` or the tied embedding."""
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def loss_sum(
    model: nn.Module,
    inputs: mx.array,
    segments: mx.array,
    targets: mx.array,
    labels: mx.array,
    weights: mx.array,
    checkpoint: bool = False,
    chunk: int = LOSS_CHUNK,
) -> mx.array:
    """Sum (not mean) of token cross-entropies: micro-batches add up to the large batch exactly."""
    h = hidden_states(model, inputs, attention_mask(segments), checkpoint)
    h = h.reshape(-1, h.shape[-1])[targets]

    def chunk_ce(yc: mx.array, wc: mx.array):
        def ce(hc: mx.array) -> mx.array:  # labels/weights closed over: integers have no VJP
            logits = project(model, hc).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, yc) * wc).sum()

        # With gradient checkpointing each chunk's logits are recomputed in the backward pass
        # (memory stays at one chunk); without it they are kept (about 10% faster).
        return mx.checkpoint(ce) if checkpoint else ce

    total = mx.array(0.0, dtype=mx.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + chunk_ce(labels[s : s + chunk], weights[s : s + chunk])(h[s : s + chunk])
    return total


def reference_loss_sum(model: nn.Module, inputs: mx.array, loss_mask: mx.array) -> mx.array:
    """The plain loss (full logits, one example per row, mlx-lm's own forward), for comparisons."""
    logits = model(inputs[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, inputs[:, 1:])
    return (ce * loss_mask[:, 1:]).sum()
