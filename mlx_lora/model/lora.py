"""LoRA layers with PEFT semantics, the PEFT adapter format, and the one weight-merging function.

PEFT is what the seed's users (and llama.cpp's ``convert_lora_to_gguf.py``) know, so adapters are
stored exactly as PEFT stores them: ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``, the
update is ``(lora_alpha / r) · B · A``, and B starts at zero, so an untrained adapter changes
nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json, write_json_atomic
from mlx_lora.core.weights import load_tensors, save_tensors
from mlx_lora.model import kernels

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


def dense_weight(linear: nn.Module) -> mx.array:
    """The full-precision weight of a plain or quantized linear."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits
        )
    return linear.weight


def row_norm(w: mx.array) -> mx.array:
    """The L2 norm of each output row (PEFT/DoRA's ``weight_norm``), in fp32."""
    return mx.linalg.norm(w.astype(mx.float32), axis=1)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · dropout(x) · Aᵀ · Bᵀ`` around a frozen (maybe quantized) linear.

    With ``dora`` it is PEFT's DoRA: the adapted weight ``W + s·B·A`` is rescaled row by row to a
    learned magnitude ``m`` (initialised to the rows' norms), the norm treated as a constant in
    the backward pass as the DoRA paper and PEFT do. ``active = False`` gives the base model back
    (evaluation compares base and tuned with one copy of the weights).
    """

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dora: bool = False
    ):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(p=dropout)
        self.active = True
        # PEFT's default init: kaiming-uniform(a=√5) for A, i.e. U(±1/√in); zeros for B.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_dims), dtype=mx.float32)
        self.lora_B = mx.zeros((out_dims, r), dtype=mx.float32)
        if dora:
            self.lora_magnitude_vector = row_norm(dense_weight(base))

    @property
    def dora(self) -> bool:
        return "lora_magnitude_vector" in self

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if not self.active:
            return y
        # kernels.dropout: nn.Dropout's semantics with a cheaper generator
        xd = kernels.dropout(x, 1 - self.dropout._p_1) if self.dropout.training else x
        # the scale multiplies the rank-r activations, not the [tokens, out] product
        z = ((xd.astype(mx.float32) @ self.lora_A.T) * self.scale) @ self.lora_B.T
        if not self.dora:
            return y + z.astype(y.dtype)
        w = dense_weight(self.base).astype(mx.float32)
        norm = mx.stop_gradient(row_norm(w + self.scale * (self.lora_B @ self.lora_A)))
        g = self.lora_magnitude_vector / norm
        if self.training and self.dropout.training and self.dropout._p_1 < 1:
            base_out = xd.astype(mx.float32) @ w.T  # PEFT: the dropped-out input, no bias
        else:
            bias = self.base.bias if "bias" in self.base else 0.0
            base_out = (y - bias).astype(mx.float32)
        return y + ((g - 1) * base_out + g * z).astype(y.dtype)


def _layer_of(path: str) -> int | None:
    """The block index in an HF module path (``model.layers.3.mlp.up_proj`` → 3)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def linear_paths(model: nn.Module, layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Every linear (plain or quantized) inside the transformer blocks (of ``layers`` only, when
    given), by its HF module path."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.QuantizedLinear)
        and _layer_of(path) is not None
        and (layers is None or _layer_of(path) in layers)
    }


def apply_lora(
    model: nn.Module,
    targets: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    layers: list[int] | None = None,
    dora: bool = False,
) -> list[str]:
    """Freeze ``model`` and wrap the target linears of every block (or of ``layers``, PEFT's
    ``layers_to_transform``); returns the wrapped paths."""
    if r <= 0:
        raise MlxLoraError(f"--lora-r must be a positive integer, got {r}")
    linears = linear_paths(model, layers)
    available = sorted({p.rsplit(".", 1)[-1] for p in linears})
    targets = resolve_targets(targets, available)
    model.freeze()
    wrapped = [p for p in linears if p.rsplit(".", 1)[-1] in targets]
    model.update_modules(
        _unflatten({p: LoRALinear(linears[p], r, alpha, dropout, dora) for p in wrapped})
    )
    return wrapped


# Where an architecture fuses or renames what the seed's q,k,v,o,gate,up,down mean: Phi-3 keeps
# q/k/v in one qkv_proj and gate/up in gate_up_proj; StarCoder2's MLP is c_fc → c_proj.
TARGET_ALIASES = {
    "q_proj": ("qkv_proj",),
    "k_proj": ("qkv_proj",),
    "v_proj": ("qkv_proj",),
    "gate_proj": ("gate_up_proj", "c_fc"),
    "up_proj": ("gate_up_proj", "c_fc"),
    "down_proj": ("c_proj",),
}


def resolve_targets(targets: list[str], available: list[str]) -> list[str]:
    """The module names of this model that ``targets`` mean (aliases for fused or renamed ones);
    a name the model has in no form is an error listing what it has."""
    out, unknown = [], []
    for t in targets:
        found = [t] if t in available else [a for a in TARGET_ALIASES.get(t, ()) if a in available]
        out += found[:1]
        if not found:
            unknown.append(t)
    if unknown:
        raise MlxLoraError(
            f"unknown target module(s) {', '.join(unknown)}; this model has: {', '.join(available)}"
        )
    return list(dict.fromkeys(out))


def _unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.0.b": v}`` → nested dicts/lists the way ``Module.update_modules`` expects."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors under their PEFT names (DoRA's magnitudes have no ``.weight``)."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".lora_A", ".lora_B")):
            out[f"{PEFT_PREFIX}{name}.weight"] = value
        elif name.endswith(".lora_magnitude_vector"):
            out[f"{PEFT_PREFIX}{name}"] = value
    return out


def set_active(model: nn.Module, active: bool) -> None:
    """Switch every LoRA layer on or off (off = the base model, with no second copy of it)."""
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.active = active


def adapter_config(
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    base_model: str,
    extra: dict,
    layers: list[int] | None = None,
    dora: bool = False,
) -> dict:
    """PEFT ``LoraConfig`` fields plus an ``mlx_lora`` section with what chat/export need."""
    return {
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
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
        "use_dora": dora,
        "revision": None,
        "mlx_lora": extra,
    }


def save_adapter(directory: Path, model: nn.Module, config: dict) -> None:
    """Write ``adapter_model.safetensors``, then ``adapter_config.json`` (each atomically), so a
    folder with a config always has its weights."""
    save_tensors(Path(directory) / ADAPTER_WEIGHTS, lora_state(model))
    write_json_atomic(Path(directory) / ADAPTER_CONFIG, config)


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: ``adapter_config.json`` and its tensors under PEFT names.

    The one reader every command uses (chat, resume, fuse, the GGUF adapter writer, verify), so
    PEFT's naming (``base_model.model.<module>.lora_A.weight``) and scaling rules live here only.
    """

    directory: Path
    config: dict
    tensors: dict[str, mx.array]  # lazy: read from disk when first evaluated

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def targets(self) -> list[str]:
        return normalize_targets(self.config.get("target_modules") or [])

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def magnitudes(self) -> dict[str, mx.array]:
        """DoRA: HF module path → the learned magnitude of each output row."""
        suffix = ".lora_magnitude_vector"
        return {
            k.removeprefix(PEFT_PREFIX).removesuffix(suffix): v
            for k, v in self.tensors.items()
            if k.endswith(suffix)
        }

    @property
    def layers(self) -> list[int] | None:
        """PEFT's ``layers_to_transform``: the blocks the adapter covers (None: all)."""
        layers = self.config.get("layers_to_transform")
        return [layers] if isinstance(layers, int) else layers

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def extra(self) -> dict:
        """What mlx_lora recorded beside PEFT's fields (system prompt, base fingerprint, ...)."""
        return self.config.get("mlx_lora") or {}

    def pairs(self) -> dict[str, tuple[mx.array, mx.array]]:
        """HF module path (``model.layers.0.self_attn.q_proj``) → (A ``[r, in]``, B ``[out, r]``)
        of every adapted module."""
        found: dict[str, dict[str, mx.array]] = {}
        for key, value in self.tensors.items():
            if key.endswith(".lora_magnitude_vector"):
                continue
            module, sep, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not sep or part not in ("A.weight", "B.weight"):
                raise MlxLoraError(
                    f"{self.directory / ADAPTER_WEIGHTS}: unexpected tensor {key!r}; only "
                    "lora_A/lora_B weights are supported"
                )
            found.setdefault(module, {})[part[0]] = value
        out = {}
        for module, ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise MlxLoraError(
                    f"{self.directory / ADAPTER_WEIGHTS}: {module} has lora_{''.join(ab)} "
                    "without its partner; the adapter is damaged"
                )
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise MlxLoraError(
                    f"{self.directory / ADAPTER_WEIGHTS}: {module} lora_A {tuple(a.shape)} / "
                    f"lora_B {tuple(b.shape)} do not form [r, in] / [out, r]"
                )
            if a.shape[0] != self.rank(module):
                raise MlxLoraError(
                    f"{self.directory / ADAPTER_WEIGHTS}: {module} has rank {a.shape[0]} but "
                    f"{ADAPTER_CONFIG} says {self.rank(module)}; the adapter is damaged"
                )
            out[module] = (a, b)
        return out

    def _pattern(self, key: str, module: str, default: float) -> float:
        short = module.rsplit(".", 1)[-1]
        table = self.config.get(key) or {}
        return next((v for k, v in table.items() if module.endswith(k) or short == k), default)

    def rank(self, module: str) -> int:
        """PEFT's rank of ``module`` (``rank_pattern`` overrides ``r``)."""
        return int(self._pattern("rank_pattern", module, self.r))

    def scale(self, module: str) -> float:
        """PEFT's factor for ``module``: alpha / r (alpha / √r with rsLoRA), per-module patterns."""
        r, alpha = self.rank(module), self._pattern("alpha_pattern", module, self.alpha)
        return float(alpha) / (math.sqrt(r) if self.config.get("use_rslora") else float(r))


def read_adapter(directory: Path) -> Adapter:
    """The adapter in ``directory``, with one-line errors for folders that are not (whole) ones."""
    directory = Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not directory.is_dir():
        raise MlxLoraError(
            f"--adapter {directory} is not a folder; pass the --output-dir of a training run (or "
            "one of its checkpoint-N folders)"
        )
    if not cfg_path.is_file() and (directory / "config.json").is_file():
        raise MlxLoraError(
            f"{directory} is a model folder (a full fine-tune or a fused model), not an adapter; "
            "pass it with --model"
        )
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
    cfg = read_json(cfg_path)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or "r" not in cfg:
        raise MlxLoraError(
            f"{cfg_path}: not a LoRA adapter config (peft_type LORA with r is required)"
        )
    try:
        int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise MlxLoraError(f"{cfg_path}: r and lora_alpha must be numbers") from None
    return Adapter(directory, cfg, load_tensors(w_path))


_FINGERPRINT = (
    ("base_model_type", "model_type"),
    ("base_vocab_size", "vocab_size"),
    ("base_hidden_size", "hidden_size"),
    ("base_num_hidden_layers", "num_hidden_layers"),
)


def check_base(adapter: Adapter, base_config: dict) -> None:
    """Refuse a base that differs from the one the adapter was trained on (architecture, vocabulary,
    width, depth), even where the LoRA shapes would happen to fit."""
    for key, field_name in _FINGERPRINT:
        want, have = adapter.extra.get(key), base_config.get(field_name)
        if want is not None and have is not None and want != have:
            raise MlxLoraError(
                f"adapter {adapter.directory} was trained on another base ({adapter.base_model!r}: "
                f"{field_name} {want}, this model {have}); pass that model with --model"
            )


def load_adapter(
    model: nn.Module, adapter: Adapter | Path, base_config: dict | None = None
) -> Adapter:
    """Wrap ``model`` as the adapter describes and load its weights."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    if base_config is not None:
        check_base(adapter, base_config)
    apply_lora(
        model,
        adapter.targets,
        adapter.r,
        adapter.alpha,
        0.0,
        layers=adapter.layers,
        dora=adapter.use_dora,
    )
    check_fits(model, adapter.tensors, f"adapter {adapter.directory}", adapter.base_model)
    set_lora_tensors(model, adapter.tensors)
    for path, m in model.named_modules():  # PEFT's factor per module (rsLoRA, alpha_pattern),
        if isinstance(m, LoRALinear):  # the one the merge uses too
            m.scale = adapter.scale(path)
    return adapter


class AdapterSet:
    """Several adapters over one loaded base (``serve --adapter NAME=DIR …``).

    The base is wrapped once, with LoRA layers on the union of the adapters' target modules;
    :meth:`use` points every layer at one adapter's tensors (or switches it off), which costs a
    few hundred attribute assignments and no reload. Each adapter computes exactly what
    :func:`load_adapter` would compute with it alone (same tensors, same ``alpha / r``).
    """

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], base_config: dict):
        self.model, self.adapters, self.current = model, adapters, ""
        self.tensors: dict[str, dict[str, tuple[mx.array, mx.array]]] = {}
        for name, adapter in adapters.items():
            check_base(adapter, base_config)
            if adapter.use_dora:
                raise MlxLoraError(
                    f"adapter {name} ({adapter.directory}) is a DoRA adapter; several adapters on "
                    "one base are LoRA only: serve it alone, or fuse it"
                )
            self.tensors[name] = adapter.pairs()
        wanted = sorted({p for pairs in self.tensors.values() for p in pairs})
        linears = linear_paths(model)
        missing = [p for p in wanted if p not in linears]
        if missing:
            raise MlxLoraError(
                f"an adapter names {missing[0]}, which this base does not have; it was trained "
                "on another base: pass that model with --model"
            )
        model.freeze()
        model.update_modules(_unflatten({p: LoRALinear(linears[p], 1, 1.0) for p in wanted}))
        paths = set(wanted)
        self.layers = {p: m for p, m in model.named_modules() if p in paths}
        for name, pairs in self.tensors.items():
            for path, (_, b) in pairs.items():
                base = self.layers[path].base
                out_dims = base.weight.shape[0]
                if b.shape[0] != out_dims:
                    raise MlxLoraError(
                        f"adapter {name} was trained on another base: {path} has "
                        f"{b.shape[0]} outputs, this model {out_dims}; pass that model with --model"
                    )
        # read now, on this thread: an array left lazy here cannot be evaluated on another one
        mx.eval(
            model.parameters(), [ab for pairs in self.tensors.values() for ab in pairs.values()]
        )
        self.use(None)

    def use(self, name: str | None) -> None:
        """Make the model compute with adapter ``name`` (None: the bare base)."""
        if name == self.current:
            return
        pairs = self.tensors[name] if name is not None else {}
        for path, layer in self.layers.items():
            ab = pairs.get(path)
            layer.active = ab is not None
            if ab is not None:
                layer.lora_A, layer.lora_B = ab
                layer.scale = self.adapters[name].scale(path)
        self.current = name


def check_fits(model: nn.Module, tensors: dict[str, mx.array], what: str, base: Any) -> None:
    """``tensors`` are exactly the LoRA tensors ``model`` was wrapped with, shape for shape."""
    expected = {k: tuple(v.shape) for k, v in lora_state(model).items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise MlxLoraError(
            f"{what} does not fit this model ({len(missing)} tensors missing, {len(extra)} "
            f"unexpected, e.g. {(missing or extra)[0]}); it was trained on {base!r} with other "
            "LoRA settings: pass that model with --model and the same rank/targets"
        )
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise MlxLoraError(
                f"{what} was trained on another base: {k} has shape {tuple(tensors[k].shape)}, "
                f"this model needs {shape}; pass {base!r} with --model"
            )


def set_lora_tensors(model: nn.Module, tensors: dict[str, mx.array]) -> None:
    """Load PEFT-named tensors into a model already wrapped by :func:`apply_lora`."""
    model.load_weights(lora_params_of(tensors), strict=False)
    mx.eval(model.parameters())


def lora_params_of(tensors: dict[str, mx.array]) -> list[tuple[str, mx.array]]:
    """PEFT-named adapter tensors as (parameter path, value) of the wrapped model."""
    return [(k.removeprefix(PEFT_PREFIX).removesuffix(".weight"), v) for k, v in tensors.items()]


def to_f32(x: Any) -> np.ndarray:
    """numpy fp32 from a numpy or MLX array (numpy has no bfloat16, so MLX converts first)."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float32)


def merge_weights(
    base: dict[str, Any], adapter: Adapter, modules: list[str] | None = None
) -> dict[str, Any]:
    """``W + scale · B · A`` in fp32 for every adapted weight; the one merge fuse and export use.

    ``base`` maps HF tensor names (``model.layers.0.self_attn.q_proj.weight``) to arrays of the
    *original* (unquantized) base; ``modules`` limits the merge (one shard of a sharded base).
    Merged weights come back as fp32 numpy, untouched tensors as they are.
    """
    merged = dict(base)
    pairs = adapter.pairs()
    for module in pairs if modules is None else modules:
        key = f"{module}.weight"
        if key not in base:
            raise MlxLoraError(
                f"adapter module {module} has no base weight {key}: the adapter was trained on "
                "another model; pass its base with --model"
            )
        a, b = (to_f32(x) for x in pairs[module])
        w = to_f32(base[key])
        if w.shape != (b.shape[0], a.shape[1]):
            raise MlxLoraError(
                f"adapter module {module} does not fit base weight {key} {w.shape}: the adapter "
                "was trained on another model; pass its base with --model"
            )
        merged[key] = w + adapter.scale(module) * (b @ a)
        if adapter.use_dora:  # PEFT's DoRA merge: each row rescaled to its learned magnitude
            m = to_f32(adapter.magnitudes()[module])
            merged[key] *= (m / np.linalg.norm(merged[key], axis=1))[:, None]
    return merged
