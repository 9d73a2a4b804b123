"""LoRA layers with PEFT semantics, the PEFT adapter format, and the one weight-merging function.

PEFT is what the seed's users (and llama.cpp's ``convert_lora_to_gguf.py``) know, so adapters are
stored exactly as PEFT stores them: ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``, the update
is ``(lora_alpha / r) · B · A``, and B starts at zero so an untrained adapter changes nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.errors import MlxLoraError
from mlx_lora.files import write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Short names the seed's users type (q,k,v,...) → the module names PEFT and HF use.
SHORT_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def normalize_targets(targets: list[str] | str) -> list[str]:
    """``"q,k,v"`` or ``["q_proj", ...]`` → PEFT module names, order kept, duplicates dropped."""
    if isinstance(targets, str):
        targets = targets.split(",")
    names = [SHORT_NAMES.get(t.strip(), t.strip()) for t in targets if t.strip()]
    return list(dict.fromkeys(names))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · dropout(x) · Aᵀ · Bᵀ`` around a frozen (possibly quantized) linear."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(p=dropout)
        # PEFT's default init: kaiming-uniform(a=√5) for A, i.e. U(±1/√in); zeros for B.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_dims), dtype=mx.float32)
        self.lora_B = mx.zeros((out_dims, r), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (self.dropout(x).astype(mx.float32) @ self.lora_A.T) @ self.lora_B.T
        return y + (self.scale * z).astype(y.dtype)


def linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (plain or quantized) inside the transformer blocks, by its HF module path."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.QuantizedLinear) and ".layers." in f".{path}"
    }


def apply_lora(
    model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Freeze ``model`` and wrap the target linears of every layer; returns the wrapped paths."""
    if r <= 0:
        raise MlxLoraError(f"--lora-r must be a positive integer, got {r}")
    linears = linear_paths(model)
    available = sorted({p.rsplit(".", 1)[-1] for p in linears})
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise MlxLoraError(
            f"unknown target module(s) {', '.join(unknown)}; this model has: {', '.join(available)}"
        )
    model.freeze()
    wrapped = [p for p in linears if p.rsplit(".", 1)[-1] in targets]
    model.update_modules(
        _unflatten({p: LoRALinear(linears[p], r, alpha, dropout) for p in wrapped})
    )
    return wrapped


def _unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.0.b": v}`` → nested dicts/lists the way ``Module.update_modules`` expects."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors under their PEFT names."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".lora_A", ".lora_B")):
            out[f"{PEFT_PREFIX}{name}.weight"] = value
    return out


def adapter_config(
    *, r: int, alpha: float, dropout: float, targets: list[str], base_model: str, extra: dict
) -> dict:
    """PEFT ``LoraConfig`` fields plus an ``mlx_lora`` section with what chat/export need."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
        "mlx_lora": extra,
    }


def save_adapter(directory: Path, model: nn.Module, config: dict) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = lora_state(model)
    tmp = directory / f".{ADAPTER_WEIGHTS}.tmp-{os.getpid()}.safetensors"
    try:
        mx.save_safetensors(str(tmp), tensors, metadata={"format": "pt"})
        os.replace(tmp, directory / ADAPTER_WEIGHTS)
    except BaseException:  # MLX raises RuntimeError on a full disk; never leave half a file
        tmp.unlink(missing_ok=True)
        raise
    write_json_atomic(directory / ADAPTER_CONFIG, config)


def read_adapter(directory: Path) -> tuple[dict, dict[str, mx.array]]:
    """Config and tensors of an adapter folder, with one-line errors for broken ones."""
    directory = Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise MlxLoraError(
            f"{directory} has no {ADAPTER_CONFIG}: pass the --output-dir of a finished training "
            "run (or one of its checkpoint-N folders)"
        )
    if not w_path.is_file():
        raise MlxLoraError(
            f"{directory} has no {ADAPTER_WEIGHTS}: the run did not finish; resume it with "
            "--resume or use a checkpoint-N folder"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxLoraError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or "r" not in cfg:
        raise MlxLoraError(
            f"{cfg_path}: not a LoRA adapter config (peft_type LORA with r is required)"
        )
    try:
        tensors = mx.load(str(w_path))
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise MlxLoraError(
            f"{w_path}: unreadable safetensors ({e}); the file is damaged, use a checkpoint-N "
            "folder"
        ) from None
    return cfg, tensors


_FINGERPRINT = (
    ("base_model_type", "model_type"),
    ("base_vocab_size", "vocab_size"),
    ("base_hidden_size", "hidden_size"),
    ("base_num_hidden_layers", "num_hidden_layers"),
)


def check_base(adapter_cfg: dict, base_config: dict, directory: Path) -> None:
    """Refuse a base that differs from the one the adapter was trained on (architecture, vocabulary,
    width, depth), even where the LoRA shapes would happen to fit."""
    recorded = adapter_cfg.get("mlx_lora") or {}
    for key, field_name in _FINGERPRINT:
        want, have = recorded.get(key), base_config.get(field_name)
        if want is not None and have is not None and want != have:
            raise MlxLoraError(
                f"adapter {directory} was trained on another base "
                f"({adapter_cfg.get('base_model_name_or_path')!r}: "
                f"{field_name} {want}, this model {have}); pass that model with --model"
            )


def load_adapter(model: nn.Module, directory: Path, base_config: dict | None = None) -> dict:
    """Wrap ``model`` as the adapter describes and load its weights; returns the adapter config."""
    cfg, tensors = read_adapter(directory)
    if base_config is not None:
        check_base(cfg, base_config, Path(directory))
    targets = normalize_targets(cfg["target_modules"])
    apply_lora(model, targets, int(cfg["r"]), float(cfg["lora_alpha"]), 0.0)
    expected = {k: v.shape for k, v in lora_state(model).items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        raise MlxLoraError(
            f"adapter {directory} does not fit this model ({len(missing)} tensors missing, "
            f"{len(extra)} unexpected, e.g. {name}); "
            f"it was trained on {cfg.get('base_model_name_or_path')!r}: pass that model with "
            "--model"
        )
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise MlxLoraError(
                f"adapter {directory} was trained on another base: {k} has shape "
                f"{tuple(tensors[k].shape)}, "
                f"this model needs {tuple(shape)}; pass {cfg.get('base_model_name_or_path')!r} "
                "with --model"
            )
    set_lora_tensors(model, tensors)
    return cfg


def set_lora_tensors(model: nn.Module, tensors: dict[str, mx.array]) -> None:
    """Load PEFT-named tensors into a model already wrapped by :func:`apply_lora`."""
    model.load_weights(
        [(k[len(PEFT_PREFIX) : -len(".weight")], v) for k, v in tensors.items()], strict=False
    )
    mx.eval(model.parameters())


def to_f32(x: Any) -> np.ndarray:
    """numpy fp32 from a numpy or MLX array (numpy has no bfloat16, so MLX converts first)."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float32)


def merge_weights(
    base: dict[str, np.ndarray], adapter_cfg: dict, adapter: dict[str, Any]
) -> dict[str, np.ndarray]:
    """``W + (alpha / r) · B · A`` in fp32 for every adapted weight; the one merge fuse and export use.

    ``base`` maps HF tensor names (``model.layers.0.self_attn.q_proj.weight``) to arrays of the
    *original* (unquantized) base; untouched tensors are returned as they are.
    """
    scale = float(adapter_cfg["lora_alpha"]) / float(adapter_cfg["r"])
    merged = dict(base)
    for name in adapter:
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        key = f"{module}.weight"
        if key not in base:
            raise MlxLoraError(
                f"adapter tensor {name} has no base weight {key}: the adapter was trained on "
                "another model"
            )
        a = to_f32(adapter[name])
        b = to_f32(adapter[name.replace(".lora_A.", ".lora_B.")])
        w = to_f32(base[key])
        if w.shape != (b.shape[0], a.shape[1]):
            raise MlxLoraError(
                f"adapter tensor {name} does not fit base weight {key} {w.shape}: the adapter was "
                "trained on another model"
            )
        merged[key] = w + scale * (b @ a)
    return merged
