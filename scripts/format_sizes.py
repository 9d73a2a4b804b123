#!/usr/bin/env python
"""File size of every export format for a model, computed from its config.json alone.

The README's table gives sizes for a 4B model (Qwen1.5-4B-Chat by default, from its real config in
../shared/fixtures). GGUF sizes come from llama.cpp's own quantizer in dry-run mode (its real
per-tensor mix, e.g. q4_K_M keeps half of attn_v/ffn_down at q6_K), run on a sparse f16 GGUF that
has the model's tensor list but no data; MLX sizes from MLX's layout (packed weights plus one
scale and one bias per group, embeddings and the head quantized too).

    python scripts/format_sizes.py [--config PATH/config.json]
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from mlx_lora.core.files import read_json
from mlx_lora.gguf.writer import LLAMA_CPP_TYPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "fixtures" / "qwen15-tokenizer" / "config.json"


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → shape (numpy order) of a qwen2/llama model."""
    h, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    d = cfg.get("head_dim") or h // heads
    out = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        out["output.weight"] = (v, h)
    for b in range(cfg["num_hidden_layers"]):
        p = f"blk.{b}."
        out |= {
            p + "attn_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
            p + "attn_q.weight": (heads * d, h),
            p + "attn_k.weight": (kv * d, h),
            p + "attn_v.weight": (kv * d, h),
            p + "attn_output.weight": (h, heads * d),
            p + "ffn_gate.weight": (f, h),
            p + "ffn_up.weight": (f, h),
            p + "ffn_down.weight": (h, f),
        }
        if cfg.get("model_type") == "qwen2":
            out |= {
                p + "attn_q.bias": (heads * d,),
                p + "attn_k.bias": (kv * d,),
                p + "attn_v.bias": (kv * d,),
            }
    return out


def sparse_f16_gguf(cfg: dict, path: Path) -> int:
    """A GGUF with the model's header and tensor list; the data is a hole. Returns parameters."""
    arch = "qwen2" if cfg.get("model_type") == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    total, n = 0, 0
    for name, shape in shapes(cfg).items():
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16
        size = math.prod(shape) * (4 if len(shape) == 1 else 2)
        w.add_tensor_info(name, shape, np.dtype(np.float32), size, raw_dtype=qtype)
        total += -(-size // 32) * 32
        n += math.prod(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as fh:
        start = -(-fh.seek(0, 2) // 32) * 32
        fh.truncate(start + total)
    return n


def mlx_bytes(cfg: dict, bits: int, group: int = 64, scale_bytes: int = 2) -> int:
    """MLX affine quantization: bits per weight plus a scale and a bias per group."""
    total = 0
    for shape in shapes(cfg).values():
        if len(shape) == 1:
            total += math.prod(shape) * scale_bytes
        else:
            total += math.prod(shape) * bits // 8 + math.prod(shape) // group * 2 * scale_bytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT)
    args = ap.parse_args()
    from mlx_lora.gguf.llamacpp import llama_quantize
    from mlx_lora.gguf.writer import GGUF_EXPORT_TYPES

    cfg = read_json(args.config, required=True)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "sparse-f16.gguf"
        n = sparse_f16_gguf(cfg, src)
        print(f"{args.config}: {n / 1e9:.2f}B parameters")
        print(f"  {'f32':<8} {n * 4 / 1e9:6.2f} GB  32.00 bits/weight")
        print(f"  {'f16':<8} {n * 2 / 1e9:6.2f} GB  16.00 bits/weight (bf16 the same)")
        for name in ("q8_0", *LLAMA_CPP_TYPES):
            log = llama_quantize(
                src, Path(d) / "x.gguf", int(GGUF_EXPORT_TYPES[name][1]), dry_run=True
            )
            m = re.search(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", log.text)
            if m:
                size = float(m.group(1)) * 2**20
                print(f"  {name:<8} {size / 1e9:6.2f} GB  {float(m.group(2)):.2f} bits/weight")
    for bits in (4, 8):
        b = mlx_bytes(cfg, bits)
        print(f"  mlx {bits}-bit {b / 1e9:6.2f} GB  {8 * b / n:.2f} bits/weight (fp16 scales)")


if __name__ == "__main__":
    main()
