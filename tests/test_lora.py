"""LoRA semantics (PEFT init, names, shapes, scale), adapter I/O, and the packed/chunked loss."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import make_batch
from mlx_lora.model.load import load_base
from mlx_lora.model.lora import (
    DEFAULT_TARGETS,
    Adapter,
    adapter_config,
    apply_lora,
    load_adapter,
    lora_state,
    merge_weights,
    normalize_targets,
    save_adapter,
)
from mlx_lora.model.prompt import Encoded
from mlx_lora.testing.tiny_model import make_tiny_model
from mlx_lora.train.loss import loss_sum, reference_loss_sum


def load(path):
    model, tok, config = load_base(path, dtype=mx.float32)
    return model, tok, config


def randomize_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            m.lora_B = mx.array(rng.normal(0, 0.05, m.lora_B.shape).astype(np.float32))


def test_short_target_names():
    assert normalize_targets("q,k,v,o,gate,up,down") == DEFAULT_TARGETS
    assert normalize_targets(["q_proj", "q", "v_proj"]) == ["q_proj", "v_proj"]


def test_zero_initialised_adapter_is_the_base(tiny_model):
    model, _, _ = load(tiny_model)
    x = mx.array([[1, 5, 9, 200, 7]])
    before = model(x)
    apply_lora(model, DEFAULT_TARGETS, 8, 32, 0.1)
    model.eval()
    assert mx.array_equal(model(x), before).item()


def test_peft_names_shapes_and_trainables(tiny_model):
    model, _, config = load(tiny_model)
    wrapped = apply_lora(model, DEFAULT_TARGETS, 4, 8, 0.0)
    assert len(wrapped) == 7 * config["num_hidden_layers"]
    state = lora_state(model)
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, h)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (h, 4)
    assert state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (kv, 4)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, inter)
    assert state["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"].shape == (inter, 4)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {k[len("base_model.model.") : -len(".weight")] for k in state}


def test_scale_is_alpha_over_r(tiny_model):
    """Output equals the base model with W + (alpha/r)·B·A merged in."""
    model, _, _ = load(tiny_model)
    base_weights = {k: v for k, v in tree_flatten(model.parameters())}
    apply_lora(model, ["q_proj", "down_proj"], 4, 16, 0.0)
    randomize_b(model)
    model.eval()
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    out = model(x)
    merged = merge_weights(
        base_weights, Adapter(Path("."), {"r": 4, "lora_alpha": 16}, lora_state(model))
    )
    ref, _, _ = load(tiny_model)
    ref.load_weights([(k, mx.array(v)) for k, v in merged.items()])
    diff = mx.abs(ref(x) - out).max().item()
    assert diff < 1e-4
    # and the scale really matters: with alpha = r the result differs
    merged1 = merge_weights(
        base_weights, Adapter(Path("."), {"r": 4, "lora_alpha": 4}, lora_state(model))
    )
    ref.load_weights([(k, mx.array(v)) for k, v in merged1.items()])
    assert mx.abs(ref(x) - out).max().item() > 1e-3


def test_unknown_target_lists_available(tiny_model):
    model, _, _ = load(tiny_model)
    with pytest.raises(
        MlxLoraError,
        match="unknown target module.*qkv_proj.*this model has: down_proj, gate_proj, k_proj",
    ):
        apply_lora(model, ["qkv_proj"], 8, 16)


def test_save_load_round_trip_and_peft_config(tiny_model, tmp_path):
    model, _, _ = load(tiny_model)
    apply_lora(model, DEFAULT_TARGETS, 8, 32, 0.1)
    randomize_b(model)
    cfg = adapter_config(
        r=8,
        alpha=32,
        dropout=0.1,
        targets=DEFAULT_TARGETS,
        base_model=str(tiny_model),
        extra={"system_prompt": "S"},
    )
    save_adapter(tmp_path, model, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == 8
    assert saved["lora_alpha"] == 32 and saved["target_modules"] == DEFAULT_TARGETS
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(lora_state(model))
    model.eval()
    x = mx.array([[10, 20, 30]])
    fresh, _, _ = load(tiny_model)
    loaded_cfg = load_adapter(fresh, tmp_path)
    fresh.eval()
    assert loaded_cfg.extra["system_prompt"] == "S"
    assert mx.array_equal(fresh(x), model(x)).item()


def test_adapter_from_another_base_is_refused(tiny_model, tmp_path):

    model, _, _ = load(tiny_model)
    apply_lora(model, ["q_proj"], 4, 8)
    save_adapter(
        tmp_path / "a",
        model,
        adapter_config(r=4, alpha=8, dropout=0, targets=["q_proj"], base_model="tiny", extra={}),
    )
    other = make_tiny_model(tmp_path / "wide", hidden_size=96, heads=4, kv_heads=2)
    wide, _, _ = load(other)
    with pytest.raises(MlxLoraError, match="trained on another base"):
        load_adapter(wide, tmp_path / "a")
    with pytest.raises(MlxLoraError, match="no adapter_config.json"):
        load_adapter(wide, tmp_path)


def _examples(tok, n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _i in range(n):
        length = int(rng.integers(5, 40))
        ids = rng.integers(3, 1400, length).tolist()
        mask = [j >= length // 3 for j in range(length)]
        out.append(Encoded(ids, mask))
    return out


@pytest.mark.parametrize("checkpoint", [True, False])
def test_packed_chunked_loss_and_grads_equal_the_plain_loss(tiny_model, checkpoint):
    """Packing (block-diagonal attention) + target-only chunked projection change no number."""
    model, tok, _ = load(tiny_model)
    apply_lora(model, DEFAULT_TARGETS, 4, 8, 0.0)
    randomize_b(model, 3)
    exs = _examples(tok)

    def packed(m):
        b = make_batch(exs, 128, packing=True)
        assert b.inputs.shape[0] < len(exs)
        arrays = [mx.array(a) for a in (b.inputs, b.segments, b.targets, b.labels, b.weights)]
        return loss_sum(m, *arrays, checkpoint=checkpoint, chunk=16)

    def plain(m):
        total = mx.array(0.0)
        for e in exs:  # one example per row, full logits, mlx-lm's own forward
            total = total + reference_loss_sum(
                m, mx.array([e.ids]), mx.array([e.mask], dtype=mx.float32)
            )
        return total

    lp, gp = nn.value_and_grad(model, packed)(model)
    lr, gr = nn.value_and_grad(model, plain)(model)
    assert abs(lp.item() - lr.item()) <= 1e-4 * max(1.0, abs(lr.item()))
    gp, gr = dict(tree_flatten(gp)), dict(tree_flatten(gr))
    worst = max(mx.abs(gp[k] - gr[k]).max().item() for k in gr)
    assert worst <= 1e-4, worst
    assert (
        max(mx.abs(g).max().item() for g in gr.values()) > 1e-3
    )  # gradients are not trivially zero


def test_adapter_on_a_same_shaped_but_different_base_is_refused(tiny_model, tiny_qwen, tmp_path):
    """Same width and depth (the LoRA shapes fit) but another vocabulary: still the wrong base."""
    from conftest import SAMPLE_DATA

    from mlx_lora.config import TrainConfig
    from mlx_lora.export.fuse import fuse
    from mlx_lora.model.load import load_for_inference
    from mlx_lora.train.loop import train

    out = tmp_path / "a"
    train(
        TrainConfig(
            model=str(tiny_model),
            data=str(SAMPLE_DATA),
            output_dir=str(out),
            max_steps=1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            plot=False,
        ),
        progress=False,
    )
    with pytest.raises(
        MlxLoraError, match="trained on another base.*vocab_size 1536, this model 151936"
    ):
        load_for_inference(str(tiny_qwen), out)
    with pytest.raises(MlxLoraError, match="trained on another base"):
        fuse(str(tiny_qwen), out, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    load_for_inference(str(tiny_model), out)  # the right base loads


def test_rslora_adapter_computes_what_its_merge_computes(tiny_model, tmp_path):
    """PEFT's per-module factor (rsLoRA: alpha / √r) is the LoRA layers' factor as well as the
    merge's: base + adapter, the fused folder and an AdapterSet give the same logits."""
    from mlx_lora.export.fuse import fuse
    from mlx_lora.model.load import load_adapter_set, load_for_inference
    from mlx_lora.model.lora import LoRALinear
    from mlx_lora.testing.adapter import random_adapter

    adapter = random_adapter(tiny_model, tmp_path / "a", r=4, alpha=8.0, scale=0.5)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_rslora": True}))
    ids = mx.array([[1, 5, 9, 14, 3, 7]])
    lora = load_for_inference(str(tiny_model), adapter, dtype="float32")
    scales = {m.scale for _, m in lora.model.named_modules() if isinstance(m, LoRALinear)}
    assert scales == {8.0 / 2.0}  # alpha / √r, not alpha / r
    fused = fuse(str(tiny_model), adapter, tmp_path / "fused", dtype="float32")
    merged = load_for_inference(str(fused), dtype="float32")
    bank = load_adapter_set(str(tiny_model), {"a": adapter})
    bank.adapter_set.use("a")
    want = np.array(lora.model(ids).astype(mx.float32))
    assert np.abs(np.array(merged.model(ids).astype(mx.float32)) - want).max() < 1e-4
    got = np.array(bank.model(ids).astype(mx.float32))
    assert np.abs(got - want).max() < 1e-2  # the set's base is loaded in the compute dtype
