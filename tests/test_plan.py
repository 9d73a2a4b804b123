"""The memory plan: its parts match the real model and batches, train refuses before loading.

How close whole predictions come to measured peaks is ``scripts/bench_plan.py``'s job (README);
here each part is checked against what MLX really builds, and the CLI contract is exercised.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import QWEN_TOKENIZER, REPO, SAMPLE_DATA, make_tiny_model, need
from mlx.utils import tree_flatten

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.units import parse_size
from mlx_lora.data.dataset import load_dataset, make_batch
from mlx_lora.plan.footprint import (
    MicroBatch,
    load_extra_bytes,
    read_shape,
    trained_shapes,
    weight_bytes,
)
from mlx_lora.plan.memory import (
    Budget,
    Plan,
    changes,
    plan,
    run_batches,
    suggest,
    worst_case_batch,
)

CONFIGS = {
    "qwen2 tied": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen2 untied": {"model_type": "qwen2", "tie_word_embeddings": False},
    "llama biased": {
        "model_type": "llama",
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": False,
    },
    "mistral gqa": {"model_type": "mistral", "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True},
}


def _config(extra: dict) -> dict:
    return {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 320,
        "vocab_size": 1000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        **extra,
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shape_is_what_mlx_lm_builds(tmp_path: Path, name: str) -> None:
    """Every parameter mlx-lm creates for the config (built lazily, nothing computed) is counted."""
    from mlx_lm.utils import _get_classes

    config = _config(CONFIGS[name])
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    real = dict(tree_flatten(model.parameters()))
    shape = read_shape(tmp_path)
    assert shape.parameters == sum(v.size for v in real.values())
    assert {p.path: p.shape for p in shape.params} == {k: v.shape for k, v in real.items()}
    linears = {k for k, v in real.items() if k.endswith(".weight") and v.ndim == 2}
    assert {p.path for p in shape.params if p.quantizable} == linears  # embedding included
    assert shape.path == "fast"


@pytest.fixture(scope="module")
def mid(tmp_path_factory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("plan") / "mid",
        hidden_size=256,
        layers=4,
        heads=4,
        kv_heads=2,
        intermediate_size=704,
    )


@pytest.mark.parametrize(("dtype", "bits"), [(mx.float32, None), (mx.float32, 4), (mx.bfloat16, 8)])
def test_weights_are_the_loaded_bytes(mid: Path, dtype, bits) -> None:
    """The weights line is exact: the bytes of the model load_base returns."""
    from mlx_lora.model.load import load_base

    model, _, _ = load_base(mid, dtype=dtype, quantize=bits)
    real = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert sum(weight_bytes(read_shape(mid), dtype.size, bits).values()) == real


def test_load_extra_is_the_measured_load_overhead(mid: Path) -> None:
    from mlx_lora.model.load import load_base

    shape = read_shape(mid)
    for bits in (None, 4):
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        model, _, _ = load_base(mid, dtype=mx.float32, quantize=bits)
        final = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        extra = mx.get_peak_memory() - base - final
        planned = load_extra_bytes(shape, 4, bits)
        assert abs(extra - planned) <= 0.25 * planned + (64 << 10), (bits, extra, planned)
        del model


def test_trainable_parameters_match_the_wrapped_model(mid: Path) -> None:
    from mlx_lora.model.load import load_base
    from mlx_lora.model.lora import apply_lora, normalize_targets

    for extra in ({}, {"target_modules": "q,v", "lora_layers": 2}, {"use_dora": True}):
        cfg = TrainConfig(model=str(mid), lora_r=4, **extra)
        model, _, _ = load_base(mid, dtype=mx.float32)
        layers = None if cfg.lora_layers is None else [2, 3]
        apply_lora(
            model,
            normalize_targets(cfg.target_modules),
            4,
            8,
            0.0,
            layers=layers,
            dora=bool(cfg.use_dora),
        )
        real = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        planned = sum(math.prod(s) for s in trained_shapes(cfg, read_shape(mid)))
        assert planned == real, extra


def test_run_batches_are_the_shapes_train_makes(tiny_model: Path) -> None:
    """Same steps, same layout: every micro-batch train builds has a planned shape, and back."""
    from mlx_lora.model.load import load_base_tokenizer
    from mlx_lora.train.loop import step_examples

    tok = load_base_tokenizer(tiny_model)
    ex = load_dataset(SAMPLE_DATA, tok, max_seq_length=96).examples
    cfg = TrainConfig(
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_seq_length=96,
        num_train_epochs=2.5,
    )
    per_step = 6
    per_epoch = math.ceil(len(ex) / per_step)
    real = set()
    for step in range(math.ceil(2.5 * per_epoch)):
        ids = step_examples(step, len(ex), per_step, per_epoch, cfg.seed)
        for i in range(0, len(ids), 3):
            b = make_batch([ex[j] for j in ids[i : i + 3]], 96, True, pad_to=1, lanes=1)
            real.add((*b.inputs.shape, b.n_tokens, b.n_target_tokens))
    planned = run_batches(cfg, read_shape(tiny_model), ex, lanes=1)
    assert {(m.rows, m.length, m.tokens, m.targets) for m in planned} == real
    assert len(planned) == len(set(planned)) and len(planned) > 5


def test_worst_case_is_full_rows(tiny_model: Path) -> None:
    cfg = TrainConfig(per_device_train_batch_size=4, max_seq_length=1000)
    mb = worst_case_batch(cfg, read_shape(tiny_model))
    assert mb == MicroBatch(4000, 4 * 1000**2, 4 * 999, 4, 1000)


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("512MB") == 512_000_000
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("123") == 123
    with pytest.raises(MlxLoraError, match="MLX_LORA_MEMORY_LIMIT"):
        parse_size("two gigs", "MLX_LORA_MEMORY_LIMIT")


def _plan(mid: Path, limit: float, **kw) -> Plan:
    return plan(TrainConfig(model=str(mid), **kw), budget=Budget(int(limit), "test"))


def test_checkpointing_auto_follows_the_budget(mid: Path) -> None:
    p = _plan(mid, 64e9, max_seq_length=2048)
    assert p.cfg.gradient_checkpointing is None and p.fits
    assert p.peak_bytes(checkpointing=False) > p.peak_bytes(checkpointing=True)
    assert p.checkpointing is False and p.peak_bytes() == p.peak_bytes(checkpointing=False)
    between = (p.peak_bytes(False) + p.peak_bytes(True)) / 2 * 1.1
    q = _plan(mid, between, max_seq_length=2048)
    assert q.checkpointing is True and q.fits
    assert "gradient checkpointing on (auto" in q.report()


def test_suggest_prefers_what_keeps_the_result(mid: Path) -> None:
    """A roomy machine: the fastest config (checkpointing off). A tight one: a change that keeps
    the update the same (checkpointing, smaller batch + more accumulation) before quantizing."""
    roomy = _plan(mid, 64e9, max_seq_length=2048)
    new, _ = suggest(roomy.cfg, base=roomy)
    assert new.gradient_checkpointing is False and new.quantize is None
    need_now = roomy.peak_bytes(False)
    tight = _plan(mid, need_now * 0.9, max_seq_length=2048, gradient_checkpointing=False)
    assert not tight.fits
    found = suggest(tight.cfg, base=tight)
    assert found is not None
    new, q = found
    assert q.fits and new.quantize is None and new.max_seq_length == 2048
    assert new.per_device_train_batch_size * new.gradient_accumulation_steps == 16
    assert changes(tight.cfg, new).startswith("--")


def _config_only_4b(tmp_path: Path) -> Path:
    """The real Qwen1.5-4B config.json and tokenizer, and a weights file that is not one: a
    command that tried to read it would fail with another error."""
    src = need(QWEN_TOKENIZER)
    folder = tmp_path / "qwen15-4b"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


def test_cli_plans_a_4b_model_in_under_2_seconds(tmp_path: Path) -> None:
    folder = _config_only_4b(tmp_path)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.plan", "--model", str(folder), "--quantize", "4"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "MLX_LORA_NO_OPENBLAS": "1"},
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "3.95B parameters" in r.stdout and "4-bit matrices" in r.stdout
    assert "2048-token examples assumed" in r.stdout
    assert elapsed < 2.0, elapsed


def test_train_refuses_before_loading(tmp_path: Path) -> None:
    """MLX_LORA_MEMORY_LIMIT stands in for a small Mac: one line, exit 2, a change that fits, and
    the (unreadable) weights never touched; --force goes on to load them (and fails there)."""
    folder = _config_only_4b(tmp_path)
    cmd = [sys.executable, "-m", "mlx_lora.train", "--model", str(folder), "--data"]
    cmd += [str(SAMPLE_DATA), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    env = {**os.environ, "MLX_LORA_NO_OPENBLAS": "1", "MLX_LORA_MEMORY_LIMIT": "6GB"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this run needs about"), r.stderr
    assert "MLX_LORA_MEMORY_LIMIT=6GB" in lines[0] and "--quantize" in lines[0]
    assert "--force" in lines[0]
    env["MLX_LORA_MEMORY_LIMIT"] = "2GB"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert r.returncode == 2 and "no smaller configuration fits" in r.stderr
    r = subprocess.run(
        cmd + ["--force"], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )
    assert r.returncode == 2 and "cannot load the model" in r.stderr
