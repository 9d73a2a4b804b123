"""``python -m mlx_lora.fuse``: adapter + *original* base → a Hugging Face folder.

The merge is ``W + (alpha / r) · B · A`` in fp32 (:func:`mlx_lora.model.lora.merge_weights`, the
same
function export uses), always from the base's own safetensors: after QLoRA training the 4-bit copy
the adapter was trained against is not what gets fused — dequantizing it would bake the
quantization error into every weight. The folder keeps the base's shard layout, copies tokenizer
files byte for byte (llama.cpp identifies BPE pre-tokenizers by hashing their output) and keeps the
chat template in ``tokenizer_config.json`` where early-2025 llama.cpp converters look for it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lora.config import opt, parse_config
from mlx_lora.core.dtypes import config_dtype, set_config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_dir, check_apart, read_json, write_error_detail
from mlx_lora.core.weights import INDEX_FILE, load_tensors, save_tensors, weight_files
from mlx_lora.model.hub import SOURCES
from mlx_lora.model.load import DTYPES, base_model_dir, dtype_name, write_model_files
from mlx_lora.model.lora import Adapter, check_base, merge_weights, read_adapter
from mlx_lora.model.meta import training_system_prompt

QUANT_KEYS = ("quantization", "quantization_config")


@dataclass
class FuseConfig:
    model: str | None = opt(
        None, "base model (id or folder); default: the base recorded in the adapter"
    )
    adapter: str = opt("output", "adapter folder (a training --output-dir or checkpoint-N)")
    output_dir: str = opt("output-fused", "where the fused Hugging Face folder goes")
    dtype: str | None = opt(
        None, "weight dtype of the fused model (default: the base's own)", choices=list(DTYPES)
    )
    model_source: str = opt("auto", "where a model id is fetched from", choices=list(SOURCES))
    overwrite: bool = opt(False, "replace an existing --output-dir")


def _base_dtype(config: dict, sample: mx.array) -> mx.Dtype:
    name = config_dtype(config)
    floating = mx.issubdtype(sample.dtype, mx.floating)
    return DTYPES.get(str(name), sample.dtype if floating else mx.float32)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MlxLoraError(f"--output-dir {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MlxLoraError(f"{out} already exists; pass --overwrite or choose another --output-dir")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxLoraError(
            f"cannot write to --output-dir {out} ({write_error_detail(e)}); choose a writable "
            "folder"
        ) from None


def fuse(
    model: str | None,
    adapter: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    source: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the fused folder atomically; returns its path."""
    lora = read_adapter(Path(adapter))
    base = base_model_dir(model, lora, source)
    config = read_json(base / "config.json", required=True)
    check_base(lora, config)
    if any(k in config for k in QUANT_KEYS):
        raise MlxLoraError(
            f"{base} holds quantized weights; fuse needs the original full-precision base (QLoRA "
            "adapters are fused into the unquantized model)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise MlxLoraError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    out = Path(output_dir)
    check_apart(out, {"--model": base, "--adapter": lora.directory})
    _check_output(out, overwrite)
    try:
        with atomic_dir(out) as tmp:
            _write_fused(tmp, base, config, model or str(base), lora, dtype)
    except (OSError, RuntimeError) as e:
        raise MlxLoraError(
            f"cannot write the fused model to {out} ({write_error_detail(e)}); free disk space or "
            "choose another --output-dir"
        ) from None
    return out


def _merge_shards(tmp: Path, base: Path, config: dict, lora: Adapter, dtype: str | None) -> str:
    """Each base shard merged and written under its own name; returns the output dtype's name."""
    modules = lora.pairs()
    used: set[str] = set()
    out_dtype = DTYPES[dtype] if dtype else None
    for path in weight_files(base):
        weights = load_tensors(path)
        if out_dtype is None:
            out_dtype = _base_dtype(config, next(iter(weights.values())))
        here = [m for m in modules if f"{m}.weight" in weights]
        used.update(here)
        merged = merge_weights(weights, lora, here)
        out_tensors = {}
        for k, v in merged.items():  # merged weights come back as fp32 numpy, the rest untouched
            v = mx.array(v) if isinstance(v, np.ndarray) else v
            out_tensors[k] = v.astype(out_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        save_tensors(tmp / path.name, out_tensors)
        del weights, merged, out_tensors
    unused = sorted(set(modules) - used)
    if unused:
        raise MlxLoraError(
            f"adapter module {unused[0]} has no base weight in {base}: the adapter was trained on "
            "another model; pass its base with --model"
        )
    return dtype_name(out_dtype)


def _write_fused(
    tmp: Path, base: Path, config: dict, model: str, lora: Adapter, dtype: str | None
) -> None:
    """Merged shards, config without quantization keys, byte-copied tokenizer, provenance."""
    config = {k: v for k, v in config.items() if k not in QUANT_KEYS}
    set_config_dtype(config, _merge_shards(tmp, base, config, lora, dtype))
    if (base / INDEX_FILE).is_file():
        shutil.copyfile(base / INDEX_FILE, tmp / INDEX_FILE)
    info = {
        "base_model": model,
        "adapter": str(lora.directory.resolve()),
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "system_prompt": training_system_prompt(None, lora),
        "dtype": config_dtype(config),
    }
    write_model_files(tmp, base, config, info)


DESCRIPTION = """Merge a LoRA adapter into its base model and write a Hugging Face folder
(safetensors + config + tokenizer) that mlx-lm, transformers and llama.cpp's
convert_hf_to_gguf.py load."""

EPILOG = """example:
  python -m mlx_lora.fuse --adapter output/huanhuan --output-dir output/huanhuan-fused"""


def main(argv: list[str] | None = None) -> Path:
    c = parse_config(FuseConfig, argv, "python -m mlx_lora.fuse", DESCRIPTION, EPILOG)
    out = fuse(
        c.model,
        c.adapter,
        c.output_dir,
        dtype=c.dtype,
        source=c.model_source,
        overwrite=c.overwrite,
    )
    print(f"fused model written to {out}")
    return out
