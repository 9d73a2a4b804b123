"""Loading a base model (optionally quantized) and a model for inference (base + adapter, or fused).

mlx-lm owns the model definitions and loading; this module only adds what our commands share:
one-line errors for broken folders, the compute dtype rule, QLoRA quantization of the frozen base,
and "an adapter knows its base".
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.core.dtypes import DTYPES, dtype_name, set_config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json, write_json_atomic
from mlx_lora.core.weights import save_tensors
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.lora import Adapter, AdapterSet, load_adapter, read_adapter
from mlx_lora.model.meta import (
    FUSED_INFO,
    GENERATION_CONFIG,
    generation_config,
    sampling_defaults,
    training_system_prompt,
)
from mlx_lora.model.prompt import TOKENIZER_FILES, load_mlx_tokenizer


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def compute_dtype(flag: str = "auto") -> mx.Dtype:
    """``auto``: bf16 on the GPU; fp32 on the CPU, where bf16 matmuls are many times slower."""
    if flag == "auto":
        return mx.bfloat16 if on_gpu() else mx.float32
    if flag not in DTYPES:
        raise MlxLoraError(f"unknown --dtype {flag!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[flag]


def device_name() -> str:
    return "gpu (Metal)" if on_gpu() else "cpu"


QUANT_GROUP = 64
QUANT_CHUNK_BYTES = 64 << 20  # larger matrices (the embedding) are quantized in row blocks


def load_base_tokenizer(model_dir: Path) -> Any:
    """The tokenizer :func:`load_base` returns, without reading weights (train plans memory
    with the tokenized data before it loads the model)."""
    from mlx_lm.utils import load_config

    return load_mlx_tokenizer(model_dir, load_config(Path(model_dir)).get("eos_token_id"))


def load_error(model_dir: Path, e: Exception) -> MlxLoraError:
    """The one-line error of a model mlx-lm cannot build from ``model_dir`` (loading, and the
    memory plan, which builds it without weights): an unknown model_type, a config.json that lacks
    what its ModelArgs require (TypeError), unreadable weights (RuntimeError: mx.load)."""
    if isinstance(e, TypeError):
        kind = read_json(Path(model_dir) / "config.json").get("model_type")
        return MlxLoraError(
            f"cannot load the model in {model_dir}: its config.json does not fit model_type "
            f"{kind!r} ({e}); re-download the model"
        )
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return MlxLoraError(f"cannot load the model in {model_dir}: {msg}")


def load_base(
    model_dir: Path,
    *,
    dtype: mx.Dtype | None = None,
    quantize: int | None = None,
    tokenizer: Any = None,
) -> tuple[nn.Module, Any, dict]:
    """mlx-lm model + tokenizer + config from a local folder, cast to ``dtype``, maybe quantized.

    The weights are read lazily and cast/quantized one module at a time (:func:`materialize`), so
    loading never holds the whole full-precision model: a 4-bit 4B base fits an 8 GB Mac.
    """
    from mlx_lm.utils import load_model

    if quantize is not None and quantize not in (4, 8):
        raise MlxLoraError(f"--quantize must be 4 or 8, got {quantize}")
    try:
        model, config = load_model(Path(model_dir), lazy=True)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, TypeError) as e:
        raise load_error(model_dir, e) from None
    if quantize is not None and "quantization" in config:
        raise MlxLoraError(f"{model_dir} is already quantized; drop --quantize")
    try:
        materialize(model, dtype=dtype, quantize=quantize)
    except RuntimeError as e:  # the weights are read here: a truncated file shows up now
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "see python -m mlx_lora.plan" if "memory" in msg else "re-download them"
        raise MlxLoraError(f"cannot read the weights in {model_dir}: {msg}; {hint}") from None
    return model, tokenizer or load_base_tokenizer(model_dir), config


def materialize(model: nn.Module, *, dtype: mx.Dtype | None, quantize: int | None) -> None:
    """Cast and quantize a lazily loaded model, reading and evaluating one leaf module at a time.

    Quantizing the whole model at once first reads every full-precision weight (a 4B bf16 base:
    8.5 GB to end at 2.2 GB). Here each linear/embedding is read, cast and quantized on its own,
    so the load peak is the final size plus one module's full-precision weights. Same numbers as
    casting and quantizing the whole model (quantization groups run along rows).
    """
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    while leaves:  # popped: no reference outlives its turn, so each read buffer is freed after use
        path, module = leaves.pop()
        if quantize is not None and _quantizable(path, module):
            module = _quantized(module, quantize, dtype)  # the full-precision module is dropped
            model.update_modules(tree_unflatten([(path, module)]))
        elif dtype is not None:
            module.update(_cast_floats(module.parameters(), dtype))
        mx.eval(module.parameters())
        del module
    if dtype is not None:  # parameters held by non-leaf modules (none in the supported models)
        model.update(_cast_floats(model.parameters(), dtype))
    mx.eval(model.parameters())


def _quantizable(path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANT_GROUP == 0


def _quantized(module: nn.Module, bits: int, dtype: mx.Dtype | None) -> nn.Module:
    """``module.to_quantized`` (lazy); a large matrix (the embedding) is quantized here, row block
    by row block, so its cast copy never exists whole."""
    source = module.weight
    if dtype is not None:
        module.update(_cast_floats(module.parameters(), dtype))
    q = module.to_quantized(group_size=QUANT_GROUP, bits=bits)
    rows = max(1, QUANT_CHUNK_BYTES // (source.shape[-1] * 4))
    if source.shape[0] > rows:
        parts = []
        for i in range(0, source.shape[0], rows):
            block = source[i : i + rows]
            block = block if dtype is None else block.astype(dtype)
            parts.append(mx.quantize(block, QUANT_GROUP, bits))
            mx.eval(parts[-1])
        q.weight, q.scales, q.biases = (mx.concatenate([p[j] for p in parts]) for j in range(3))
    return q


def _cast_floats(tree: Any, dtype: mx.Dtype) -> Any:
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast_floats(v, dtype) for v in tree]
    floating = isinstance(tree, mx.array) and mx.issubdtype(tree.dtype, mx.floating)
    if floating and tree.dtype != dtype:
        return tree.astype(dtype)
    return tree


@dataclass
class Loaded:
    """A model ready to generate, and where it came from."""

    model: nn.Module
    tokenizer: Any
    model_dir: Path
    config: dict
    adapter: Adapter | None = None
    generation: dict = field(default_factory=dict)  # generation_config.json
    adapter_set: AdapterSet | None = None  # serve's several adapters on this base, by name

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the adapter (or fused model) was trained with, if any."""
        return training_system_prompt(self.model_dir, self.adapter)


def base_model_dir(model: str | None, adapter: Adapter | None, source: str = "auto") -> Path:
    """The local folder of ``--model``, else of the base the adapter recorded."""
    if model is None:
        model = adapter.base_model if adapter is not None else None
    if model is None:
        raise MlxLoraError(
            "pass --model ID|DIR (or --adapter OUT of a training run, whose base is recorded)"
        )
    return resolve_model(model, source)


def load_for_inference(
    model: str | None,
    adapter: str | Path | None = None,
    *,
    source: str = "auto",
    dtype: str = "auto",
) -> Loaded:
    """Base (+ PEFT adapter) or a fused folder; ``model`` defaults to the adapter's base."""
    recorded = read_adapter(Path(adapter)) if adapter is not None else None
    model_dir = base_model_dir(model, recorded, source)
    m, tok, config = load_base(model_dir, dtype=_inference_dtype(model_dir, dtype))
    gen = generation_config(model_dir)
    sampling_defaults(gen)  # a broken generation_config.json fails here, not at the first answer
    loaded_adapter = load_adapter(m, recorded, config) if recorded is not None else None
    m.eval()
    return Loaded(m, tok, model_dir, config, loaded_adapter, gen)


def load_adapter_set(
    model: str | None, adapters: dict[str, Path], *, source: str = "auto"
) -> Loaded:
    """One base (``model``, else the first adapter's recorded base) with several named adapters
    (:class:`~mlx_lora.model.lora.AdapterSet`); answers pick one by name."""
    read = {name: read_adapter(Path(d)) for name, d in adapters.items()}
    first = next(iter(read.values()), None)
    model_dir = base_model_dir(model, first, source)
    m, tok, config = load_base(model_dir, dtype=_inference_dtype(model_dir, "auto"))
    gen = generation_config(model_dir)
    sampling_defaults(gen)
    bank = AdapterSet(m, read, config)
    m.eval()
    return Loaded(m, tok, model_dir, config, None, gen, bank)


# Files of a model folder besides its weights that travel with it, byte for byte (llama.cpp
# identifies BPE pre-tokenizers by hashing their output, so a re-saved tokenizer could differ).


def write_model_files(folder: Path, base_dir: Path, config: dict, info: dict) -> None:
    """Everything of a model folder but its weights: ``config``, the base's tokenizer files and
    generation config (byte for byte), the chat template also in ``tokenizer_config.json``
    (where llama.cpp's converters look), and ``info`` as ``mlx_lora.json`` (provenance and the
    training system prompt)."""
    write_json_atomic(folder / "config.json", config)
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)
    tc, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if tc.is_file() and jinja.is_file():
        data = read_json(tc)
        if not data.get("chat_template"):
            data["chat_template"] = jinja.read_text(encoding="utf-8")
            write_json_atomic(tc, data)
    write_json_atomic(folder / FUSED_INFO, info)


def save_model_folder(folder: Path, model: nn.Module, base_dir: Path, info: dict) -> None:
    """A fully fine-tuned model as a Hugging Face folder (weights in the dtype they were trained
    in), next to the base's config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    save_tensors(folder / "model.safetensors", weights)
    config = read_json(base_dir / "config.json", required=True)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    set_config_dtype(config, dtype_name(next(iter(weights.values())).dtype))
    write_model_files(folder, base_dir, config, info)


def _inference_dtype(model_dir: Path, flag: str) -> mx.Dtype | None:
    """The compute dtype rule, except that an MLX-quantized folder (``mlx_lora.export --format
    mlx``, mlx-community models) runs at the dtype it was saved in under ``auto``: that is what
    ``mlx_lm.generate``, ``mlx_lm.server`` and LM Studio run, so chat and serve give their answers
    token for token. None keeps the stored dtype."""
    if flag == "auto" and "quantization" in read_json(Path(model_dir) / "config.json"):
        return None
    return compute_dtype(flag)
