"""``python -m mlx_lora.fuse``: adapter + *original* base → a Hugging Face folder.

The merge is ``W + (alpha / r) · B · A`` in fp32 (:func:`mlx_lora.lora.merge_weights`, the same
function export uses), always from the base's own safetensors: after QLoRA training the 4-bit copy
the adapter was trained against is not what gets fused — dequantizing it would bake the
quantization error into every weight. The folder keeps the base's shard layout, copies tokenizer
files byte for byte (llama.cpp identifies BPE pre-tokenizers by hashing their output) and keeps the
chat template in ``tokenizer_config.json`` where early-2025 llama.cpp converters look for it.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lora.config import opt, parse_config
from mlx_lora.errors import MlxLoraError
from mlx_lora.files import atomic_dir, write_error_detail, write_json_atomic
from mlx_lora.hub import resolve_model
from mlx_lora.lora import check_base, merge_weights, read_adapter
from mlx_lora.model import adapter_base

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "qwen.tiktoken",
)
QUANT_KEYS = ("quantization", "quantization_config")
OUT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
INFO_FILE = "mlx_lora.json"


@dataclass
class FuseConfig:
    model: str | None = opt(
        None, "base model (id or folder); default: the base recorded in the adapter"
    )
    adapter: str = opt("output", "adapter folder (a training --output-dir or checkpoint-N)")
    output_dir: str = opt("output-fused", "where the fused Hugging Face folder goes")
    dtype: str | None = opt(
        None, "weight dtype of the fused model (default: the base's own)", choices=list(OUT_DTYPES)
    )
    model_source: str = opt(
        "auto", "where a model id is fetched from", choices=["auto", "modelscope", "huggingface"]
    )
    overwrite: bool = opt(False, "replace an existing --output-dir")


def _weight_files(base: Path) -> list[str]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return sorted(p.name for p in base.glob("*.safetensors"))


def _base_dtype(config: dict, sample: mx.array) -> mx.Dtype:
    name = config.get("torch_dtype") or config.get("dtype")
    return OUT_DTYPES.get(
        str(name), sample.dtype if mx.issubdtype(sample.dtype, mx.floating) else mx.float32
    )


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
    adapter = Path(adapter)
    cfg, tensors = read_adapter(adapter)
    model = model or adapter_base(adapter)
    if not model:
        raise MlxLoraError("pass --model: the adapter does not record its base model")
    base = resolve_model(model, source)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    check_base(cfg, config, adapter)
    if any(k in config for k in QUANT_KEYS):
        raise MlxLoraError(
            f"{base} holds quantized weights; fuse needs the original full-precision base (QLoRA "
            "adapters are fused into the unquantized model)"
        )
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise MlxLoraError(f"--output-dir {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MlxLoraError(f"{out} already exists; pass --overwrite or choose another --output-dir")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise MlxLoraError(f"unknown --dtype {dtype!r}; choose {', '.join(OUT_DTYPES)}")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxLoraError(
            f"cannot write to --output-dir {out} ({write_error_detail(e)}); choose a writable "
            "folder"
        ) from None
    try:
        with atomic_dir(out) as tmp:
            _write_fused(tmp, base, config, model, adapter, cfg, tensors, dtype)
    except (OSError, RuntimeError) as e:
        raise MlxLoraError(
            f"cannot write the fused model to {out} ({write_error_detail(e)}); free disk space or "
            "choose another --output-dir"
        ) from None
    return out


def _write_fused(
    tmp: Path,
    base: Path,
    config: dict,
    model: str,
    adapter: Path,
    cfg: dict,
    tensors: dict,
    dtype: str | None,
) -> None:
    """Merged shards, config without quantization keys, byte-copied tokenizer, provenance."""
    used: set[str] = set()
    out_dtype = OUT_DTYPES[dtype] if dtype else None
    for name in _weight_files(base):
        weights = mx.load(str(base / name))
        if out_dtype is None:
            out_dtype = _base_dtype(config, next(iter(weights.values())))
        present = {
            k: v
            for k, v in tensors.items()
            if k.endswith(".lora_A.weight")
            and k[len("base_model.model.") : -len(".lora_A.weight")] + ".weight" in weights
        }
        lora = {
            **present,
            **{
                k.replace(".lora_A.", ".lora_B."): tensors[k.replace(".lora_A.", ".lora_B.")]
                for k in present
            },
        }
        used.update(lora)
        merged = merge_weights(weights, cfg, lora)
        out_tensors = {}
        for k, v in merged.items():  # merged weights come back as fp32 numpy, the rest untouched
            v = mx.array(v) if isinstance(v, np.ndarray) else v
            out_tensors[k] = v.astype(out_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        mx.save_safetensors(str(tmp / name), out_tensors, metadata={"format": "pt"})
        del weights, merged, out_tensors
    unused = sorted(set(tensors) - used)
    if unused:
        raise MlxLoraError(
            f"adapter tensor {unused[0]} has no base weight in {base}: the adapter was trained on "
            "another model; pass its base with --model"
        )
    if (base / "model.safetensors.index.json").is_file():
        shutil.copyfile(base / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
    for key in QUANT_KEYS:
        config.pop(key, None)
    config["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[
        out_dtype
    ]
    write_json_atomic(tmp / "config.json", config)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, tmp / name)
    _template_in_tokenizer_config(tmp)
    extra = cfg.get("mlx_lora") or {}
    write_json_atomic(
        tmp / INFO_FILE,
        {
            "base_model": model,
            "adapter": str(adapter.resolve()),
            "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"],
            "system_prompt": extra.get("system_prompt"),
            "dtype": config["torch_dtype"],
        },
    )


def _template_in_tokenizer_config(folder: Path) -> None:
    """Copy ``chat_template.jinja`` into ``tokenizer_config.json`` when only the former has it."""
    tc, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if not (tc.is_file() and jinja.is_file()):
        return
    data = json.loads(tc.read_text(encoding="utf-8"))
    if not data.get("chat_template"):
        data["chat_template"] = jinja.read_text(encoding="utf-8")
        write_json_atomic(tc, data)


DESCRIPTION = """Merge a LoRA adapter into its base model and write a Hugging Face folder
(safetensors + config + tokenizer) that mlx-lm, transformers and llama.cpp's convert_hf_to_gguf.py load."""

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


if __name__ == "__main__":
    from mlx_lora.cli import run

    sys.exit(run(main))
