"""``--gradient-checkpointing auto``: recompute activations only when the run would not fit without.

Checkpointing trades a third more compute for activation memory. The seed turned it on always; on
a machine where the run fits anyway that is pure loss. ``decide`` estimates the peak of the
largest micro-batch this data can form with activations kept, and compares it with the memory the
process may use. The estimate is deliberately simple (per token and layer: the inputs every
matmul keeps for its backward, attention probabilities per example, the kept logits chunks) and
errs high; a full memory plan (``mlx_lora.plan``) can replace :func:`decide` wholesale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

MEMORY_LIMIT_ENV = "MLX_LORA_MEMORY_LIMIT"  # e.g. "2GB": stands in for a smaller machine
HEADROOM = 0.8  # of the limit: allocator slack, the OS, the rest of the process


@dataclass(frozen=True)
class Decision:
    on: bool
    reason: str  # one clause for the start-up summary


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5G"`` or plain bytes."""
    t = text.strip().upper().removesuffix("B")
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))


def memory_limit() -> int:
    """Bytes this process may use: ``MLX_LORA_MEMORY_LIMIT``, else the device's working set
    (GPU) or MLX's own default limit of 80% of RAM (CPU)."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        try:
            return parse_bytes(env)
        except ValueError:
            pass  # the plan reports malformed values; here it only falls back to the machine
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(0.8 * ram)


def activation_bytes(config: dict, lengths: list[int], n_targets: int, dtype_bytes: int) -> int:
    """Activations kept for the backward pass of one micro-batch of examples of ``lengths``."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    tokens = sum(lengths)
    per_token_layer = 12 * hidden + 6 * inter + 4 * kv  # matmul inputs, norms, residuals, q/k/v
    attention = 3 * heads * sum(n * n for n in lengths)  # scores, probabilities, their gradient
    layers = config["num_hidden_layers"] * (tokens * per_token_layer + attention)
    logits = 3 * n_targets * config["vocab_size"] * 4  # fp32 chunks kept, probabilities, grads
    return layers * dtype_bytes + logits


def decide(
    setting: bool | None,
    config: dict,
    lengths: list[int],
    target_counts: list[int],
    batch_size: int,
    weight_bytes: int,
    dtype_bytes: int,
) -> Decision:
    """Checkpointing on or off, and why. ``setting``: True/False (explicit) or None (auto)."""
    if setting is not None:
        return Decision(setting, "on (as asked)" if setting else "off (as asked)")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:batch_size]
    worst = activation_bytes(
        config, [lengths[i] for i in order], sum(target_counts[i] for i in order), dtype_bytes
    )
    need = weight_bytes + worst
    limit = memory_limit()
    if need <= HEADROOM * limit:
        return Decision(
            False,
            f"off (auto: the largest batch needs about {need / 1e9:.1f} GB without it, "
            f"{limit / 1e9:.1f} GB available)",
        )
    return Decision(
        True,
        f"on (auto: the largest batch would need about {need / 1e9:.1f} GB without it, "
        f"{limit / 1e9:.1f} GB available)",
    )
