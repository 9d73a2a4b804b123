"""A random PEFT adapter for a model folder: fuse, export and verify need one whose B is nonzero."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_lora.model.load import load_base
from mlx_lora.model.lora import LoRALinear, adapter_config, apply_lora, save_adapter


def random_adapter(
    base: Path,
    out: Path,
    *,
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
    r: int = 4,
    alpha: float = 8.0,
    scale: float = 0.1,
    seed: int = 0,
    system_prompt: str | None = None,
) -> Path:
    """A PEFT adapter for ``base`` with PEFT's A init and a random nonzero B (so it matters)."""
    mx.random.seed(seed)
    model, _, _ = load_base(Path(base), dtype=mx.float32)
    apply_lora(model, list(targets), r, alpha)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_B = mx.random.normal(m.lora_B.shape) * scale
    cfg = adapter_config(
        r=r,
        alpha=alpha,
        dropout=0.0,
        targets=list(targets),
        base_model=str(base),
        extra={"system_prompt": system_prompt},
    )
    save_adapter(Path(out), model, cfg)
    return Path(out)
