"""The fused model as an MLX folder: what ``mlx_lm.generate``, ``mlx_lm.server`` and LM Studio's MLX
engine open unchanged — the fastest way to chat on a Mac.

The folder is what ``mlx_lm.convert -q`` writes, made with mlx-lm's own pieces
(``load_model`` → ``quantize_model`` → ``save_model`` / ``save_config``): safetensors in MLX's
packed layout with ``scales``/``biases``, and a ``config.json`` whose ``quantization`` entry
(``group_size``, ``bits``, ``mode``) tells ``mlx_lm.load`` how to rebuild the quantized layers.
Layers whose input width does not divide by the group size stay unquantized, as mlx-lm does.
The weights come from the folder export just fused (fuse's one merge, into the original base), so a
QLoRA adapter is never merged into a dequantized 4-bit copy. Tokenizer files, the chat template,
``generation_config.json`` and fuse's provenance record are copied byte for byte (mlx-lm's
``tokenizer.save_pretrained`` would rewrite them).
"""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path
from typing import Any

from mlx_lora.core.dtypes import config_dtype, set_config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_dir, read_json, write_text_atomic
from mlx_lora.model.load import DTYPES, write_model_files
from mlx_lora.model.meta import FUSED_INFO

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
README = "README.md"


def check_quantization(bits: int, group_size: int) -> None:
    if bits not in Q_BITS:
        raise MlxLoraError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {bits}")
    if group_size not in Q_GROUP_SIZES:
        raise MlxLoraError(
            f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, got {group_size}"
        )


def run_commands(mlx_dir: Path, system_prompt: str | None = None) -> list[str]:
    """The exact commands that chat with / serve the folder (mlx-lm's CLIs and ours)."""
    d = str(mlx_dir)
    system = ["--system-prompt", system_prompt] if system_prompt else []
    return [
        shlex.join(["mlx_lm.generate", "--model", d, *system, "--prompt", "你好"]),
        shlex.join(["mlx_lm.server", "--model", d, "--port", "8080"]),
        shlex.join(["python", "-m", "mlx_lora.chat", "--model", d]),
        shlex.join(["python", "-m", "mlx_lora.serve", "--model", d]),
    ]


def _load(hf_dir: Path, dtype: str | None) -> tuple[Any, dict]:
    """mlx-lm's model from the HF folder, floats cast to ``dtype`` (default: the folder's own)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(Path(hf_dir), lazy=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise MlxLoraError(f"mlx-lm cannot load {hf_dir}: {str(e).splitlines()[0]}") from None
    name = dtype or config_dtype(config)
    target = DTYPES.get(str(name))
    if target is not None:
        model.update(
            tree_map(
                lambda v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters(),
            )
        )
        set_config_dtype(config, str(name))
    return model, config


def write_mlx_model(
    hf_dir: Path,
    out: Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
    system_prompt: str | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Quantize the HF folder ``hf_dir`` with MLX's own quantization into the MLX folder ``out``
    (atomically). Returns what was written (bits, group size, bits per weight, quantized layers)."""
    from mlx_lm.utils import compute_bits_per_weight, quantize_model, save_model

    check_quantization(bits, group_size)
    hf_dir, out = Path(hf_dir), Path(out)
    model, config = _load(hf_dir, dtype)
    if "quantization" in config:
        raise MlxLoraError(f"{hf_dir} is already quantized; export from the full-precision model")
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints an [INFO] line
        model, config = quantize_model(model, config, group_size, bits)
    quantized = sum(1 for _, m in model.named_modules() if hasattr(m, "scales"))
    bpw = float(compute_bits_per_weight(model))
    with atomic_dir(out) as tmp:
        save_model(tmp, model, donate_model=True)
        info = read_json(hf_dir / FUSED_INFO) or {"base_model": str(hf_dir)}
        write_model_files(tmp, hf_dir, dict(sorted(config.items())), info)
        write_text_atomic(tmp / README, _readme(out, hf_dir, bits, group_size, system_prompt))
    return {
        "bits": bits,
        "group_size": group_size,
        "mode": "affine",
        "bits_per_weight": round(bpw, 3),
        "quantized_layers": quantized,
        "dtype": config_dtype(config),
    }


def _readme(out: Path, hf_dir: Path, bits: int, group_size: int, system: str | None) -> str:
    lines = [
        "---",
        "library_name: mlx",
        "pipeline_tag: text-generation",
        "tags: [mlx]",
        "---",
        f"# {out.name}",
        "",
        f"{bits}-bit MLX model (group size {group_size}, MLX affine quantization) of `{hf_dir}`, "
        "written by `python -m mlx_lora.export --format mlx`. Open it unchanged with mlx-lm or "
        "LM Studio's MLX engine:",
        "",
        "```bash",
        *run_commands(out.resolve(), system),
        "```",
        "",
    ]
    return "\n".join(lines)
